"""End to end through nnU-Net's own command-line tools on CPU with the tiny backbone.

phantom dataset -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train (killed, then --c) -> nnUNetv2_predict
(without nnUNet_SAM_checkpoints, twice) -> nnUNetv2_evaluate_folder. The CPU-sized trainer is a test
subclass found through the user's own nnUNet_extTrainer folder, beside the package's registered trainers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sam_testing import nnunet_env, run_tool

from nnunet_sam.demo.phantoms import make_phantom_dataset

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
DATASET = 990
MIN_MEAN_DICE = 0.3  # chance level (a random map with each organ's prevalence) is below 0.03 here

TEST_TRAINERS = """
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny, MaskSAMTrainer_tiny_demo
from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer_tiny_demo


class MaskSAMTrainer_tiny_e2e(MaskSAMTrainer_tiny_demo):
    def __init__(self, plans, configuration, fold, dataset_json, device):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1


class SelfPromptSAMTrainer_tiny_e2e(SelfPromptSAMTrainer_tiny_demo):
    pass


class MaskSAMTrainer_tiny_e2e2d(MaskSAMTrainer_tiny):
    epochs = 1
    iterations_per_epoch = 3
    val_iterations_per_epoch = 1
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    (root / "user_trainers").mkdir()
    (root / "user_trainers" / "e2e_trainers.py").write_text(TEST_TRAINERS)
    make_phantom_dataset(root / "raw", dataset_id=DATASET, num_train=10, num_test=2, seed=0)
    run_tool(
        [
            str(BIN / "nnUNetv2_plan_and_preprocess"),
            "-d",
            str(DATASET),
            "-c",
            "3d_fullres",
            "2d",
            "-np",
            "2",
            "--verify_dataset_integrity",
        ],
        nnunet_env(root),
    )
    return root


def _model_folder(root: Path, trainer: str, configuration: str) -> Path:
    return root / "results" / "Dataset990_Phantom" / f"{trainer}__nnUNetPlans__{configuration}"


@pytest.mark.slow  # about 8 minutes on 2 cores (600 training steps, a kill, --c, two predictions)
def test_train_kill_continue_predict_evaluate(workspace):
    env = nnunet_env(workspace)
    fold = _model_folder(workspace, "MaskSAMTrainer_tiny_e2e", "3d_fullres") / "fold_0"
    train = [
        str(BIN / "nnUNetv2_train"),
        str(DATASET),
        "3d_fullres",
        "0",
        "-tr",
        "MaskSAMTrainer_tiny_e2e",
        "-device",
        "cpu",
    ]

    # 1) start training and kill it hard once a checkpoint of epoch >= 2 exists
    proc = subprocess.Popen(
        train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    latest = fold / "checkpoint_latest.pth"
    deadline = time.time() + 1800
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file():
            try:
                if torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] >= 2:
                    break
            except Exception:  # being written right now
                pass
        time.sleep(2)
    assert proc.poll() is None, "training ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
    assert not (fold / "checkpoint_final.pth").exists()

    # 2) --c continues from the last checkpoint and finishes
    run_tool(train + ["--c"], env)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 20
    logs = sorted(fold.glob("training_log_*.txt"))
    assert len(logs) >= 2
    resumed_log = logs[-1].read_text()
    assert re.search(rf"Epoch {killed_at}\s*$", resumed_log, re.M), "--c did not resume at the saved epoch"
    assert not re.search(r"Epoch 0\s*$", resumed_log, re.M), "--c started from scratch"

    # 3) predict held-out cases without nnUNet_SAM_checkpoints, twice
    out1, out2 = workspace / "pred1", workspace / "pred2"
    images = workspace / "raw" / "Dataset990_Phantom" / "imagesTs"
    predict = [
        str(BIN / "nnUNetv2_predict"),
        "-i",
        str(images),
        "-d",
        str(DATASET),
        "-c",
        "3d_fullres",
        "-f",
        "0",
        "-tr",
        "MaskSAMTrainer_tiny_e2e",
        "-device",
        "cpu",
        "-npp",
        "1",
        "-nps",
        "1",
    ]
    run_tool(predict + ["-o", str(out1)], env)
    run_tool(predict + ["-o", str(out2)], env)
    for f in sorted(out1.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / f.name)))
        np.testing.assert_array_equal(a, b)

    # 4) nnU-Net's own evaluation
    _evaluate(workspace, fold.parent, out1)


def _evaluate(workspace: Path, model: Path, predictions: Path) -> None:
    labels = workspace / "raw" / "Dataset990_Phantom" / "labelsTs"
    evaluate = [str(BIN / "nnUNetv2_evaluate_folder"), str(labels), str(predictions)]
    run_tool(
        evaluate + ["-djfile", str(model / "dataset.json"), "-pfile", str(model / "plans.json")], nnunet_env(workspace)
    )
    summary = json.loads((predictions / "summary.json").read_text())
    dice = {k: round(v["Dice"], 3) for k, v in summary["mean"].items()}
    mean = summary["foreground_mean"]["Dice"]
    print(f"{model.name}: held-out Dice per class {dice}, mean foreground {mean:.3f}")
    assert mean > MIN_MEAN_DICE, f"mean foreground Dice {mean:.3f} <= {MIN_MEAN_DICE}: per class {dice}"


@pytest.mark.slow
def test_self_prompt_sam_trains_and_predicts(workspace):
    env = nnunet_env(workspace)
    trainer = "SelfPromptSAMTrainer_tiny_e2e"
    run_tool([str(BIN / "nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    model = _model_folder(workspace, trainer, "3d_fullres")
    log = sorted((model / "fold_0").glob("training_log_*.txt"))[-1].read_text()
    assert "Self-Prompt-SAM stage 1 from epoch 0" in log and "Self-Prompt-SAM stage 2 from epoch 4" in log
    out = workspace / "pred_self_prompt"
    images = workspace / "raw" / "Dataset990_Phantom" / "imagesTs"
    predict = [str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", str(DATASET)]
    run_tool(predict + ["-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu"], env)
    _evaluate(workspace, model, out)


@pytest.mark.slow
def test_2d_configuration_trains_and_predicts(workspace):
    env = nnunet_env(workspace)
    run_tool(
        [
            str(BIN / "nnUNetv2_train"),
            str(DATASET),
            "2d",
            "0",
            "-tr",
            "MaskSAMTrainer_tiny_e2e2d",
            "-device",
            "cpu",
            "--npz",
        ],
        env,
    )
    model = _model_folder(workspace, "MaskSAMTrainer_tiny_e2e2d", "2d")
    plans = json.loads((model / "plans.json").read_text())["configurations"]["2d"]
    assert plans["patch_size"] == plans["nnunet_sam"]["patch_size"] and len(plans["patch_size"]) == 2
    one = workspace / "one_case"
    one.mkdir()
    src = sorted((workspace / "raw" / "Dataset990_Phantom" / "imagesTs").glob("*.nii.gz"))[0]
    shutil.copy(src, one / src.name)
    out = workspace / "pred2d"
    run_tool(
        [
            str(BIN / "nnUNetv2_predict"),
            "-i",
            str(one),
            "-o",
            str(out),
            "-d",
            str(DATASET),
            "-c",
            "2d",
            "-f",
            "0",
            "-tr",
            "MaskSAMTrainer_tiny_e2e2d",
            "-device",
            "cpu",
            "--save_probabilities",
        ],
        env,
    )
    case = src.name.replace("_0000.nii.gz", "")
    pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    ref = sitk.ReadImage(str(src))
    assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
    probs = np.load(out / f"{case}.npz")["probabilities"]
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
