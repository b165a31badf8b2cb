"""Training on any number of nodes under PyTorch's torchrun: process group, rank devices, lost ranks.

torchrun (``torch.distributed.run``) starts one process per device on every node and tells each its place through
the environment: ``RANK`` (global), ``LOCAL_RANK`` (on its node), ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``
(the rendezvous store). :func:`start` joins the process group (NCCL on GPUs, gloo on CPUs) with a timeout on
collectives and starts a :class:`RankMonitor`, which names a rank that died or stalled and stops the others
instead of letting them wait in a collective.

nnU-Net's trainer does the rest as for ``nnUNetv2_train -num_gpus``: it splits the global batch over the
``WORLD_SIZE`` ranks (``_set_batch_size_and_oversample``), and writes checkpoints, logs and progress.png on global
rank 0 only (its ``local_rank`` attribute holds the global rank). The SAM trainers add the rest through
:func:`rank_device`, :func:`nnunet_ddp_wrapper` with :func:`wrap_ddp`, and :func:`check_batch_split`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunet_sam import exit_codes
from nnunet_sam.training.fault_tolerance import end_process_tree, workers_die_with_parent

TIMEOUT_ENV = "nnUNet_SAM_dist_timeout"
LOST_AFTER_ENV = "nnUNet_SAM_dist_lost_after"
BATCH_PER_PROCESS_ENV = "nnUNet_SAM_batch_per_process"  # set by nnunet_sam_train --batch-per-process
DEFAULT_TIMEOUT_S = 1800.0  # a collective may wait this long (rank 0 alone unpacks data, computes metrics, ...)
DEFAULT_LOST_AFTER_S = 60.0  # a rank whose heartbeat stops this long is lost
HEARTBEAT_S = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's stop, a pre-emption notice (SLURM --signal)


class DistributedSetupError(ValueError):
    """A distributed setting this run cannot use; the message names the fix."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job, from the environment torchrun sets."""

    rank: int
    local_rank: int
    world_size: int
    store_host: str
    store_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> RankInfo | None:
        """None when not started by torchrun (no ``WORLD_SIZE``/``RANK``)."""
        if "WORLD_SIZE" not in environ or "RANK" not in environ:
            return None
        try:
            return cls(
                rank=int(environ["RANK"]),
                local_rank=int(environ.get("LOCAL_RANK", "0")),
                world_size=int(environ["WORLD_SIZE"]),
                store_host=environ["MASTER_ADDR"],
                store_port=int(environ["MASTER_PORT"]),
            )
        except (KeyError, ValueError) as error:
            raise DistributedSetupError(
                f"incomplete torchrun environment ({type(error).__name__}: {error}): RANK, LOCAL_RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT must all be set; start the command with torchrun"
            ) from None


def seconds_from_env(name: str, default: float, environ: Mapping[str, str] = os.environ) -> float:
    """A positive number of seconds from ``environ[name]``, or ``default`` when unset."""
    value = environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedSetupError(f"${name}={value!r}: expected a positive number of seconds (default {default:g})")
    return seconds


def rank_device(requested: torch.device) -> torch.device:
    """This rank's device in a process group.

    CUDA: the current device, which :func:`start` sets from ``LOCAL_RANK`` (nnU-Net's ``-num_gpus`` sets it from
    the rank, on one node). nnU-Net itself picks ``cuda:<global rank>``, which does not exist on a second node, and
    CUDA even for ``-device cpu``. CPU (gloo): ``requested``.
    """
    if requested.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return requested


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Raise :class:`DistributedSetupError` unless ``world_size`` ranks share ``batch_size`` evenly.

    DDP averages the ranks' gradients with equal weights, so only equal shares give the gradient of the whole
    batch, as one process computes it (nnU-Net itself gives the first ranks one sample more).
    """
    if batch_size % world_size:
        fitting = ", ".join(str(n) for n in range(1, batch_size + 1) if batch_size % n == 0)
        raise DistributedSetupError(
            f"the global batch of {batch_size} (the plans' batch_size) cannot be split evenly over {world_size} "
            f"processes, so the gradients would differ from one process's. Start a number of processes in all "
            f"(nodes x --nproc-per-node) that divides {batch_size}: {fitting}; or give each process its own batch "
            "with nnunet_sam_train --batch-per-process B (global batch B x processes)"
        )


def batch_per_process(environ: Mapping[str, str] = os.environ) -> int | None:
    """``$nnUNet_SAM_batch_per_process`` (``nnunet_sam_train --batch-per-process B``): each process's batch; the
    global batch is then B x the number of processes instead of the plans' batch. None when unset."""
    value = environ.get(BATCH_PER_PROCESS_ENV)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise DistributedSetupError(
            f"--batch-per-process / ${BATCH_PER_PROCESS_ENV}={value!r}: expected a whole number >= 1"
        )
    return int(value)


