"""Atomic and asynchronous checkpoint writing as Lightning `CheckpointIO` plugins.

What Lightning 2.6 does itself (lightning.fabric.utilities.cloud_io._atomic_save, fsspec's local
filesystem): `TorchCheckpointIO` serialises the whole checkpoint into an in-memory buffer, then writes it
inside an fsspec transaction, which on a local path writes a temporary file made by `tempfile.mkstemp()`
in $TMPDIR (not beside the target) and on commit `shutil.move`s it onto the target. So a crash mid-write
does not leave a partial file under the real name when $TMPDIR is on the target's filesystem (the move is
a rename). It leaves these gaps: the whole serialised file is held in memory before a byte is written
(as much extra memory as the checkpoint file); when $TMPDIR is on another filesystem the rename fails with
EXDEV and the move copies the bytes onto the final name in place, so a crash then can leave a truncated
checkpoint there; nothing is fsynced, so after a power loss or kernel crash the renamed file can be empty
or short; and a killed writer's temporary stays in $TMPDIR. `AsyncCheckpointIO` clones the tensors on the
calling thread (on their device) and saves on a one-thread pool, but `remove_checkpoint` runs at once on
the training thread, so `save_top_k` pruning can overtake a queued write of the file it deletes (Lightning
issue 14035).

What this module does instead, on local paths (remote ones go to Lightning's): `torch.save` streams
into a temporary file in the target's own directory (no in-memory copy; the rename is always on one
filesystem), the file is fsynced, renamed over the target and the directory fsynced; temporaries a killed
writer left are removed at the first save into a directory. The async variant copies the state to host
memory and runs writes and deletions on ONE ordered background queue, so a deletion never overtakes a
write. `benchmarks/checkpoint_stall.py` measures the stall, each writer's time and added memory, and the
fsync's share (results in docs/benchmarks.md).

    trainer:
      plugins:
        - class_path: callbacks.AsyncAtomicCheckpointIO
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupted or not a checkpoint)."""


TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary sibling, fsync, then rename over `path`: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None
) -> Any:
    """torch.load with a clear error naming the file when it is missing, truncated or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not a checkpoint
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} ({path.stat().st_size} bytes) is truncated or corrupted, or not a PyTorch "
            "checkpoint at all; resume from an earlier checkpoint (e.g. last.ckpt or a periodic one)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=bool(weights_only))
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise
        size = path.stat().st_size
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupted and cannot be loaded "
            f"({type(err).__name__}); resume from an earlier checkpoint (e.g. last.ckpt or a top-k file)"
        ) from None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files a killed writer left behind in `directory`; returns what was removed."""
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _is_local(path: Any) -> bool:
    return get_filesystem(path).protocol in ("file", "local", ("file", "local"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Synchronous checkpoint writes, made atomic (temporary file + fsync + rename)."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned_dirs: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)  # remote filesystems: fsspec's own semantics
        directory = Path(path).parent
        if directory not in self._cleaned_dirs and directory.is_dir():
            for stale in remove_stale_temporaries(directory):
                log.warning("removed a partial checkpoint left by an interrupted write: %s", stale)
        self._cleaned_dirs.add(directory)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location or "cpu", weights_only=weights_only)


def _same_view_key(t: torch.Tensor) -> tuple | None:
    """What makes two tensors the same view of the same memory (tied weights); None when it can't be told."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _to_cpu_snapshot(obj: Any, memo: dict[tuple, torch.Tensor] | None = None) -> Any:
    """Copy every tensor off the device (or clone CPU ones) so training can keep mutating the originals.

    Tensors that are the same view of the same memory (tied embedding and output weights) become one copy,
    as torch.save would have stored them: cloned one by one they would be written twice."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = _same_view_key(obj)
        if key is not None and key in memo:
            return memo[key]
        copy = obj.detach().clone() if obj.device.type == "cpu" else obj.detach().to("cpu", non_blocking=True)
        if key is not None:
            memo[key] = copy
        return copy
    if isinstance(obj, dict):
        return {k: _to_cpu_snapshot(v, memo) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu_snapshot(v, memo) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_cpu_snapshot(v, memo) for v in obj)
    return obj


class AsyncAtomicCheckpointIO(AtomicCheckpointIO):
    """Atomic writes in a background thread; the training step only pays for the device-to-host copy.

    Writes and deletions run in submission order on one thread. `teardown` (end of fit, exceptions and
    SIGTERM all reach it through the strategy) waits for every pending write. A failed background write
    is re-raised on the training thread at the next save or at teardown."""

    def __init__(self, max_pending: int = 2) -> None:
        super().__init__()
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="checkpoint-writer", daemon=True)
                self._thread.start()

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except BaseException as err:  # surfaced on the training thread
                log.error("background checkpoint job failed: %s", err)
                self._error = self._error or err
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"an asynchronous checkpoint write failed: {err}") from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._raise_pending_error()
        snapshot = _to_cpu_snapshot(checkpoint)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non_blocking copies must land before the writer reads them
        self._ensure_thread()
        self._queue.put(lambda: AtomicCheckpointIO.save_checkpoint(self, snapshot, path, storage_options))

    def remove_checkpoint(self, path: Any) -> None:
        self._ensure_thread()
        self._queue.put(lambda: TorchCheckpointIO.remove_checkpoint(self, path))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self.wait()  # never read a file whose write is still queued
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def wait(self) -> None:
        """Block until every queued write and deletion has finished; re-raise a failure."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()
        self._raise_pending_error()

    def teardown(self) -> None:
        self.wait()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        super().teardown()
