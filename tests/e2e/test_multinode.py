"""Training on several nodes under torchrun (``nnunet_sam_train``) and prediction in parts (``-num_parts``).

The multi-node tests run the README's commands: two torchrun "nodes" on 127.0.0.1 (``--nnodes 2``, c10d
rendezvous, one gloo process each on the CPU) train the tiny MaskSAM and Self-Prompt-SAM trainers. A test
trainer records each rank's first step (weights before, its share of the batch, gradients after) and every file
that rank opens for writing under ``nnUNet_results`` (Python audit hook); the test repeats the step in one process
on both shares together. Lost ranks: bare process groups (no nnU-Net) where one rank is killed or stopped, and a
two-node training where one rank is killed and ``--c`` on one node continues from the two-node checkpoint.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
from sam_testing import dataset_json, minimal_plans, nnunet_env, run_tool

from nnunet_sam.cli import train as train_cli
from nnunet_sam.cli.predict import main as predict_main
from nnunet_sam.demo.phantoms import make_phantom_dataset
from nnunet_sam.inference.predict import cases_in_folder, cases_of_part
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
from nnunet_sam.training import distributed
from nnunet_sam.training.distributed import (
    SEPARATE_STORES_ENV,
    DistributedSetupError,
    check_batch_split,
    check_restartable,
    rank_device,
)
from nnunet_sam.training.fault_tolerance import descendants

BIN = Path(sys.executable).parent
DATASET = 991
# A lost rank stops the others within this time. Measured on a loaded 2-core machine: bare process groups 3.3 s
# (killed: the collective fails) and 6.1 s (stopped: 5 s heartbeat limit); training 33 s (30 s heartbeat limit).
LOST_WITHIN_S = 60
NNUNET_COPIES = {"plans.json", "dataset.json", "dataset_fingerprint.json"}  # nnU-Net writes these on every rank

TEST_TRAINERS = """
import os
import sys

import torch

from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer_tiny

RECORD = os.environ.get("MULTINODE_RECORD")
RANK = os.environ.get("RANK", "single")
RESULTS = os.environ.get("nnUNet_results", "\\0")
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

