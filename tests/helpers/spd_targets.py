"""Tiny targets of every family SPD decomposes (our GPT, TMS, ResidMLP, transformers' GPT-2 and Llama),
each with a batch, decomposition patterns and its output loss type, for tests that compare two ways of
computing the same SPD step; the component model, objective run and comparison those tests share."""

import copy
from typing import Any

import pytest
import torch
from torch import nn

from datamodules.sparse_features import sparse_feature_batch
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.objective import SPDObjective
from lightning_modules.spd.targets import HFCausalLM
from lightning_modules.spd.toy_models import ResidMLP, TMSModel

KINDS = ("gpt", "tms", "resid_mlp", "hf_gpt2", "hf_llama")
# importance minimality and the two stochastic terms a batched layerwise forward serves (and folds)
STOCHASTIC_COEFFS = {
    "importance_minimality": 1e-3,
    "stochastic_recon": 1.0,
    "stochastic_recon_layerwise": 1.0,
}


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


TermsAndGrads = tuple[dict[str, float], list[torch.Tensor]]


def tiny_component_model(target: nn.Module, patterns: dict[str, int], **kwargs: Any) -> ComponentModel:
    """A float64 ComponentModel of a copy of `target` (shared_mlp CIs [6]), initialised from seed 5."""
    torch.manual_seed(5)
    return ComponentModel(copy.deepcopy(target), patterns, "shared_mlp", [6], **kwargs).double()


def objective_terms_and_grads(
    cm: ComponentModel, x: torch.Tensor, loss_type: str, coeffs: dict[str, float], **objective_kwargs: Any
) -> TermsAndGrads:
    """One objective (2 mask samples, step fraction 0.3, draws from seed 123) and its backward: the terms'
    values and the gradient of every trained parameter."""
    objective = SPDObjective(dict(coeffs), output_loss_type=loss_type, n_mask_samples=2, **objective_kwargs)
    torch.manual_seed(123)
    out = objective(cm, x, 0.3)
    out.total.backward()
    grads = [p.grad.clone() for p in (*cm.components.parameters(), *cm.ci_fns.parameters())]
    return {k: v.item() for k, v in out.terms.items()}, grads


def assert_same_terms_and_grads(expected: TermsAndGrads, actual: TermsAndGrads, rel: float) -> None:
    """The same terms (relative `rel`, absolute 1e-12) and gradients (relative `rel`, absolute `rel` times
    the expected gradient's largest entry)."""
    assert expected[0].keys() == actual[0].keys()
    for k in expected[0]:
        assert actual[0][k] == pytest.approx(expected[0][k], rel=rel, abs=1e-12), k
    for e, a in zip(expected[1], actual[1]):
        torch.testing.assert_close(a, e, rtol=rel, atol=rel * (e.abs().max().item() + 1e-12))
