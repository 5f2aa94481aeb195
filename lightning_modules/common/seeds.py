"""Deterministic seeds derived from a few integers (per rank, step, batch index, data split...)."""

from __future__ import annotations


def mixed_seed(a: int, b: int, c: int, d: int) -> int:
    """A distinct 63-bit seed per (a, b, c, d) for the small non-negative values used here."""
    mixed = ((a * 1_000_003 + b) * 1_000_033 + c) * 2_147_483_659 + d
    return mixed % (2**63 - 1)
