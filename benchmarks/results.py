"""Where every benchmark's figures go: benchmarks/results/<name>.json, with what they were measured on.

Each benchmark calls `run_metadata()` before it starts timing (load average before) and `write_results`
at the end (load average after); `python -m benchmarks.report` turns the committed files into the tables
in docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line() -> str:
    """This process's command line as typed from the repository root (script path made relative to it)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    argv0 = sys.argv[0] if sys.argv else ""
    if script is not None and script.is_file() and script.is_relative_to(REPO_ROOT):
        argv0 = str(script.relative_to(REPO_ROOT))
    return shlex.join(["python", argv0, *sys.argv[1:]])


def run_metadata() -> dict[str, Any]:
    """Commit (with a dirty flag), date, machine, versions, command line and the load average before."""
    import torch

    meta: dict[str, Any] = {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command_line(),
        "load_before": load_average(),
    }
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["cuda"] = torch.version.cuda
    return meta


def write_results(name: str, meta: dict[str, Any], results: dict[str, Any], out: Path | None = None) -> Path:
    """Write {"meta": meta + load_after, "results": results} to benchmarks/results/<name>.json (or out)."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": {**meta, "load_after": load_average()}, "results": results}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
