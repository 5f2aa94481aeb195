"""Tiny targets of every family SPD decomposes (our GPT, TMS, ResidMLP, transformers' GPT-2 and Llama),
each with a batch, decomposition patterns and its output loss type, for tests that compare two ways of
computing the same SPD step."""

import pytest
import torch
from torch import nn

from datamodules.sparse_features import sparse_feature_batch
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT
from lightning_modules.spd.targets import HFCausalLM
from lightning_modules.spd.toy_models import ResidMLP, TMSModel

KINDS = ("gpt", "tms", "resid_mlp", "hf_gpt2", "hf_llama")


def tiny_target_and_batch(kind: str) -> tuple[nn.Module, torch.Tensor, dict[str, int], str]:
    """A tiny target of each family, a batch, decomposition patterns and the output loss type."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    if kind == "gpt":
        target = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=16))
        return target, ids, {"transformer.h.*.attn.*": 4, "transformer.h.*.mlp.*": 5}, "kl"
    if kind == "tms":
        target = TMSModel(5, 2, n_hidden_layers=1, tied=False, identity_insert=True)
        x = sparse_feature_batch(32, 5, 0.2, torch.Generator().manual_seed(1))
        return target, x, {"linear1": 3, "identity": 2, "hidden_layers.0": 2, "linear2": 3}, "mse"
    if kind == "resid_mlp":
        target = ResidMLP(6, 4, 8, n_layers=3, act="gelu", in_bias=True, out_bias=True)
        x = sparse_feature_batch(32, 6, 0.2, torch.Generator().manual_seed(1))
        return target, x, {"layers.*.mlp_in": 3, "layers.*.mlp_out": 3}, "mse"
    transformers = pytest.importorskip("transformers")
    if kind == "hf_gpt2":
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=16, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
        )
        patterns = {"transformer.h.*.attn.c_*": 4, "transformer.h.*.mlp.c_*": 5}
        return HFCausalLM(transformers.GPT2LMHeadModel(config).eval()), ids, patterns, "kl"
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    patterns = {"model.layers.*.self_attn.*_proj": 3, "model.layers.*.mlp.*_proj": 4}
    return HFCausalLM(transformers.LlamaForCausalLM(config).eval()), ids, patterns, "kl"
