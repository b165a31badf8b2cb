"""Fault tolerance: atomic files, a lock per training folder, damaged-checkpoint fallback, non-finite steps.

A checkpoint is first written to a hidden temporary file next to its final name (``.NAME.PID-RANDOM.tmp``),
flushed and fsynced, then renamed over the final name with ``os.replace`` (atomic on POSIX file systems) and the
folder is fsynced. A process killed at any moment therefore leaves either the previous complete file or the new
complete file, plus at most one temporary file that nnU-Net never reads and :func:`remove_stale_temp_files`
deletes.

Other outputs (segmentations, probabilities, JSON) go through :func:`staged_file`: the writer gets a path inside a
private folder created with an unpredictable name (``tempfile.mkdtemp``: exclusive creation, mode 0700), so a
planted file or symlink can never be written through, and the result is renamed into place only when complete.
A training holds an exclusive lock on its fold folder (:func:`lock_folder`) for its lifetime, so two trainings
never write the same checkpoints; :func:`intact_checkpoint` finds the newest undamaged checkpoint for ``--c``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

import torch
import torch.distributed as dist

TEMP_SUFFIX = ".tmp"
# errno values that mean "the file system cannot take more data"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous file under that name is unchanged."""


class FolderBusyError(RuntimeError):
    """Another process holds the lock of this folder (e.g. a training of the same fold is running)."""


class DamagedCheckpointError(RuntimeError):
    """No intact checkpoint to load; the message names every damaged file and what is wrong with it."""


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


# ---- staged outputs (segmentations, probabilities, JSON) -------------------------------------------------------
PARTIAL_MARK = ".partial-"
STAGED_NAME = 200  # characters of the file's name in its staging folder's name (".NAME.partial-PID-RANDOM")
# .NAME.partial-PID-RANDOM (a private folder of staged_file, holding at most NAME...) or .NAME.partial-PID.ENDING with
# NAME ending in .ENDING (older releases' files): only what this package makes, never e.g. a user's .x.partial-1.txt
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)(?:-(?P<random>[A-Za-z0-9_]+)|(?P<ending>\.[^-]+))")


