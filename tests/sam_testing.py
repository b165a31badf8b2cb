"""Test helpers: SAM checkpoints in the official layout with random or stand-in weights."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone, reference_shapes
from nnunet_sam.training.synthetic_plans import plans_for_patch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent  # the repository root (tests may sit in subfolders)


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Random tiny SAM weights in the official layout, as ``folder/sam_tiny.pth``."""
    torch.manual_seed(seed)
    path = Path(folder) / str(get_backbone("tiny").checkpoint_file)
    torch.save(build_sam(get_backbone("tiny")).state_dict(), path)
    return path


def write_standin_checkpoint(path: Path, backbone: str) -> Path:
    """A checkpoint with ``backbone``'s exact keys and shapes whose tensors are broadcast zeros (tiny files)."""
    state = {
        k: torch.zeros(1).expand(shape) if len(shape) else torch.zeros(())
        for k, shape in reference_shapes(get_backbone(backbone)).items()
    }
    torch.save(state, path)
    return Path(path)


def minimal_plans(patch_size: list[int], configuration: str = "3d_fullres") -> dict:
    """A plans dict with just what nnU-Net's PlansManager, trainer constructor and our patch rule read."""
    plans = plans_for_patch(patch_size, configuration, "Dataset999_Test", data_identifier="x")
    return plans | {"continue_training": False}  # set by nnU-Net's run_training, popped by the trainer


def dataset_json(num_foreground: int = 3, **extra_labels) -> dict:
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, num_foreground + 1)}, **extra_labels}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}


def nnunet_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for nnU-Net's command-line tools in a fresh workspace under ``root``.

    nnU-Net folders ``root/raw|preprocessed|results``, extra trainers from ``root/user_trainers``, no compile, one
    augmentation worker and one export worker (nnU-Net's default of 8 took minutes to start on 2 cores), and no
    ``nnUNet_SAM_checkpoints`` from the caller's environment: tests decide which SAM weights exist. ``extra`` adds
    or overrides variables (e.g. ``OMP_NUM_THREADS="1"``).
    """
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_SAM_checkpoints"}
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_extTrainer=str(root / "user_trainers"),
        nnUNet_compile="f",
        nnUNet_n_proc_DA="1",
        nnUNet_def_n_proc="1",
    )
    env.update(extra)
    return env


def run_tool(cmd: list[str], env: dict[str, str], timeout: int = 2400) -> str:
    """Run a command-line tool; fail with the tail of its output unless it exits 0. Returns its stdout.

    Output is decoded as UTF-8 with replacement: SimpleITK's DICOM reader may switch the locale of a C-locale
    Python, and tqdm's bars then break ``text=True``.
    """
    result = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout
