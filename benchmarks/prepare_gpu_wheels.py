"""Put the wheels benchmarks/gpu_suite.py needs on an offline GPU machine into one folder under 64 MiB.

The GPU image has torch, lightning, transformers, torchmetrics and tensorboard, but no jsonargparse (train.py's
LightningCLI) and no DeepSpeed, and it cannot reach a package index. This script, run where pip can download,
fetches them and their missing dependencies for the image's platform (Linux x86_64, CPython --python-version),
checks that they resolve offline for that platform, and fails when the folder is over --max-mib. The suite
installs from the folder with `pip install --no-index --find-links DIR ...` when a package is missing.

    python benchmarks/prepare_gpu_wheels.py                         # -> data_cache/gpu_wheels (git-ignored)
    python benchmarks/prepare_gpu_wheels.py --python-version 3.12 --dest data_cache/gpu_wheels

Binary wheels come from `pip download --only-binary=:all:` with explicit --python-version, --implementation,
--abi and --platform (pip matches each manylinux tag exactly, hence the list). DeepSpeed is published as a
source archive only: it is built here into a pure-Python wheel with DS_BUILD_OPS=0 (no compiled ops; DeepSpeed
compiles an op just in time if a run needs one, which ZeRO 2/3 with a torch optimizer does not).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = "data_cache/gpu_wheels"  # relative to the repository root; data_cache/ is git-ignored
# The versions the project's tests run with; their dependencies are resolved by pip for the target platform.
BINARY = ["jsonargparse[signatures]==4.53.0", "pydantic==2.14.4", "hjson==3.1.0"]
DEEPSPEED = "deepspeed==0.19.8"  # needs hjson and pydantic (above); torch, numpy, ninja, ... are in the image
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".zip")


def target_args(python_version: str) -> list[str]:
    """pip's options that name the GPU image's interpreter and platform instead of this machine's."""
    tag = "cp" + python_version.replace(".", "")
    out = ["--python-version", python_version, "--implementation", "cp", "--abi", tag]
    for platform in PLATFORMS:
        out += ["--platform", platform]
    return out


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    """Run `python -m pip ARGS`, echoing the command; exit with pip's status when it fails."""
    cmd = [sys.executable, "-m", "pip", *args]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        sys.exit(f"pip failed (exit {done.returncode}): {' '.join(args[:2])}")


def folder_mib(folder: Path) -> float:
    """Total size of the files in `folder`, MiB."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def prepare(dest: Path, python_version: str, max_mib: float) -> float:
    """Download / build every wheel into `dest` (emptied of older archives first); return its size in MiB."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():  # one version of each package: two would stop the offline install
        if old.is_file() and old.name.endswith(ARCHIVE_SUFFIXES):
            old.unlink()
    target = target_args(python_version)
    pip("download", "--only-binary=:all:", *target, "--dest", str(dest), *BINARY)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "--no-binary=:all:", "--dest", tmp, DEEPSPEED)
        (sdist,) = Path(tmp).glob("deepspeed-*")
        pip(
            "wheel",
            "--no-deps",
            "--wheel-dir",
            str(dest),
            str(sdist),
            env={**os.environ, "DS_BUILD_OPS": "0"},
        )
        # Offline resolution for the target platform, as the suite will run it (DeepSpeed's own needs, torch and
        # the rest, are in the image, so it is checked without them).
        check = ["install", "--isolated", "--dry-run", "--ignore-installed", "--no-index", "--find-links"]
        check += [str(dest)]  # --isolated: this machine's pip configuration adds no other source
        check += ["--only-binary=:all:", "--target", str(Path(tmp) / "site"), *target]
        pip(*check, *BINARY)
        pip(*check, "--no-deps", DEEPSPEED)
    size = folder_mib(dest)
    for path in sorted(dest.iterdir()):
        print(f"  {path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"{dest}: {size:.1f} MiB in {sum(1 for _ in dest.iterdir())} files (limit {max_mib:.0f} MiB)")
    if size > max_mib:
        sys.exit(
            f"{dest} holds {size:.1f} MiB, over the {max_mib:.0f} MiB that can travel to the GPU machine"
        )
    return size


def main() -> None:
    """Parse arguments and prepare the folder."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", default=DEFAULT_DEST, help="folder, relative to the repository root")
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python (major.minor)")
    parser.add_argument("--max-mib", type=float, default=64.0, help="fail when the folder is larger")
    args = parser.parse_args()
    dest = Path(args.dest) if Path(args.dest).is_absolute() else ROOT / args.dest
    prepare(dest, args.python_version, args.max_mib)


if __name__ == "__main__":
    main()