if RECORD:
    LOG = os.open(os.path.join(RECORD, f"writes_{RANK}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def _audit(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITING)
        elif event == "os.rename":  # also os.replace
            path, writes = args[1], True
        else:
            return
        if writes and isinstance(path, str) and path.startswith(RESULTS):
            os.write(LOG, (path + "\\n").encode())

    sys.addaudithook(_audit)


class Recording:
    epochs = int(os.environ.get("MULTINODE_EPOCHS", "1"))
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1
        self._recorded = not RECORD
        if RECORD:
            with open(os.path.join(RECORD, f"pid_{RANK}"), "w") as f:
                f.write(f"{os.getpid()} {os.getppid()}")

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # no test-time mirroring in the final validation: 8 times fewer forward passes on a loaded CPU
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    def train_step(self, batch):
        if self._recorded:
            return super().train_step(batch)
        net = self._plain_network()
        before = {k: v.detach().clone() for k, v in net.state_dict().items()}
        result = super().train_step(batch)
        grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in net.named_parameters()}
        step = {"state": before, "data": batch["data"], "target": batch["target"], "grads": grads,
                "epoch": self.current_epoch, "batch_size": self.batch_size}
        torch.save(step, os.path.join(RECORD, f"step_{RANK}.pt"))
        self._recorded = True
        return result


class MaskSAMTrainer_tiny_mn(Recording, MaskSAMTrainer_tiny):
    def _build_loss(self):
        # the loss samples random pixels, differently in every process: every pixel instead, so that both ranks and
        # the one-process reference compute one loss (as tests/integration/training/test_ddp.py)
        loss = super()._build_loss()
        loss.point_sampling, loss.num_points = "pixels", 1 << 30
        return loss


class SelfPromptSAMTrainer_tiny_mn(Recording, SelfPromptSAMTrainer_tiny):
    pass
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fast checks ------------------------------------------------------------------------------------------------
def test_world_sizes_that_do_not_divide_the_batch_are_refused(tmp_path, monkeypatch):
    check_batch_split(4, 2)
    check_batch_split(4, 4)
    with pytest.raises(DistributedSetupError, match=r"global batch of 4 .* over 3 processes.*divides 4: 1, 2, 4"):
        check_batch_split(4, 3)
    # the trainer applies it where nnU-Net splits the batch (before the first step, also for --c)
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    trainer = MaskSAMTrainer_tiny(minimal_plans([2, 32, 32]), "3d_fullres", 0, dataset_json(2), torch.device("cpu"))
    trainer.is_ddp = True
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    with pytest.raises(DistributedSetupError, match="global batch of 2"):
        trainer._set_batch_size_and_oversample()


def test_train_command_refuses_num_gpus_under_torchrun(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nnunet_sam_train"])
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    assert train_cli.main(["1", "3d_fullres", "0", "-num_gpus", "2", "-device", "cpu"]) == 2
    assert "--nproc-per-node" in capsys.readouterr().err
    monkeypatch.delenv("MASTER_PORT")
    assert train_cli.main(["1", "3d_fullres", "0", "-device", "cpu"]) == 2
    assert "MASTER_PORT" in capsys.readouterr().err


def test_rank_device_on_cpu():
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


def test_parts_are_nnunets_parts(tmp_path):
    """Disjoint, together every case, and the same cases as nnUNetv2_predict -num_parts 3 -part_id K."""
    names = ["liver_7", "a_1", "b_10", "b_2", "case_003", "case_01", "z"]
    for name in names:
        for channel in (0, 1):
            (tmp_path / f"{name}_{channel:04d}.nii.gz").touch()
    cases, _ = cases_in_folder(str(tmp_path), ".nii.gz")
    parts = [cases_of_part(cases, 3, k) for k in range(3)]
    assert sorted(c for part in parts for c in part) == sorted(names)  # disjoint and covering
    nnunet = get_identifiers_from_splitted_dataset_folder(str(tmp_path), ".nii.gz")
    for k, part in enumerate(parts):
        assert list(part) == list(nnunet[k::3])
        assert all(part[c] == cases[c] for c in part)


LOOP = """
import os, sys, time
import torch
import torch.distributed as dist
from nnunet_sam.training.distributed import RankInfo, run_as_rank

def work():
    with open(os.environ["PID_FILE"] + os.environ["RANK"], "w") as f:
        f.write(str(os.getpid()))
    while True:
        dist.all_reduce(torch.ones(1))
        time.sleep(0.05)

sys.exit(run_as_rank(work, RankInfo.from_environ(), "cpu"))
"""


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_rank_stops_the_others_with_its_name(tmp_path, how):
    """Killed: rank 0's collective fails at once. Stopped (SIGSTOP: alive, silent): its heartbeat stops."""
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.update(PID_FILE=str(tmp_path / "pid"), OMP_NUM_THREADS="1", nnUNet_SAM_dist_lost_after="5")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOOP],
            env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        deadline = time.time() + 300
        while not (tmp_path / "pid1").is_file() or not (tmp_path / "pid0").is_file():
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the ranks did not start"
            time.sleep(0.2)
        time.sleep(2)  # a few collectives and heartbeats
        lost = int((tmp_path / "pid1").read_text())
        os.kill(lost, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.time()
        output, _ = procs[0].communicate(timeout=LOST_WITHIN_S)
        elapsed = time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"{how}: rank 0 stopped {elapsed:.1f} s after rank 1 was {how}")
    assert procs[0].returncode == 1, output
    assert "training stopped on rank 0" in output and "rank 1 (" in output, output
    assert "rank 1 (" in output and "was lost: no heartbeat" in output, output
    if how == "stopped":  # only the heartbeat shows it
        assert "no heartbeat for 5 s" in output, output


# ---- every rank fails, stop paths end the workers (bare process groups) -------------------------------------------
GROUP = """
import multiprocessing, os, signal, sys, time
import torch
import torch.distributed as dist
from nnunet_sam.training.distributed import RankInfo, run_as_rank

def worker():  # as nnU-Net's augmentation workers (batchgenerators forks them as daemons)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL or the kernel's parent-death signal ends them
    while True:
        time.sleep(1)

def work():
    how = os.environ["HOW"]
    workers = [multiprocessing.get_context("fork").Process(target=worker, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    with open(os.environ["PID_FILE"] + os.environ["RANK"], "w") as f:
        f.write(" ".join(str(p) for p in [os.getpid()] + [w.pid for w in workers]))
    for step in range(10**9):
        dist.all_reduce(torch.ones(1))
        if how == "raise" and step == 5:
            raise ValueError(f"a bug in the trainer, rank {os.environ['RANK']}")
        time.sleep(0.05)

sys.exit(run_as_rank(work, RankInfo.from_environ(), "cpu"))
"""
WORKERS_GONE_S = 15  # a stopping rank's workers are gone within this time (measured: under 3 s)


def _start_group(tmp_path: Path, how: str) -> tuple[list[subprocess.Popen], list[list[int]]]:
    """Two ranks of GROUP; returns them and each rank's [rank PID, worker PIDs...] once all are running."""
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HOW": how}
    env.update(PID_FILE=str(tmp_path / "pid"), OMP_NUM_THREADS="1", nnUNet_SAM_dist_lost_after="5")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GROUP],
            env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    deadline = time.time() + 300
    while not all((tmp_path / f"pid{r}").is_file() for r in range(2)):
        if time.time() > deadline or (how != "raise" and any(p.poll() is not None for p in procs)):
            _end_group(procs)
            raise AssertionError("the ranks did not start: " + "".join(p.communicate()[0] for p in procs))
        time.sleep(0.2)
    time.sleep(0.5)  # the PID files are complete
    return procs, [[int(p) for p in (tmp_path / f"pid{r}").read_text().split()] for r in range(2)]


