"""The demo's step runner (progress, estimates, status while a tool is silent), its backbone choice, the demo
trainers' validation and thread hooks, and the sliding-window cost used in logs and by the prediction benchmark."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_sam.benchmarking.prediction import benchmark_prediction
from nnunet_sam.demo import pipeline as demo
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAMCPUDemo
from nnunet_sam.training.planning import sliding_window_cost, window_cost_note


def test_step_progress_estimates_time_left_from_finished_units():
    progress = demo.StepProgress(expected=100, pattern=r"Epoch time:", total=4)
    assert progress.status(30) == "0:30 elapsed, 0/4 done, about 1:10 left"  # no unit yet: the expectation
    assert not progress.feed("Epoch 0\n")
    assert progress.feed("2026-01-01 00:00:00: Epoch time: 12.5 s\n") and progress.feed("Epoch time: 9 s\n")
    assert progress.status(60) == "1:00 elapsed, 2/4 done, about 1:00 left"  # 30 s per unit, 2 to go
    assert demo.StepProgress(expected=20).status(25) == "0:25 elapsed, taking longer than expected"


def test_run_prints_a_status_while_the_tool_is_silent_and_names_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(demo, "HEARTBEAT_S", 0.3)
    code = "import time; print('unit', flush=True); time.sleep(1.5); print('unit')"
    demo._run("train", [sys.executable, "-c", code], {}, demo.StepProgress(10, r"^unit", 2))
    out = capsys.readouterr().out
    assert re.search(r"\[train\] 0:0\d elapsed, 1/2 done, about 0:0\d left", out)  # after the first unit
    assert out.count("[train]") >= 3  # the first unit, silent periods, the second unit
    assert "2/2 done, finishing" in out
    with pytest.raises(demo.DemoError, match=r"step 'predict' failed: .* exited with code 3"):
        demo._run("predict", [sys.executable, "-c", "raise SystemExit(3)"], {})


def test_default_trainer_is_the_tiny_demo_and_lite_medsam_is_asked_for(monkeypatch):
    assert demo.default_trainer() == demo.DEFAULT_TRAINER == "SelfPromptSAMTrainer_tiny_demo"
    assert demo.trainer_backbone(demo.DEFAULT_TRAINER) == "tiny"
    monkeypatch.setattr(demo, "lite_medsam_available", lambda: False)
    with pytest.raises(demo.DemoError, match="pip install"):
        demo.default_trainer("lite_medsam")
    with pytest.raises(ValueError, match="backbone must be one of"):
        demo.default_trainer("vit_b")
    assert demo.main(["--backbone", "lite_medsam", "--stop-after", "phantom"]) == 1


class _Trainer:
    """Stands in for nnUNetTrainer: records the final validation and the log."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.validated, self.log = 0, []
        self.was_initialized = False  # nnUNetTrainer: True once the network exists (resumed with --c)

    def print_to_log_file(self, *args) -> None:
        self.log.append(" ".join(map(str, args)))

    def on_train_start(self) -> None:
        pass

    def on_train_end(self) -> None:
        pass

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.validated += 1


@pytest.mark.parametrize("mixin", [CPUDemo, LiteMedSAMCPUDemo])
def test_demo_trainers_skip_only_the_validation_after_training(mixin):
    trainer = type("DemoTrainer", (mixin, _Trainer), {})()
    trainer.perform_actual_validation()  # nnUNetv2_train --val: nnU-Net's validation runs
    assert trainer.validated == 1
    trainer.on_train_end()
    trainer.perform_actual_validation()  # right after training: skipped, and the log says how to validate
    assert trainer.validated == 1 and "--val" in trainer.log[-1]


def test_demo_trainers_train_with_one_cpu_thread():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        trainer = type("DemoTrainer", (CPUDemo, _Trainer), {})()
        trainer.on_train_start()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        trainer.device = torch.device("meta")  # not a CPU training: nnU-Net's setting stays
        trainer.on_train_start()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_demo_trainers_seed_a_fresh_training_but_not_a_resumed_one():
    def draws(initialized: bool) -> tuple:
        trainer = type("DemoTrainer", (CPUDemo, _Trainer), {})()
        trainer.device = torch.device("meta")  # leave the thread setting alone
        trainer.was_initialized = initialized
        random.seed(), np.random.seed(), torch.seed()  # whatever state the caller left
        trainer.on_train_start()
        return random.random(), np.random.rand(), torch.rand(1).item()

    assert draws(False) == draws(False)  # weights, batches and augmentation start from the same state
    assert draws(True) != draws(True)  # --c: the resumed run's generators are not reset to the start


def test_demo_uses_small_phantoms_and_trains_with_the_single_threaded_augmenter(tmp_path, monkeypatch, capsys):
    """The train step alone gets nnUNet_n_proc_DA=0 (nnU-Net's planner takes it as a thread count)."""
    calls: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(demo, "_run", lambda step, cmd, env, progress=None: calls.setdefault(step, env))
    plan = {"patch_size": [4, 64, 64], "spacing": [3, 1, 1], "batch_size": 2}
    monkeypatch.setattr(demo, "_read_plan", lambda *_: plan)
    out = demo.run_demo(tmp_path, stop_after="train")
    assert calls["train"]["nnUNet_n_proc_DA"] == "0" and "nnUNet_n_proc_DA" not in calls["preprocess"]
    image = sitk.ReadImage(str(next((Path(out["dataset_folder"]) / "imagesTs").iterdir())))
    assert image.GetSize()[::-1] == demo.DEMO_PHANTOM["shape"]
    expected = re.search(r"expected time: about (\d+):(\d\d)", capsys.readouterr().out)
    assert expected and 60 * int(expected[1]) + int(expected[2]) == round(sum(demo.EXPECTED_SECONDS["tiny"].values()))


@pytest.mark.parametrize(
    "shape, patch, step",
    [
        ((24, 96, 96), (4, 64, 64), 0.5),
        ((24, 96, 96), (4, 64, 64), 1.0),
        ((24, 96, 96), (24, 96, 96), 0.5),
        ((3, 50, 70), (4, 64, 64), 0.5),
        ((17, 130, 64), (4, 64, 64), 0.5),
    ],
)
def test_sliding_window_cost_counts_nnunet_tiles(shape, patch, step):
    """Tiles and coverage against the slicers of nnU-Net's own predictor (padded as nnU-Net pads)."""
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    fake = SimpleNamespace(
        configuration_manager=SimpleNamespace(patch_size=list(patch)), tile_step_size=step, verbose=False
    )
    slicers = nnUNetPredictor._internal_get_sliding_window_slicers(fake, padded)
    hits = np.zeros(padded)
    for s in slicers:
        hits[s[1:]] += 1
    assert hits.min() >= 1  # the tiles cover the volume
    cost = sliding_window_cost(shape, patch, step)
    assert cost.tiles == len(slicers) and cost.forwards == 8 * len(slicers)
    assert cost.coverage == pytest.approx(hits.mean())
    assert sliding_window_cost(shape, patch, step, None).forwards == len(slicers)


def test_window_cost_note_names_the_cheaper_choices():
    note = window_cost_note((24, 96, 96), (4, 64, 64))
    assert "44 tiles of 4x64x64" in note and "x 8 mirrors = 352 forwards" in note
    assert "--disable_tta: 44 forwards" in note and "--disable_tta -step_size 1: 24 forwards" in note
    assert "cheaper" not in window_cost_note((24, 96, 96), (24, 96, 96), None)


def test_prediction_benchmark_thread_settings_predict_the_same():
    result = benchmark_prediction(
        shape=(8, 64, 64), threads=[1, 2], mirroring=False, cheaper=False, forwards=1, log=lambda _: None
    )
    assert [m["model"] for m in result["models"]] == ["MaskSAM tiny", "Self-Prompt-SAM tiny", "nnU-Net U-Net"]
    assert [m["cost"]["tiles"] for m in result["models"]] == [3, 3, 1]
    for m in result["models"]:
        # nnU-Net sums the Gaussian-weighted tiles and the weights in float16 (relative step 2**-11): other float32
        # rounding (threads) moves a logit by up to about ten such steps (measured 0.006 of the logit range), which
        # can flip a label only where two classes are tied within that difference
        assert m["runs"][1]["max_rel_diff"] < 1e-2 and m["runs"][1]["clear_label_changes"] == 0
        assert m["per_forward_s"]["total"] > 0 and m["export_s"] > 0


def test_a_seeded_demo_training_repeats_exactly_on_one_machine(tmp_path, monkeypatch):
    """Issue 29 item 16: the README says a seeded demo run repeats on one machine (not across CPUs). Two fresh
    trainings of a demo trainer (network built after the seed, nnU-Net's data loading with the single-threaded
    augmenter, real train steps on preprocessed cases) end with bit-identical weights."""
    from sam_testing import dataset_json, preprocessed_plans, write_preprocessed_dataset

    from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny

    patch = [4, 32, 32]
    write_preprocessed_dataset(tmp_path / "preprocessed", patch)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # as nnunet_sam_demo trains
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    demo_trainer = type("MaskSAMTrainer_tiny_demo_test", (CPUDemo, MaskSAMTrainer_tiny), {})

    def train(run: int) -> dict[str, torch.Tensor]:
        monkeypatch.setenv("nnUNet_results", str(tmp_path / f"results{run}"))
        torch.manual_seed(run)  # whatever state the caller left: the demo's own seed must decide
        plans = preprocessed_plans(patch) | {"continue_training": False}
        trainer = demo_trainer(plans, "3d_fullres", 0, dataset_json(2), torch.device("cpu"))
        trainer.logger.plot_progress_png = lambda folder: None
        trainer.on_train_start()
        try:
            for _ in range(3):
                trainer.train_step(next(trainer.dataloader_train))
        finally:
            trainer._fold_lock.close()
        return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}

    threads = torch.get_num_threads()
    try:
        first, second = train(0), train(1)
    finally:
        torch.set_num_threads(threads)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
