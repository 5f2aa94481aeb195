"""One check that the data fits the model: token ids inside its embedding, windows inside its positions."""

from __future__ import annotations

from typing import Any


def check_data_fits(
    model_name: str,
    vocab_size: int | None = None,
    embed_rows: int | None = None,
    block_size: int | None = None,
    max_positions: int | None = None,
) -> None:
    """ValueError naming the value and the limit when the data's vocabulary exceeds the model's embedding
    rows or its windows exceed the model's positions; None on either side skips that check."""
    if vocab_size is not None and embed_rows is not None and vocab_size > embed_rows:
        raise ValueError(
            f"the data has {vocab_size} tokens but {model_name} embeds only {embed_rows}; use that model's "
            f"tokenizer or one with <= {embed_rows} tokens"
        )
    if block_size is not None and max_positions is not None and block_size > max_positions:
        raise ValueError(
            f"data block_size={block_size} exceeds {model_name}'s positions ({max_positions}); set "
            f"data.init_args.block_size <= {max_positions}"
        )


def datamodule_of(module: Any) -> Any:
    """The trainer's datamodule, or None (no trainer attached, or a run without a datamodule)."""
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer, "datamodule", None) if trainer is not None else None