def _end_group(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The PIDs still running after ``seconds`` (checked every 0.1 s)."""
    deadline = time.time() + seconds
    while any(_running(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


def test_every_rank_raising_prints_its_own_error_not_a_lost_node(tmp_path):
    """Issue 26 item 1: all ranks raise the same error (a bug in a trainer subclass): each prints its own traceback
    and names the other as failed, never as lost."""
    procs, _ = _start_group(tmp_path, "raise")
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        _end_group(procs)
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 1, output
        assert "Traceback" in output and f"ValueError: a bug in the trainer, rank {rank}" in output, output
        assert "was lost" not in output and "were lost" not in output, output
        assert output.index("Traceback") < output.index(f"training stopped on rank {rank}"), output
        other = 1 - rank
        assert f"rank {other} (" in output and "failed: ValueError" in output, output


@pytest.mark.parametrize("how", ["lost peer", "exception", "SIGTERM", "SIGUSR1"])
def test_a_stopping_rank_ends_its_workers(tmp_path, how):
    """Issue 26 item 2 / issue 29 item 10: no augmentation worker outlives its rank, on any exit path. Rank 1 is
    SIGKILLed (its workers die with it: the kernel's parent-death signal) or rank 0 gets SIGTERM or SIGUSR1 (a
    scheduler's stop or pre-emption notice) or raises; every worker of both ranks is gone within WORKERS_GONE_S."""
    procs, pids = _start_group(tmp_path, "raise" if how == "exception" else "loop")
    try:
        time.sleep(1)
        if how == "lost peer":
            os.kill(pids[1][0], signal.SIGKILL)
        elif how.startswith("SIG"):
            os.kill(pids[0][0], getattr(signal, how))
        start = time.time()
        output = procs[0].communicate(timeout=LOST_WITHIN_S)[0]
        left = _gone_within(pids[0][1:] + pids[1][1:], WORKERS_GONE_S)
        elapsed = time.time() - start
    finally:
        _end_group(procs)
    print(f"{how}: rank 0 and every worker gone {elapsed:.1f} s after the event")
    assert not left, f"workers {left} outlived their rank ({how}); rank 0 said: {output}"
    expected = {"lost peer": 1, "exception": 1, "SIGTERM": 128 + signal.SIGTERM, "SIGUSR1": 128 + signal.SIGUSR1}
    assert procs[0].returncode == expected[how], output
    if how.startswith("SIG"):
        assert f"{how} received" in output, output


# ---- torchrun: elastic restarts and exit codes --------------------------------------------------------------------
ELASTIC = """
import os, signal, sys, time
import torch
import torch.distributed as dist
from nnunet_sam.training.distributed import DistributedSetupError, RankInfo, run_as_rank

def work():
    restart, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    if os.environ["HOW"] == "setup":
        raise DistributedSetupError("this job cannot use these settings")
    for step in range(20):
        dist.all_reduce(torch.ones(1))
        time.sleep(0.1)
        if step == 5 and restart == 0 and rank == 1 and os.environ["HOW"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # a worker lost in the first attempt only
    open(os.path.join(os.environ["OUT"], f"done_rank{rank}_restart{restart}"), "w").close()

sys.exit(run_as_rank(work, RankInfo.from_environ(), "cpu"))
"""


def _torchrun_nodes(
    tmp_path: Path, how: str, *options: str, extra_env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess]:
    """Two torchrun nodes on 127.0.0.1 (c10d rendezvous), one process each, running ELASTIC."""
    (tmp_path / "elastic.py").write_text(ELASTIC)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path), "HOW": how, **(extra_env or {})}
    env["nnUNet_SAM_dist_lost_after"] = "10"
    command = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic", *options, str(tmp_path / "elastic.py")]
    nodes = []
    for node in range(2):
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if node == 0:
            time.sleep(3)  # node 0's torchrun holds the rendezvous store
    try:
        outputs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:  # torchrun passes SIGTERM on to its processes (each leads a session of its own)
            if n.poll() is None:
                n.terminate()
                try:
                    n.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    n.kill()
            n.wait()
    return [subprocess.CompletedProcess(n.args, n.returncode, o) for n, o in zip(nodes, outputs, strict=True)]


