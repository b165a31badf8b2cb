"""Test helpers: SAM checkpoints in the official layout with random or stand-in weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone, reference_shapes
from nnunet_sam.training.synthetic_plans import nnunet_preprocessing, plans_for_patch

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


def preprocessed_plans(patch_size: list[int]) -> dict:
    """:func:`minimal_plans` with the preprocessing fields nnU-Net's data loading reads (as nnUNetPlans.json)."""
    plans = minimal_plans(patch_size)
    plans["configurations"]["3d_fullres"].update(nnunet_preprocessing([1.0, 1.0, 1.0]))
    del plans["continue_training"]
    return plans


def write_preprocessed_dataset(preprocessed: Path, patch_size: list[int]) -> Path:
    """nnU-Net's preprocessed folder of Dataset999_Test for :func:`preprocessed_plans`: cases a, b (training) and c
    (validation) of 8x48x48 voxels with labels 1 and 2 (:func:`dataset_json` (2)), written with nnU-Net's own blosc2
    dataset class, as nnUNetv2_preprocess leaves them, in a fraction of its time. Returns the data folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    base = Path(preprocessed) / "Dataset999_Test"
    folder = base / "x"  # minimal_plans' data_identifier
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in ("a", "b", "c"):
        seg = np.zeros((1, 8, 48, 48), np.int8)
        seg[0, 2:6, 8:24, 8:24], seg[0, 2:6, 28:44, 28:44] = 1, 2
        locations = {c: np.argwhere(seg == c) for c in (1, 2)}
        data = rng.standard_normal(seg.shape).astype(np.float32)
        nnUNetDatasetBlosc2.save_case(
            data, seg, {"class_locations": locations}, str(folder / case), chunks=(1, 8, 48, 48), blocks=(1, 4, 32, 32)
        )
    (base / "nnUNetPlans.json").write_text(json.dumps(preprocessed_plans(patch_size)))
    (base / "dataset.json").write_text(json.dumps(dataset_json(2)))
    (base / "dataset_fingerprint.json").write_text("{}")
    (base / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]}]))
    return folder


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
