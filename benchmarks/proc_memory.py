"""Resident-memory readings from /proc for the CPU benchmarks (Linux): the peak-RSS mark and its reset."""

from __future__ import annotations

from pathlib import Path


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark (VmHWM) to the current RSS and return that RSS in bytes (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")
