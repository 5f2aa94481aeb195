"""What a training run's checkpoint holds beside the weights, read back for the commands that use a trained
model outside `train.py` (evaluation, generation): the data module's init arguments and the run's tokenizer.

`tokenizer_from_checkpoint(ckpt)` is the one way to get the tokenizer a checkpoint was trained with:

    from lightning_modules.gpt.run_artifacts import tokenizer_from_checkpoint
    tokenizer = tokenizer_from_checkpoint("checkpoints/tiny/last.ckpt")   # or an already loaded dict
    ids = tokenizer.encode("def main():")

The tokenizer itself travels in every checkpoint `TextDataModule` runs write (its `state_dict`: a trained
BPE as its JSON, or which kind it is) and is rebuilt from that. Older checkpoints hold only the
`TextDataModule`'s init arguments (`datamodule_hyper_parameters`); the tokenizer is then rebuilt from them
exactly as the run built it:
- `"bytes"`: UTF-8 bytes (nothing is read);
- a `transformers` tokenizer (local directory or hub name): loaded by that name;
- `"bpe"`: the byte-level BPE the run trained, read from the run's data cache (`cache_dir`, keyed by the
  corpus and the data settings) or from the `tokenizer.json` beside a `.bin` source; where the cache is
  missing, the corpus is tokenised again and the BPE retrained on it, which reproduces the run's tokenizer
  only when the corpus is the same.
Relative paths in the arguments (`sources`, `cache_dir`, a tokenizer directory) resolve from the working
directory, as they do in `train.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from callbacks.checkpoint_io import load_checkpoint_file
from datamodules.text import TextDataModule
from datamodules.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    TextTokenizer,
    tokenizer_from_state,
)

DATAMODULE_KEY = "datamodule_hyper_parameters"  # LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY

Checkpoint = str | Path | Mapping[str, Any]


def read_checkpoint(ckpt: Checkpoint) -> Mapping[str, Any]:
    """The checkpoint's contents (`torch.load(weights_only=True)` on CPU); a mapping is returned as it is.

    A missing, truncated or corrupted file is an error naming it (FileNotFoundError / ValueError)."""
    if isinstance(ckpt, Mapping):
        return ckpt
    return load_checkpoint_file(ckpt, map_location="cpu", weights_only=True)


def datamodule_args(ckpt: Checkpoint) -> dict[str, Any]:
    """The `TextDataModule` init arguments a run saved in its checkpoint; ValueError when there are none or
    they are not a TextDataModule's."""
    checkpoint = read_checkpoint(ckpt)
    where = f"checkpoint {str(ckpt)!r}" if not isinstance(ckpt, Mapping) else "the checkpoint"
    args = checkpoint.get(DATAMODULE_KEY)
    if not isinstance(args, Mapping) or not args:
        raise ValueError(
            f"{where} holds no {DATAMODULE_KEY!r}: it was not written by a run with a TextDataModule "
            "(train.py fit with a GPT config saves them), so its tokenizer is unknown"
        )
    class_path = args.get("_class_path")  # LightningCLI records the class it instantiated
    if class_path is not None and str(class_path).rsplit(".", 1)[-1] != TextDataModule.__name__:
        raise ValueError(
            f"{where} was written with the data module {class_path!r}; a tokenizer comes only from a "
            "TextDataModule run"
        )
    # LightningCLI's own entries (_class_path, _instantiator) are not init arguments
    args = {k: v for k, v in args.items() if not k.startswith("_")}
    accepted = set(inspect.signature(TextDataModule.__init__).parameters) - {"self"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ValueError(
            f"{where} was written with a data module that is not a TextDataModule (unknown init arguments "
            f"{unknown}); valid: {sorted(accepted)}"
        )
    return dict(args)


def datamodule_from_checkpoint(ckpt: Checkpoint) -> TextDataModule:
    """The run's `TextDataModule`, rebuilt from its saved init arguments (not set up: nothing is read yet)."""
    return TextDataModule(**datamodule_args(ckpt))


def tokenizer_from_checkpoint(ckpt: Checkpoint) -> TextTokenizer:
    """The tokenizer a run trained with, from its checkpoint (a path or the loaded dict); see the module
    docstring for where each kind comes from. Errors (ValueError / FileNotFoundError) name what is missing."""
    saved = read_checkpoint(ckpt).get(TextDataModule.__qualname__, {}).get("tokenizer")
    if saved:  # TextDataModule.state_dict: the tokenizer itself travels in the checkpoint
        return tokenizer_from_state(saved)
    datamodule = datamodule_from_checkpoint(ckpt)
    if datamodule.tokenizer_name == "bpe":
        datamodule.setup()  # finds the trained BPE in the data cache (or beside a .bin source)
    return datamodule.tokenizer


def bpe_from_file(path: Path, vocab_size: int) -> Any:
    """Our byte-level BPE from a tokenizers JSON file; ValueError naming the file when it is not one."""
    from tokenizers import Tokenizer

    try:
        return BPETokenizer(Tokenizer.from_file(str(path)), vocab_size)
    except Exception as err:  # tokenizers raises its own Exception type for a bad file
        raise ValueError(f"{str(path)!r} is not a tokenizers JSON file ({err})") from err


def tokenizer_from_spec(spec: str, vocab_size: int) -> tuple[Any, str]:
    """(TextTokenizer, how it was found) for --tokenizer: 'bytes', a tokenizer.json, a directory holding
    one of ours or a transformers tokenizer, or a transformers hub name."""
    if spec == "bytes":
        return ByteTokenizer(), "--tokenizer bytes"
    path = Path(spec).expanduser()
    if path.is_file():
        return bpe_from_file(path, vocab_size), f"--tokenizer {spec!r}"
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file():
            return HFTokenizer(str(path)), f"--tokenizer {spec!r} (a transformers tokenizer directory)"
        if (path / "tokenizer.json").is_file():
            return bpe_from_file(path / "tokenizer.json", vocab_size), f"--tokenizer {spec!r}"
        raise FileNotFoundError(
            f"--tokenizer {spec!r} is a directory without tokenizer.json or tokenizer_config.json"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:  # not a hub id
        raise FileNotFoundError(
            f"--tokenizer {spec!r} does not exist; valid: 'bytes', a tokenizer.json file, a tokenizer "
            "directory, or a transformers hub name"
        )
    return HFTokenizer(spec), f"--tokenizer {spec!r} (transformers)"
