"""Runs the command blocks of README.md and docs/*.md that are marked runnable, so the docs cannot drift.

Convention (in the Markdown source):

- A line `<!-- runnable -->` immediately before a fenced ```bash block marks the block runnable.
- `<!-- runnable: ARGS -->` also appends ARGS to every command line of the block that starts with
  `python train.py`, so a long job runs in seconds, e.g.
  `<!-- runnable: --trainer.max_steps 2 --trainer.limit_val_batches 1 -->`.
- `<!-- runnable-slow: ARGS -->` (ARGS optional) marks a block that takes more than ~30 s even with its
  ARGS; it runs only with `pytest -m slow`.
- Lines ending in a backslash are joined with the next; blank lines and comment lines are skipped, and a
  trailing ` # comment` is cut from a command line before ARGS are appended.
- Each block runs as one bash script (`set -euo pipefail`) in a fresh temporary directory in which the
  repository's top-level entries (train.py, configs/, lightning_modules/, ...) are symlinked, so
  `lightning_logs/` and data caches land there; `python` is this interpreter (its bin directory first on
  PATH) and PYTHONPATH is the repository root.
- A block with `pip install` or `python -m venv` must not be marked: its test fails saying so.

One test case per block, with the id `file:line` (the marker's line, 1-based).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINKED = (
    "train.py", "configs", "lightning_modules", "datamodules", "callbacks", "benchmarks", "tests",
    "pyproject.toml",
)  # fmt: skip
MARKER = re.compile(r"^<!--\s*(runnable|runnable-slow)\s*(?::(.*?))?\s*-->$")
FORBIDDEN = ("pip install", "python -m venv", "python3 -m venv")
TRAIN = re.compile(r"^python\s+train\.py(\s|$)")


@dataclass(frozen=True)
class Block:
    """One marked command block: where it is, its commands (ARGS appended) and whether it is slow."""

    path: str
    line: int
    commands: tuple[str, ...]
    slow: bool

    @property
    def id(self) -> str:
        """`file:line` of the marker: the pytest id."""
        return f"{self.path}:{self.line}"

    def script(self) -> str:
        """The bash script the block runs as."""
        return "\n".join(["set -euo pipefail", *self.commands]) + "\n"


def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` at the start or after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def block_commands(body: list[str], args: str) -> list[str]:
    """Join continued lines, drop blanks and comments, append `args` to `python train.py` lines."""
    joined, pending = [], ""
    for raw in body:
        line = raw.rstrip()
        if not pending and line.lstrip().startswith("#"):
            continue  # a comment line: a trailing backslash does not continue it
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        joined.append(pending + line.strip())
        pending = ""
    if pending:
        joined.append(pending.strip())
    commands = []
    for line in joined:
        command = strip_comment(line)
        if not command:
            continue
        if args and TRAIN.match(command):
            command = f"{command} {args}"
        commands.append(command)
    return commands


def parse_markdown(text: str, path: str) -> list[Block]:
    """The marked ```bash blocks of one Markdown text; a marker not directly above one is a ValueError."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if fence != "```bash":
            raise ValueError(
                f"{path}:{i + 1}: a runnable marker must be followed by a ```bash line, got {fence!r}"
            )
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 2}: the ```bash block is never closed")
        commands = block_commands(lines[i + 2 : end], (match.group(2) or "").strip())
        blocks.append(Block(path, i + 1, tuple(commands), slow=match.group(1) == "runnable-slow"))
    return blocks


def documented_files() -> list[Path]:
    """README.md and docs/*.md."""
    return [f for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if f.is_file()]


def documented_blocks() -> list[Block]:
    """Every marked block of the documented files that parse (test_markers_are_well_formed checks all)."""
    blocks = []
    for f in documented_files():
        try:
            blocks += parse_markdown(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))
        except ValueError:
            continue
    return blocks


def check_runnable(block: Block) -> None:
    """Raise ValueError when a marked block has nothing to run or would install software."""
    if not block.commands:
        raise ValueError(f"{block.id}: the marked block has no command")
    forbidden = [word for word in FORBIDDEN if word in block.script()]
    if forbidden:
        raise ValueError(f"{block.id}: a runnable block must not contain {forbidden}; remove its marker")


def test_markers_are_well_formed() -> None:
    for f in documented_files():
        parse_markdown(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))


@pytest.fixture(scope="session")
def shared_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data_cache for every block: the tokenizer and token files are built once, not per block."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(block, id=block.id, marks=[pytest.mark.slow] if block.slow else [])
        for block in documented_blocks()
    ],
)
def test_documented_commands_run(block: Block, tmp_path: Path, shared_data_cache: Path) -> None:
    check_runnable(block)
    for name in LINKED:
        if (ROOT / name).exists():
            (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "data_cache").symlink_to(shared_data_cache, target_is_directory=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
    }
    script = block.script()
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600 if block.slow else 600,
    )
    assert result.returncode == 0, (
        f"{block.id} failed (exit {result.returncode}):\n{script}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-6000:]}"
    )


SAMPLE = """\
# Title

<!-- runnable: --trainer.max_steps 2 --trainer.limit_val_batches 1 -->
```bash
# train briefly \\
python train.py fit --config configs/gpt2/tiny.yaml \\
    --data.init_args.batch_size 4   # small batch

ls lightning_logs
python benchmarks/gpt_speed.py --size tiny
```

```bash
python train.py fit --config configs/gpt2/d12.yaml
```

<!-- runnable-slow -->
```bash
python train.py validate --config "configs/a#b.yaml"
```
"""


def test_parser_finds_marked_blocks_and_appends_args() -> None:
    fast, slow = parse_markdown(SAMPLE, "doc.md")  # the unmarked d12 block is ignored
    assert (fast.id, fast.slow, slow.id, slow.slow) == ("doc.md:3", False, "doc.md:17", True)
    assert fast.commands == (
        "python train.py fit --config configs/gpt2/tiny.yaml --data.init_args.batch_size 4 "
        "--trainer.max_steps 2 --trainer.limit_val_batches 1",
        "ls lightning_logs",
        "python benchmarks/gpt_speed.py --size tiny",  # not `python train.py`: nothing appended
    )
    assert slow.commands == ('python train.py validate --config "configs/a#b.yaml"',)  # quoted #: kept
    assert fast.script().startswith("set -euo pipefail\n")


def test_parser_rejects_a_marker_without_a_bash_block() -> None:
    with pytest.raises(ValueError, match=r"doc.md:1: .*```bash"):
        parse_markdown("<!-- runnable -->\n\n```bash\nls\n```\n", "doc.md")
    with pytest.raises(ValueError, match="never closed"):
        parse_markdown("<!-- runnable -->\n```bash\nls\n", "doc.md")


def test_blocks_that_install_software_or_run_nothing_are_rejected() -> None:
    (install,) = parse_markdown("<!-- runnable -->\n```bash\npip install -e .\n```\n", "doc.md")
    with pytest.raises(ValueError, match=r"doc.md:1: .*pip install"):
        check_runnable(install)
    (venv,) = parse_markdown("<!-- runnable -->\n```bash\npython -m venv .venv\n```\n", "doc.md")
    with pytest.raises(ValueError, match="venv"):
        check_runnable(venv)
    (empty,) = parse_markdown("<!-- runnable -->\n```bash\n# only a comment\n```\n", "doc.md")
    with pytest.raises(ValueError, match="no command"):
        check_runnable(empty)
    (fast, _) = parse_markdown(SAMPLE, "doc.md")
    check_runnable(fast)