@pytest.mark.slow
def test_max_restarts_survives_a_killed_worker(tmp_path):
    """Issue 26 item 3: with --max-restarts 1 the group is restarted after a worker is SIGKILLed and finishes (both
    nodes, although only node 1's restart count goes up when node 0 merely follows the new rendezvous)."""
    nodes = _torchrun_nodes(tmp_path, "kill", "--max-restarts", "1", extra_env={SEPARATE_STORES_ENV: "1"})
    logs = "\n".join(n.stdout for n in nodes)
    assert [n.returncode for n in nodes] == [0, 0], logs[-6000:]
    done = sorted(p.name for p in tmp_path.glob("done_*"))
    assert len(done) == 2 and {d.split("_")[1] for d in done} == {"rank0", "rank1"}, (done, logs[-6000:])
    assert "done_rank1_restart1" in done, done  # node 1's worker was the one restarted


def test_max_restarts_with_a_shared_store_is_refused_clearly():
    """torchrun's default store, shared between rounds, lets a restarted group hang (stale addresses): refused."""
    check_restartable({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    check_restartable({"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "False"})
    with pytest.raises(DistributedSetupError, match=f"--max-restarts 2 needs {SEPARATE_STORES_ENV}=1"):
        check_restartable({"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"})


def test_exit_codes_under_torchrun(tmp_path):
    """Issue 26 item 4: a setting the job cannot use: each process prints its message and exits 2; torchrun itself
    exits 1 and shows each process's code in its failure summary."""
    nodes = _torchrun_nodes(tmp_path, "setup")
    for node in nodes:
        assert node.returncode == 1, node.stdout[-4000:]
        assert "nnunet_sam_train: error: this job cannot use these settings" in node.stdout, node.stdout[-4000:]
        assert re.search(r"exitcode\s*:\s*2\b", node.stdout), node.stdout[-4000:]


def test_a_restarted_group_continues_from_the_last_checkpoint(monkeypatch):
    """Issue 26 item 3: when torchrun restarted the group, every rank adds --c (nnU-Net starts afresh when there is
    no checkpoint yet), also a rank whose own restart count is 0 (its node only followed the new rendezvous)."""
    seen = []
    monkeypatch.setattr(train_cli, "run_as_rank", lambda work, info, device: work() or 0)
    monkeypatch.setattr(train_cli, "run_training_entry", lambda: seen.append(list(sys.argv[1:])))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    other_rank = {"count": 0}
    monkeypatch.setattr(
        torch.distributed,
        "all_gather_object",
        lambda out, obj: out.__setitem__(slice(None), [obj, other_rank["count"]]),
    )
    monkeypatch.setattr(sys, "argv", ["nnunet_sam_train"])
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    args = ["1", "3d_fullres", "0", "-device", "cpu"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert train_cli.main(args) == 0
    other_rank["count"] = 1
    assert train_cli.main(args) == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train_cli.main([*args, "--c"]) == 0
    assert seen == [args, [*args, "--c"], [*args, "--c"]]


def test_batch_per_process_sets_the_global_batch(tmp_path, monkeypatch, capsys):
    """Issue 26 item 5: --batch-per-process B gives a global batch of B x processes (8 processes: 8, where the plans'
    batch of 2 cannot be split)."""
    monkeypatch.setattr(sys, "argv", ["nnunet_sam_train"])
    monkeypatch.setattr(train_cli, "run_as_rank", lambda work, info, device: 0)
    monkeypatch.delenv(distributed.BATCH_PER_PROCESS_ENV, raising=False)
    assert train_cli.main(["1", "3d_fullres", "0", "--batch-per-process", "1"]) == 2  # not under torchrun
    assert "under torchrun only" in capsys.readouterr().err
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="8", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    assert train_cli.main(["1", "3d_fullres", "0", "-device", "cpu", "--batch-per-process", "1"]) == 0
    assert os.environ[distributed.BATCH_PER_PROCESS_ENV] == "1" and "--batch-per-process" not in sys.argv
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    plans = minimal_plans([2, 32, 32])
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 2
    trainer = MaskSAMTrainer_tiny(plans, "3d_fullres", 0, dataset_json(2), torch.device("cpu"))
    assert trainer.configuration_manager.batch_size == 8
    check_batch_split(trainer.configuration_manager.batch_size, 8)
    monkeypatch.setenv(distributed.BATCH_PER_PROCESS_ENV, "0")
    with pytest.raises(DistributedSetupError, match="expected a whole number"):
        MaskSAMTrainer_tiny(plans, "3d_fullres", 0, dataset_json(2), torch.device("cpu"))


# ---- two torchrun nodes train (slow) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode")
    (root / "user_trainers").mkdir()
    (root / "user_trainers" / "multinode_trainers.py").write_text(TEST_TRAINERS)
    # 5 training cases: one validation case per fold; 32 px in-plane: one tiny-SAM window
    make_phantom_dataset(
        root / "raw", dataset_id=DATASET, num_train=5, num_test=7, shape=(16, 32, 32), num_organs=2, seed=1
    )
    run_tool(
        [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "3d_fullres", "-np", "1"],
        nnunet_env(root),
    )
    return root


def _node_command(port: int, nnodes: int, trainer: str, *extra: str) -> list[str]:
    """The README's torchrun command, on 127.0.0.1 with one CPU process per node."""
    return [
        str(BIN / "torchrun"),
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "nnunet_sam",
        "-m",
        "nnunet_sam.cli.train",
        str(DATASET),
        "3d_fullres",
        "0",
        "-tr",
        trainer,
        "-device",
        "cpu",
        *extra,
    ]


def _start_two_nodes(root: Path, trainer: str, record: Path, epochs: int) -> list[subprocess.Popen]:
    """Node 0 first, so that its torchrun holds the rendezvous store; then node 1."""
    record.mkdir()
    port = _free_port()
    env = nnunet_env(root, MULTINODE_RECORD=str(record), MULTINODE_EPOCHS=str(epochs), OMP_NUM_THREADS="1")
    env["nnUNet_SAM_dist_lost_after"] = "30"
    nodes = []
    for node_rank in range(2):
        log = open(record / f"node{node_rank}.log", "w")  # noqa: SIM115 (closed by _finish)
        nodes.append(
            subprocess.Popen(
                _node_command(port, 2, trainer), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
        deadline = time.time() + 120
        while node_rank == 0 and time.time() < deadline:  # wait until node 0 listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
    return nodes


def _finish(nodes: list[subprocess.Popen], record: Path, timeout: float = 1800) -> list[str]:
    try:
        for node in nodes:
            node.wait(timeout=timeout)
    finally:
        # the node's session (torchrun) and each rank's session (torchrun starts every rank as a session leader):
        # the rank and its augmentation workers, which a killed rank leaves orphaned
        ranks = [int(f.read_text().split()[0]) for f in record.glob("pid_*")]
        for group in [node.pid for node in nodes] + ranks:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for node in nodes:
            node.wait()
    return [(record / f"node{i}.log").read_text(errors="replace") for i in range(2)]


def _reference_gradients(root: Path, trainer_name: str, record: Path) -> tuple[dict, dict]:
    """Both ranks' recorded first step, and the trainer's own train_step in this process on both shares at once."""
    steps = [torch.load(record / f"step_{r}.pt", weights_only=False) for r in range(2)]  # our own test output
    folder = root / "results" / f"Dataset{DATASET}_Phantom" / f"{trainer_name}__nnUNetPlans__3d_fullres"
    env = nnunet_env(root / "reference", nnUNet_preprocessed=str(root / "preprocessed"))
    saved = {k: os.environ.get(k) for k in env}
    threads = torch.get_num_threads()
    os.environ.update(env)
    torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_train -device cpu in the workers
    sys.path.insert(0, str(root / "user_trainers"))
    try:
        import multinode_trainers  # noqa: PLC0415 (the test trainers, written by the workspace fixture)

        plans = load_json(folder / "plans.json")
        plans["continue_training"] = False
        trainer = getattr(multinode_trainers, trainer_name)(
            plans, "3d_fullres", 0, load_json(folder / "dataset.json"), torch.device("cpu")
        )
        trainer.initialize()
        trainer._plain_network().load_state_dict(steps[0]["state"])
        trainer.current_epoch = steps[0]["epoch"]
        trainer.on_train_epoch_start()
        trainer._recorded = True
        batch = {k: torch.cat([steps[0][k], steps[1][k]]) for k in ("data", "target")}
        trainer.train_step(batch)
        reference = {n: None if p.grad is None else p.grad for n, p in trainer._plain_network().named_parameters()}
    finally:
        sys.path.pop(0)
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return steps, reference


def _check_gradients(root: Path, trainer_name: str, record: Path) -> None:
    steps, reference = _reference_gradients(root, trainer_name, record)
    global_batch = load_json(root / "preprocessed" / f"Dataset{DATASET}_Phantom" / "nnUNetPlans.json")
    global_batch = global_batch["configurations"]["3d_fullres"]["batch_size"]
    for step in steps:  # nnU-Net's split of the global batch
        assert step["batch_size"] == global_batch // 2 == step["data"].shape[0]
    assert any(g is not None for g in reference.values())
    for name, ref in reference.items():
        g0, g1 = steps[0]["grads"][name], steps[1]["grads"][name]
        assert (g0 is None) == (g1 is None) == (ref is None), name
        if ref is None:
            continue
        assert torch.equal(g0, g1), f"ranks disagree on {name}"
        atol = max(1e-6, 1e-4 * float(ref.abs().max()))  # as test_ddp.py: 2 x 1 vs 2 samples summed
        torch.testing.assert_close(g0, ref, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _check_writers(root: Path, record: Path) -> None:
    """Checkpoints, logs and progress.png come from rank 0 only; rank 1 writes nnU-Net's metadata copies only."""
    written = [{Path(p).name for p in (record / f"writes_{r}.txt").read_text().split()} for r in range(2)]
    assert written[1] <= NNUNET_COPIES, f"rank 1 wrote {sorted(written[1] - NNUNET_COPIES)}"
    assert "progress.png" in written[0] and any(n.startswith("training_log_") for n in written[0])
    assert any(n.startswith("checkpoint_") and n.endswith(".pth") for n in written[0]), sorted(written[0])


@pytest.mark.slow
def test_two_nodes_self_prompt_sam_then_prediction_in_parts(workspace, monkeypatch):
    trainer = "SelfPromptSAMTrainer_tiny_mn"
    record = workspace / "record_self_prompt"
    nodes = _start_two_nodes(workspace, trainer, record, epochs=1)
    logs = _finish(nodes, record)
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert any("Training done." in log for log in logs)
    _check_gradients(workspace, trainer, record)
    _check_writers(workspace, record)
    model = workspace / "results" / f"Dataset{DATASET}_Phantom" / f"{trainer}__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()

    # -num_parts 3 over 7 cases: disjoint, covering, outputs equal to one run over all cases
    images = workspace / "raw" / f"Dataset{DATASET}_Phantom" / "imagesTs"
    found = os.environ.get("nnUNet_extTrainer", "")  # nnU-Net looks up the test trainer by name
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(workspace / "user_trainers"), found]))
    common = ["-i", str(images), "-m", str(model), "-f", "0", "-device", "cpu", "--disable_tta"]
    assert predict_main([*common, "-o", str(workspace / "whole")]) == 0
    for k in range(3):
        assert predict_main([*common, "-o", str(workspace / f"part{k}"), "-num_parts", "3", "-part_id", str(k)]) == 0
    parts = [sorted(f.name for f in (workspace / f"part{k}").glob("*.nii.gz")) for k in range(3)]
    whole = sorted(f.name for f in (workspace / "whole").glob("*.nii.gz"))
    assert len(whole) == 7 and sorted(sum(parts, [])) == whole and all(parts)
    for k, names in enumerate(parts):
        for name in names:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(workspace / f"part{k}" / name)))
            np.testing.assert_array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(str(workspace / "whole" / name))))


@pytest.mark.slow
def test_two_nodes_masksam_lose_a_node_and_continue_on_one(workspace):
    trainer = "MaskSAMTrainer_tiny_mn"
    record = workspace / "record_masksam"
    fold = workspace / "results" / f"Dataset{DATASET}_Phantom" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    nodes = _start_two_nodes(workspace, trainer, record, epochs=4)
    try:
        latest = fold / "checkpoint_latest.pth"
        deadline = time.time() + 1800
        while not latest.is_file() and time.time() < deadline and all(n.poll() is None for n in nodes):
            time.sleep(0.5)
        assert all(n.poll() is None for n in nodes), "a node ended before the first checkpoint"
        # the rank on node 1 (its worker's parent is node 1's torchrun)
        pids = {r: (record / f"pid_{r}").read_text().split() for r in range(2)}
        lost = next(r for r, (pid, parent) in pids.items() if int(parent) == nodes[1].pid)
        os.kill(int(pids[lost][0]), signal.SIGKILL)
        killed_at = time.time()
        nodes[0].wait(timeout=LOST_WITHIN_S)
        elapsed = time.time() - killed_at
    finally:
        logs = _finish(nodes, record, timeout=60)
    print(f"node 0 stopped {elapsed:.1f} s after rank {lost} was killed")
    assert nodes[0].returncode != 0
    assert f"rank {lost} (" in logs[0] and "was lost: no heartbeat" in logs[0], logs[0][-3000:]
    assert not (fold / "checkpoint_final.pth").exists()
    _check_gradients(workspace, trainer, record)
    _check_writers(workspace, record)

    # --c on one node continues from the two-node checkpoint
    saved_epoch = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
    port = _free_port()
    env = nnunet_env(workspace, MULTINODE_EPOCHS="4", OMP_NUM_THREADS="1")
    run_tool(_node_command(port, 1, trainer, "--c"), env)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4
    resumed = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert re.search(rf"Epoch {saved_epoch}\s*$", resumed, re.M), "--c did not resume at the saved epoch"
    assert not re.search(r"Epoch 0\s*$", resumed, re.M), "--c started from scratch"


# ---- the SLURM script under a fake Slurm (sbatch, srun, scontrol) on 127.0.0.1 ------------------------------------
SLURM_SCRIPT = Path(
    subprocess.run(
        [sys.executable, "-m", "nnunet_sam.training.slurm"], capture_output=True, text=True, check=True
    ).stdout.strip()
)  # the installed copy: a wheel without the script fails here
JOB_ID = 4242
FAKE_SBATCH = """#!/bin/bash
# sbatch SCRIPT ARGS: the job's variables as Slurm sets them (from the script's #SBATCH lines), then the script
script=$1; shift
option() { sed -n "s/^#SBATCH --$1=//p" "$script" | head -n 1; }
export SLURM_JOB_ID=${FAKE_JOB_ID} SLURM_JOB_NAME=$(option job-name) SLURM_JOB_NODELIST="node[1-2]"
export SLURM_NNODES=$(option nodes) SLURM_JOB_NUM_NODES=$(option nodes) SLURM_CPUS_PER_TASK=$(option cpus-per-task)
export SLURM_NTASKS_PER_NODE=$(option ntasks-per-node) SLURM_SUBMIT_DIR=$PWD
exec bash "$script" "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1 $2" in
    "show hostnames")  # every node is this machine; FAKE_NODES_LISTED: a long node list (more than a pipe holds)
        for i in $(seq "${FAKE_NODES_LISTED:-$SLURM_NNODES}"); do echo 127.0.0.1; done ;;
    "requeue "*) kill "$(cat "$FAKE_SLURM_LOG.srun_pid")" ;;  # Slurm ends the running step
esac
"""
FAKE_SRUN = """#!/bin/bash
# one task per node: SLURM_NNODES copies of the command, node 0 first (its torchrun holds the rendezvous store)
echo "srun $*" >> "$FAKE_SLURM_LOG"
echo "env nnUNet_raw=$nnUNet_raw nnUNet_preprocessed=$nnUNet_preprocessed" >> "$FAKE_SLURM_LOG"
echo "env nnUNet_results=$nnUNet_results" >> "$FAKE_SLURM_LOG"
echo $$ > "$FAKE_SLURM_LOG.srun_pid"
while [[ $1 == --* ]]; do
    case $1 in --cpus-per-task=*) export SLURM_CPUS_PER_TASK=${1#*=} ;; esac
    shift
done
if [ -n "${FAKE_SRUN_HOLD:-}" ]; then exec sleep 300; fi
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_PROCID=$node SLURM_NODEID=$node SLURM_LOCALID=0 "$@" > "$FAKE_SLURM_LOG.node$node" 2>&1 &
    pids+=($!)
    sleep 3
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _fake_slurm(tmp_path: Path, root: Path | None = None, **env: str) -> tuple[dict[str, str], Path]:
    """PATH with fake sbatch, srun and scontrol first; returns the environment and the fake Slurm's log. nnU-Net's
    folders under ``root`` (default ``tmp_path``)."""
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    full = nnunet_env(root or tmp_path, OMP_NUM_THREADS="1", FAKE_JOB_ID=str(JOB_ID), FAKE_SLURM_LOG=str(log), **env)
    full["PATH"] = os.pathsep.join([str(bin_dir), str(BIN), full["PATH"]])  # torchrun of this environment
    return full, log


def _sbatch(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sbatch", str(SLURM_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_slurm_script_starts_two_nodes_as_one_group(tmp_path):
    """Issue 26 item 6: the README's SLURM script under a fake Slurm: two nodes' torchruns on 127.0.0.1 form one
    group (both ranks meet nnU-Net's error for a dataset that does not exist, each naming the other as failed), with
    the job's port and id, the nnU-Net folders exported, and --cpus-per-task passed to srun."""
    env, log = _fake_slurm(tmp_path, NPROC_PER_NODE="1", NNUNET_SAM_MAX_RESTARTS="0")  # no retries of the error
    result = _sbatch(env, "999", "3d_fullres", "0", "-device", "cpu")
    assert result.returncode == 1, result.stdout + result.stderr
    text = log.read_text()
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=32 " in srun  # the script's #SBATCH --cpus-per-task, explicitly
    assert f"--rdzv-endpoint 127.0.0.1:{20000 + JOB_ID % 40000} --rdzv-id {JOB_ID}" in srun, srun
    assert "--nnodes 2 --nproc-per-node 1" in srun and srun.endswith("999 3d_fullres 0 -device cpu"), srun
    assert f"nnUNet_results={tmp_path / 'results'}" in text
    output = "".join(Path(f"{log}.node{n}").read_text() for n in range(2))
    for rank in range(2):  # each rank stops on its own error; the later one also names the first as failed
        assert f"training stopped on rank {rank}" in output, output[-4000:]
    assert re.search(r"rank [01] \(.*\) failed: RuntimeError", output), output[-4000:]
    # under load rank 1 may reach the store only after rank 0 (its holder) has ended on the error: "lost" is then
    # true, but the rank must still name its own error
    lost = [line for line in output.splitlines() if "was lost" in line]
    assert all("then RuntimeError on this rank" in line for line in lost), output[-4000:]

    env.pop("nnUNet_results")
    result = _sbatch(env, "999", "3d_fullres", "0")
    assert result.returncode == 2 and "set nnUNet_results" in result.stderr


def test_slurm_script_requeues_on_preemption_and_continues_with_c(tmp_path):
    """Issue 26 item 6: SLURM's USR1 notice (#SBATCH --signal=B:USR1@120) requeues the job; started again
    (SLURM_RESTART_COUNT=1), the script continues with --c. The node list is longer than a pipe holds: the script
    must read all of it (`scontrol show hostnames | head -n 1` ended the job with SIGPIPE under pipefail)."""
    env, log = _fake_slurm(tmp_path, FAKE_SRUN_HOLD="1", FAKE_NODES_LISTED="20000")
    job = subprocess.Popen(["sbatch", str(SLURM_SCRIPT), "1", "3d_fullres", "0"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not Path(f"{log}.srun_pid").is_file():
            assert time.time() < deadline and job.poll() is None, "srun did not start"
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # fake sbatch execs the script: this is the batch shell
        stderr = job.communicate(timeout=60)[1].decode()
    finally:
        job.kill()
        job.wait()
    assert f"scontrol requeue {JOB_ID}" in log.read_text(), log.read_text()
    assert "pre-emption notice, requeueing" in stderr
    srun = [line for line in log.read_text().splitlines() if line.startswith("srun ")]
    assert srun[-1].endswith("1 3d_fullres 0"), srun

    Path(f"{log}.srun_pid").unlink()
    env["SLURM_RESTART_COUNT"] = "1"  # Slurm sets it in a requeued job
    job = subprocess.Popen(["sbatch", str(SLURM_SCRIPT), "1", "3d_fullres", "0"], env=env)
    try:
        deadline = time.time() + 60
        while not Path(f"{log}.srun_pid").is_file():
            assert time.time() < deadline, "srun did not start"
            time.sleep(0.1)
    finally:
        job.kill()
        job.wait()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(Path(f"{log}.srun_pid").read_text()), signal.SIGKILL)
    srun = [line for line in log.read_text().splitlines() if line.startswith("srun ")]
    assert srun[-1].endswith("1 3d_fullres 0 --c"), srun


@pytest.mark.slow
def test_slurm_script_trains_on_two_nodes_and_survives_a_killed_worker(workspace, tmp_path):
    """Issues 26 items 2, 3, 5, 6 with real nnU-Net training: the SLURM script (fake Slurm, two nodes on 127.0.0.1,
    --batch-per-process 1) trains the tiny MaskSAM; the rank on node 1 is SIGKILLed after the first checkpoint: its
    augmentation workers die with it, torchrun restarts the group (NNUNET_SAM_MAX_RESTARTS=1), which continues
    from the checkpoint and finishes."""
    trainer = "MaskSAMTrainer_tiny_mn"
    record = tmp_path / "record"
    record.mkdir()
    env, log = _fake_slurm(
        tmp_path, workspace, NPROC_PER_NODE="1", NNUNET_SAM_MAX_RESTARTS="1", MULTINODE_RECORD=str(record)
    )
    env.update(MULTINODE_EPOCHS="3", nnUNet_SAM_dist_lost_after="30", FAKE_JOB_ID="4343")
    results = workspace / "results" / f"Dataset{DATASET}_Phantom" / f"{trainer}__nnUNetPlans__3d_fullres"
    fold = results / "fold_0"
    # a fresh fold: the restart's --c takes nnU-Net's first checkpoint, checkpoint_final.pth of an earlier test first
    shutil.rmtree(fold, ignore_errors=True)
    args = [str(DATASET), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--batch-per-process", "1"]
    job = subprocess.Popen(
        ["sbatch", str(SLURM_SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        latest = fold / "checkpoint_latest.pth"
        deadline = time.time() + 1800
        while not latest.is_file() and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
        assert job.poll() is None, "the job ended before the first checkpoint"
        saved_epoch = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
        rank1 = int((record / "pid_1").read_text().split()[0])
        workers = descendants(rank1)
        assert workers, "no augmentation workers found"
        os.kill(rank1, signal.SIGKILL)
        left = _gone_within(workers, WORKERS_GONE_S)
        output = job.communicate(timeout=1800)[0]
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
    nodes = [Path(f"{log}.node{n}").read_text(errors="replace") for n in range(2)]
    assert not left, f"workers {left} of the killed rank outlived it"
    # torchrun's SIGTERM reaches the rank's whole session: only the rank prints its stop, not its workers
    assert nodes[0].count("training stopped on rank 0: SIGTERM") <= 1, nodes[0][-3000:]
    assert job.returncode == 0, output[-3000:] + nodes[0][-3000:] + nodes[1][-3000:]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    resumed = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert re.search(rf"Epoch {saved_epoch}\s*$", resumed, re.M), "the restarted group did not resume"
    plans = load_json(results / "plans.json")
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 2  # 1 per process x 2 processes
