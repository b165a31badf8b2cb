"""Fault tolerance for long trainings: atomic checkpoint files and a check for non-finite training steps.

A checkpoint is first written to a hidden temporary file next to its final name (``.NAME.PID-RANDOM.tmp``),
flushed and fsynced, then renamed over the final name with ``os.replace`` (atomic on POSIX file systems) and the
folder is fsynced. A process killed at any moment therefore leaves either the previous complete file or the new
complete file, plus at most one temporary file that nnU-Net never reads and :func:`remove_stale_temp_files`
deletes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist

TEMP_SUFFIX = ".tmp"
# errno values that mean "the file system cannot take more data"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous file under that name is unchanged."""


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


def temp_name(path: Path) -> Path:
    """A unique hidden temporary file in the folder of ``path`` (same file system, so renaming is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` (for cleaning up after a killed process)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and ".pth." in path.name


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` only once everything written to it is on disk.

    Use as ``with atomic_write(p) as f: torch.save(obj, f)``. If the body or the write fails, the temporary file is
    removed and ``path`` is untouched; a full disk raises :class:`CheckpointWriteError` naming ``path``.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        code = disk_full_errno(e)
        if code is not None:
            raise CheckpointWriteError(
                code,
                f"[{errno.errorcode[code]}] {os.strerror(code)} while writing the checkpoint {path}. "
                f"Nothing was replaced: the previous {path.name} (if any) is intact. Free some space in "
                f"{path.parent} and continue the training with --c.",
            ) from e
        raise
    fsync_directory(path.parent)


def disk_full_errno(error: BaseException) -> int | None:
    """The disk-full errno behind ``error``, if any.

    torch.save turns a failed write into a RuntimeError of its zip writer; the OSError is its ``__context__``.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where the platform cannot open or sync folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files left by a killed process in ``folder``; returns what was removed."""
    removed = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if is_temp_file(p)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def all_finite(*values: torch.Tensor, across_ranks: bool = False) -> bool:
    """True if every element of every tensor is finite (on every DDP rank if ``across_ranks``).

    One host synchronisation per call. With ``across_ranks`` all ranks get the same answer, so they skip or take
    an optimiser step together and their weights stay identical.
    """
    ok = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().to(torch.int32)
    if across_ranks:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)