def _made_by_staging(entry: Path) -> re.Match | None:
    """The name's match if ``entry`` is what :func:`staged_file` (or an older release) leaves, else None."""
    match = _PARTIAL.fullmatch(entry.name)
    if match is None:
        return None
    if match["random"] is not None:
        staged = entry.is_dir() and not entry.is_symlink() and len(inside := list(entry.iterdir())) <= 1
        staged = staged and all(p.name.startswith(match["name"]) for p in inside)
        return match if staged else None
    return match if match["name"].endswith(match["ending"]) and not entry.is_dir() else None


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s content to; renamed to ``path`` when the body ends without error.

    The temporary path lies in a new private folder next to ``path`` (``.NAME.partial-PID-RANDOM``, created
    exclusively by ``tempfile.mkdtemp``) and keeps ``path``'s name, so writers choose the same format by its
    ending. On any error the folder is removed and ``path`` is untouched. A process killed meanwhile leaves the
    folder, which :func:`remove_stale_partial_files` deletes.
    """
    path = Path(path)
    # the name shortened so that the folder's name stays within 255 bytes for any file name that itself fits
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name[:STAGED_NAME]}{PARTIAL_MARK}{os.getpid()}-", dir=path.parent))
    try:
        yield str(folder / path.name)
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text_file(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` completely or not at all (flushed and fsynced before the rename)."""
    with staged_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete what :func:`staged_file` (or an older release's checked write) left in ``folder`` when its process
    was killed. Entries of processes still running (another part of the same prediction) are kept; symlinks are
    removed, never followed."""
    removed = []
    for entry in Path(folder).iterdir():
        match = _made_by_staging(entry)
        if match is None or _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ---- one training per fold folder ------------------------------------------------------------------------------
LOCK_FILE = ".nnunet_sam_training.lock"
_HELD_LOCKS: list = []  # open flock files and HolderFileLocks of this process


def _drop_locks_in_child() -> None:
    """Close, in a process just forked (nnU-Net's data-augmentation workers), the lock files its parent holds.

    An flock belongs to the open file, which a fork shares: a worker left behind when its training is killed (under
    torchrun each rank leads its own session, so killing the node's session misses the rank's workers, which then
    wait forever on their queue) would hold the lock, and ``--c`` would be refused naming a dead PID. Closing the
    child's copy leaves the parent's lock as it is.
    """
    for handle in _HELD_LOCKS:
        if not handle.closed:
            handle.close()
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


# errno values of a file system that does not support flock (some NFS and Lustre mounts)
FLOCK_UNSUPPORTED_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
HOLDER_FILE = ".nnunet_sam_training.holder"  # the fallback lock: exists while held


class HolderFileLock:
    """An exclusive lock without ``flock``: the file ``HOLDER_FILE``, created with ``O_CREAT | O_EXCL`` (atomic also
    on NFSv3+ and Lustre), holding ``host PID since ... (command)``.

    ``close()`` removes it (in the process that created it only; a forked child's copy does nothing). A killed
    holder leaves the file: a later :func:`lock_folder` on the same host removes it when that PID no longer runs; a
    holder on another host cannot be checked from here, so the message names the file to delete.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner = os.getpid()
        self.closed = False

    def close(self) -> None:
        if not self.closed and os.getpid() == self.owner:
            self.path.unlink(missing_ok=True)
        self.closed = True


def _busy(folder: Path, what: str, holder: str) -> FolderBusyError:
    return FolderBusyError(
        f"another {what} is running in {folder}: {holder}. Two runs would overwrite each other's "
        f"checkpoints; wait for it to end (or stop it), or use another fold, trainer or plans."
    )


def _holder_line() -> str:
    return f"PID {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)})"


def _holder_file_lock(folder: Path, what: str) -> HolderFileLock:
    """The fallback of :func:`lock_folder` where the file system has no ``flock``."""
    path = folder / HOLDER_FILE
    host = socket.gethostname()
    for _ in range(2):  # a second try after removing a stale holder file
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:  # released meanwhile
                continue
            holder_host, _, rest = holder.partition(" ")
            pid = re.match(r"PID (\d+)", rest)
            if holder_host == host and pid is not None and not _process_alive(int(pid.group(1))):
                print(f"Removing the stale lock {path} of a stopped process ({holder})", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            where = "this host" if holder_host == host else f"host {holder_host}"
            raise _busy(
                folder,
                what,
                f"{rest or 'another process'} on {where} (lock file {path}; if that process no "
                "longer runs, delete the file)",
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{host} {_holder_line()}\n")
            f.flush()
            os.fsync(f.fileno())
        return HolderFileLock(path)
    raise _busy(folder, what, f"the lock file {path} keeps reappearing")


def lock_folder(folder: str | os.PathLike, what: str = "training") -> TextIO | HolderFileLock:
    """Hold an exclusive lock on ``folder`` until the returned handle is closed or the process ends (``flock``: the
    kernel releases it even on SIGKILL). Raises :class:`FolderBusyError` naming the process holding it.

    Where the file system does not support ``flock`` (some NFS and Lustre mounts refuse it with ENOLCK or
    EOPNOTSUPP), a warning says so and the lock is an exclusively created file naming the holder's host and PID
    (:class:`HolderFileLock`).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise _busy(folder, what, holder) from None
    except OSError as error:
        handle.close()
        if error.errno not in FLOCK_UNSUPPORTED_ERRNOS:
            raise
        print(
            f"WARNING: the file system of {folder} does not support flock ({error.strerror}); locking the folder "
            f"with the file {HOLDER_FILE} instead (host and PID of this process, removed when the training ends)",
            file=sys.stderr,
        )
        lock = _holder_file_lock(folder, what)
        _HELD_LOCKS[:] = [h for h in _HELD_LOCKS if not h.closed] + [lock]
        return lock
    handle.seek(0)
    handle.truncate()
    handle.write(f"{_holder_line()}\n")
    handle.flush()
    _HELD_LOCKS[:] = [h for h in _HELD_LOCKS if not h.closed] + [handle]
    return handle


# ---- no process left behind -------------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1
_fork_from_main_thread = [False]
_prctl: list = []  # libc's prctl, looked up in the parent (a forked child of a threaded process must not dlopen)


def _before_fork() -> None:
    _fork_from_main_thread[0] = threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In a process just forked: ask the kernel for SIGKILL when the parent ends (``PR_SET_PDEATHSIG``).

    The kernel sends it when the forking *thread* ends, so only children forked by the main thread get it (the
    main thread ends with the process).
    """
    if not _fork_from_main_thread[0]:
        return
    parent = os.getppid()
    _prctl[0](_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the request: nobody to work for
        os._exit(1)


def workers_die_with_parent() -> None:
    """From now on, every child this process forks (nnU-Net's data-augmentation workers: batchgenerators forks them
    with ``multiprocessing``) is killed by the kernel when this process ends, even by SIGKILL. Linux only; a no-op
    elsewhere. Children started with ``spawn``/``subprocess`` are not affected."""
    if _prctl or not sys.platform.startswith("linux") or not hasattr(os, "register_at_fork"):
        return
    _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
    os.register_at_fork(before=_before_fork, after_in_child=_die_with_parent)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "PID (name) STATE"
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int | None = None) -> list[int]:
    """The PIDs of every process below ``pid`` (default: this process), children first; [] without /proc."""
    if not Path("/proc/self/stat").exists():
        return []
    children = _children_map()
    found, queue = [], [os.getpid() if pid is None else pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def end_process_tree(grace_s: float = 2.0) -> list[int]:
    """End every process below this one (data-augmentation workers and their children): SIGTERM, then SIGKILL
    after ``grace_s`` seconds for those still running. Returns the PIDs signalled."""
    pids = descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.05)
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a child that ended but was not yet waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# ---- damaged checkpoints ---------------------------------------------------------------------------------------
CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the torch checkpoint ``path`` (missing, empty, truncated, a corrupt member), or None.

    torch writes a zip archive: the check reads its directory and every member's CRC, and unpickles nothing.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "an empty (0-byte) file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"damaged or truncated ({type(error).__name__}: {error})"
    if bad is not None:
        return f"damaged (member {bad} fails its CRC check)"
    return None


def intact_checkpoint(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``path`` if it is an intact checkpoint; else the first intact one of :data:`CHECKPOINT_ORDER` in its folder,
    with a note saying which file is damaged and which one is used. Raises :class:`DamagedCheckpointError`."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is None:
        return path, None
    problems = {path.name: problem}
    for name in CHECKPOINT_ORDER:
        candidate = path.with_name(name)
        if name in problems or not candidate.exists():
            continue
        problems[name] = checkpoint_problem(candidate)
        if problems[name] is None:
            return candidate, f"{path} is {problem}; continuing from {name} instead"
    listed = "; ".join(f"{name}: {what}" for name, what in problems.items())
    raise DamagedCheckpointError(
        f"no intact checkpoint in {path.parent} ({listed}). Start the training again without --c "
        "(or restore a checkpoint from a backup)."
    )