@contextmanager
def nnunet_ddp_wrapper(wrap: Callable[[nn.Module], nn.Module]) -> Iterator[None]:
    """While active, ``nnUNetTrainer.initialize`` wraps its network with ``wrap(network)``.

    nnU-Net's own call, ``DistributedDataParallel(network, device_ids=[rank])``, takes the global rank for a GPU
    index (one node only), refuses CPU modules, and expects every trainable parameter to get a gradient in
    every step.
    """
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module  # keeps this module light

    original = nnunet_trainer_module.DDP
    nnunet_trainer_module.DDP = lambda module, device_ids=None: wrap(module)
    try:
        yield
    finally:
        nnunet_trainer_module.DDP = original


def wrap_ddp(network: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DistributedDataParallel for SAM networks, with unused-parameter detection.

    Some trainable parameters get no gradient in some steps: Self-Prompt-SAM's stage 1 skips SAM's decoder and
    its adapters, and a backbone that trains its SAM weights (tiny, no checkpoint) never uses SAM's IoU head,
    three of its four mask hypernetworks and some prompt embeddings. nnU-Net's wrapper
    (``find_unused_parameters=False``) then stops at the next step; with detection on, such parameters keep
    ``grad=None`` on every rank, as in a one-GPU run, so the optimiser leaves them alone. Frozen parameters
    (``requires_grad=False``) are not in DDP's buckets.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=True)


class RankMonitor:
    """Heartbeats of every rank in the rendezvous store, to name a rank that died or stalled.

    A thread in every rank counts its heartbeat every ``HEARTBEAT_S`` seconds. Rank 0 watches all ranks, the others
    watch rank 0 and an abort note: when a watched rank's count has not moved for ``lost_after`` seconds, the
    watcher prints a message naming it and ends its process with exit code 1; rank 0 first leaves the note, so
    that every rank stops with the same message. A collective that fails first (gloo notices a closed socket at
    once; any backend gives up after the timeout) is explained by :meth:`explain`.
    """

    def __init__(self, info: RankInfo, lost_after: float, attempt: str, store: dist.Store | None = None) -> None:
        if store is None:
            store = dist.TCPStore(
                info.store_host, info.store_port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False
            )
        # one key space per process group: after torchrun restarts a group the keys of the last one are stale (the
        # nodes' TORCHELASTIC_RESTART_COUNTs differ when only one node's worker failed, so they cannot name it)
        self.store = dist.PrefixStore(f"nnunet_sam/attempt_{attempt}", store)
        self.info = info
        self.lost_after = lost_after
        self._stop = threading.Event()
        self._signal_pipe: int | None = None
        self._signal_handler: Callable[[int, object], None] = lambda signum, frame: None
        self._thread = threading.Thread(target=self._watch, name="nnunet_sam rank monitor", daemon=True)
        self.store.set(f"host/{info.rank}", f"{socket.gethostname()}, local rank {info.local_rank}")

    # ---- names and keys ----------------------------------------------------------------------------------------
    def describe(self, rank: int) -> str:
        """``rank 1 (node-b, local rank 0)``."""
        try:
            host = self.store.get(f"host/{rank}").decode()
        except Exception:  # the store is gone
            host = "host unknown"
        return f"rank {rank} ({host})"

    def _beats(self, ranks: list[int]) -> dict[int, int]:
        return {r: self.store.add(f"beat/{r}", 0) for r in ranks}

    def _done(self, rank: int) -> bool:
        """Finished normally or stopped on its own error: either way not lost."""
        return self.store.check([f"done/{rank}"]) or self.store.check([f"failed/{rank}"])

    def _others(self) -> list[int]:
        return [r for r in range(self.info.world_size) if r != self.info.rank]

    # ---- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> RankMonitor:
        self.store.add(f"beat/{self.info.rank}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank finished normally: stop watching, and let the watchers know."""
        self._stop.set()
        self._thread.join()
        try:
            self.store.set(f"done/{self.info.rank}", "1")
        except Exception:  # rank 0's node may have finished and taken the store with it
            pass

    def report_failure(self, error: BaseException) -> None:
        """Leave this rank's own error in the store, for the message of the ranks it leaves waiting.

        The heartbeat goes on until :meth:`stop_watching`: a rank that is still explaining its stop is not lost.
        """
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        try:
            self.store.set(f"failed/{self.info.rank}", f"{type(error).__name__}: {first_line}")
        except Exception:
            pass

    def stop_watching(self) -> None:
        """No more heartbeats or lost-rank checks (this rank is stopping)."""
        self._stop.set()

    def explain(self) -> str | None:
        """After this rank failed: which other ranks reported an error or stopped beating; None if none did.

        Samples the others' heartbeats twice, ``3 * HEARTBEAT_S`` apart, while this rank's heartbeat goes on. A rank
        counts as lost only if its heartbeat stopped and it left no error of its own (every rank that fails leaves
        it, with :meth:`report_failure`, before it explains).
        """
        others = self._others()
        try:
            before = self._beats(others)
            time.sleep(3 * HEARTBEAT_S)
            after = self._beats(others)
            failed = {r: self.store.get(f"failed/{r}").decode() for r in others if self.store.check([f"failed/{r}"])}
            stalled = [r for r in others if after[r] == before[r] and r not in failed and not self._done(r)]
        except Exception as error:
            return self._store_lost(error)
        reasons = [f"{self.describe(r)} failed: {message}" for r, message in failed.items()]
        if stalled:
            reasons.append(self._lost(stalled, 3 * HEARTBEAT_S))
        return "; ".join(reasons) or None

    def _lost(self, ranks: list[int], seconds: float) -> str:
        names = ", ".join(self.describe(r) for r in ranks)
        return (
            f"{names} {'was' if len(ranks) == 1 else 'were'} lost: no heartbeat for {seconds:g} s (killed, "
            "stalled, or its node is gone)"
        )

    def _store_lost(self, error: Exception) -> str:
        return (
            f"the rendezvous store at {self.info.store_host}:{self.info.store_port} does not answer "
            f"({type(error).__name__}: {error}); the node that holds it (the rendezvous endpoint's; rank 0's "
            "without torchrun) was lost"
        )

    def _watch(self) -> None:
        me = self.info.rank
        watched = self._others() if me == 0 else [0]
        seen = {r: (-1, time.monotonic()) for r in watched}
        while not self._stop.wait(HEARTBEAT_S):
            self._check_signals()
            try:
                self.store.add(f"beat/{me}", 1)
                if self.store.check(["abort"]):
                    self._exit(self.store.get("abort").decode())
                now = time.monotonic()
                lost = []
                for rank, count in self._beats(watched).items():
                    if count != seen[rank][0]:
                        seen[rank] = (count, now)
                    elif now - seen[rank][1] > self.lost_after and not self._done(rank):
                        lost.append(rank)
                if lost:
                    note = self._lost(lost, self.lost_after)
                    if me == 0:
                        self.store.set("abort", note)
                    self._exit(note)
            except Exception as error:  # the store is unreachable
                if not self._stop.is_set():
                    self._exit(self._store_lost(error))
                return

    def watch_signals(self, handler: Callable[[int, object], None]) -> None:
        """Run ``handler`` for SIGTERM and SIGUSR1, within a heartbeat even while the main thread waits in a
        collective (where Python's own handler runs only when the collective returns): the signal's number also
        goes to a pipe (``signal.set_wakeup_fd``) that the heartbeat thread reads. Main thread only."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._signal_pipe, self._signal_handler = read, handler
        os.register_at_fork(after_in_child=_default_signals)

    def _check_signals(self) -> None:
        if self._signal_pipe is None:
            return
        try:
            received = os.read(self._signal_pipe, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in STOP_SIGNALS:
                self._signal_handler(signum, None)

    def _exit(self, reason: str) -> None:
        claim_stop()
        stop_message(self.info.rank, reason)
        stop_process(1)


def _default_signals() -> None:
    """In a forked child (an augmentation worker): SIGTERM and SIGUSR1 end it as usual; the rank's handler, which
    would print the rank's stop message and exit code, stays with the rank."""
    signal.set_wakeup_fd(-1)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


_STOPPING = threading.Lock()


def claim_stop() -> None:
    """Let one thread stop this rank (its message, its exit code); any other that tries later waits for the end."""
    if not _STOPPING.acquire(blocking=False):
        threading.Event().wait()


def stop_process(code: int) -> None:
    """End this rank's process tree (its data-augmentation workers first), then the process, with ``code``.

    ``os._exit``: a broken process group can block in its destructors.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    end_process_tree()
    os._exit(code)


def _on_signal(info: RankInfo, monitor: RankMonitor) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        claim_stop()
        name = signal.Signals(signum).name
        monitor.report_failure(RuntimeError(f"stopped by {name}"))
        what = "pre-emption notice" if signum == signal.SIGUSR1 else "the scheduler or a user stopped it"
        stop_message(info.rank, f"{name} received ({what}); the last saved checkpoint is kept")
        stop_process(128 + signum)

    return handler


def stop_message(rank: int, reason: str) -> None:
    """Print why this rank stops (stderr, flushed: the caller may end the process with ``os._exit``)."""
    sys.stdout.flush()
    exit_codes.error(
        "nnunet_sam_train",
        f"training stopped on rank {rank}: {reason}. Continue with --c on the nodes left (any number of processes "
        "that divides the batch size).",
        exit_codes.FAILED,
    )


def _group_attempt(info: RankInfo) -> str:
    """A name that every rank of this process group shares and no other group has (rank 0's, broadcast)."""
    token = [f"{uuid.uuid4().hex}" if info.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return str(token[0])


def group_restarted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun restarted this process group (any rank's ``TORCHELASTIC_RESTART_COUNT`` > 0); a collective.

    Every rank must get the same answer, but the counts differ between nodes: an agent whose own worker failed counts
    the restart, one that only follows the new rendezvous round does not.
    """
    counts: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
    return max(int(c) for c in counts) > 0


SEPARATE_STORES_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def check_restartable(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse ``torchrun --max-restarts N`` (N > 0) with the store shared between rendezvous rounds.

    By default torchrun's agents keep one store for all rounds, and the keys a process group is built from carry no
    round: a worker of a restarted group can read the address of a process of the last group and fail, or wait
    forever for it (seen with torch 2.14 and gloo). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's
    environment gives every round a store of its own.
    """
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise DistributedSetupError(
            f"torchrun --max-restarts {restarts} needs {SEPARATE_STORES_ENV}=1 in torchrun's environment (on every "
            "node): with the store shared between rounds a restarted group cannot form. Start torchrun as "
            f"'{SEPARATE_STORES_ENV}=1 torchrun ...' (the SLURM script, python -m nnunet_sam.training.slurm, does)"
        )


def start(info: RankInfo, device_type: str) -> RankMonitor:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU; ``env://``) and start the rank monitor.

    Collectives time out after ``$nnUNet_SAM_dist_timeout`` seconds (default 1800), a rank counts as lost after
    ``$nnUNet_SAM_dist_lost_after`` seconds without a heartbeat (default 60).
    """
    check_restartable()
    timeout = timedelta(seconds=seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    lost_after = seconds_from_env(LOST_AFTER_ENV, DEFAULT_LOST_AFTER_S)
    if device_type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if info.local_rank >= available:
            raise DistributedSetupError(
                f"LOCAL_RANK {info.local_rank} needs GPU {info.local_rank}, but this node shows {available}: start at "
                "most one process per GPU (--nproc-per-node), or train on CPUs with -device cpu"
            )
        torch.cuda.set_device(info.local_rank)
    elif device_type != "cpu":
        raise DistributedSetupError(f"-device {device_type}: several processes need cuda (NCCL) or cpu (gloo)")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return RankMonitor(info, lost_after, _group_attempt(info)).start()


def run_as_rank(work: Callable[[], object], info: RankInfo, device_type: str) -> int:
    """Run ``work`` as one rank of a torchrun job; returns 0 when it ends normally, 2 when the process group cannot
    be joined with these settings. Any other end ends the process (``os._exit``; codes in :mod:`nnunet_sam.cli.train`).

    Joins the process group (:func:`start`). When ``work`` raises, this rank prints its own traceback, leaves its
    error for the others, names the other ranks that failed or were lost too, ends its process tree and exits
    with code 1. SIGTERM (a scheduler's stop) and SIGUSR1 (a pre-emption notice) end the process tree too, with
    code 128 + the signal's number.
    """
    try:
        monitor = start(info, device_type)
    except DistributedSetupError as error:
        return exit_codes.error("nnunet_sam_train", error)
    if threading.current_thread() is threading.main_thread():
        monitor.watch_signals(_on_signal(info, monitor))
    workers_die_with_parent()
    try:
        work()
    except DistributedSetupError as error:  # every rank finds the same, before the first training step
        claim_stop()
        monitor.report_failure(error)
        monitor.stop_watching()
        exit_codes.error("nnunet_sam_train", error)
        stop_process(exit_codes.UNUSABLE)
    except SystemExit as error:  # nnU-Net's argument parser (its message is printed): the same on every rank
        claim_stop()
        monitor.report_failure(RuntimeError(f"exited with code {error.code}"))
        monitor.stop_watching()
        stop_process(error.code if isinstance(error.code, int) else exit_codes.FAILED)
    except BaseException as error:
        traceback.print_exc()  # this rank's own error first, whatever the others did
        sys.stderr.flush()
        monitor.report_failure(error)
        others = monitor.explain()
        claim_stop()
        monitor.stop_watching()
        own = f"{type(error).__name__} on this rank (traceback above)"
        stop_message(info.rank, own if others is None else f"{others}; then {own}")
        stop_process(exit_codes.FAILED)
    monitor.stop()
    dist.destroy_process_group()
    return 0
