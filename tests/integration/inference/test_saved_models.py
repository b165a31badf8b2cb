"""Models trained with earlier versions of the package still load and predict the same.

``tests/fixtures/saved_models/`` holds model folders written by ``tests/fixtures/make_saved_models.py`` with
version 0.1.0 (before options were saved in the record: format 1), each with a held-out image and what that version
predicted for it. Never regenerate these folders to make this test pass: a difference means that a model a user
trained earlier now predicts differently. A later version adds its own folders beside them.

Predictions run on one thread, as when the fixtures were made, and must be bit-identical: with another thread
count, float sums run in another order and the logits change in their last bits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sam_testing import TESTS

sys.path.insert(0, str(TESTS / "fixtures"))
from make_saved_models import radsam_seed_logits  # noqa: E402  (how the fixtures computed it)

FIXTURES = TESTS / "fixtures" / "saved_models"
FOLDERS = sorted(p.parent for p in FIXTURES.glob("*/*/plans.json"))


@pytest.fixture(autouse=True)
def _one_thread_no_checkpoint_folder(monkeypatch):
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)  # inference needs no SAM checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fixtures_exist():
    names = {f.name.split("__")[0] for f in FOLDERS}
    assert {
        "MaskSAMTrainer_tiny",
        "SelfPromptSAMTrainer_tiny",
        "SAM3DAdapterTrainer_tiny",
        "SAM3DAdapterTrainer_prompted_tiny",
        "PanSAMTrainer_tiny",
        "RadSAMTrainer_tiny",
    } <= names


def _preprocessed(predictor, folder: Path) -> np.ndarray:
    reader = predictor.plans_manager.image_reader_writer_class()
    image, properties = reader.read_images([str(folder / "image_0000.nii.gz")])
    data, _, _ = predictor.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
        image, None, properties, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    )
    return data


@pytest.mark.parametrize("folder", [f for f in FOLDERS if not f.name.startswith("RadSAM")], ids=lambda f: f.name)
def test_saved_model_predicts_as_when_it_was_trained(folder: Path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_sam.inference.prompted import PromptedPredictor

    prompted = (folder / "points.json").is_file()
    predictor_class = PromptedPredictor if prompted else nnUNetPredictor
    predictor = predictor_class(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    if prompted:
        points = torch.tensor(json.loads((folder / "points.json").read_text()))
        predictor.points, predictor.point_labels = points[:, :3], points[:, 3].long()
        predictor.crop_to_clicks = False  # the fixture's protocol: every sliding-window patch (0.1.0's only one)
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(_preprocessed(predictor, folder)))
    expected = np.load(folder / "expected_logits.npy")
    logits = logits.float().numpy()
    np.testing.assert_array_equal(logits, expected)


@pytest.mark.parametrize("folder", [f for f in FOLDERS if f.name.startswith("RadSAM")], ids=lambda f: f.name)
def test_saved_radsam_model_segments_as_when_it_was_trained(folder: Path):
    from nnunet_sam.inference.radsam import Prompt, RadSAMModel, SliceModel, segment_from_prompt

    model = RadSAMModel(str(folder), 0)
    image, properties = model.read([str(folder / "image_0000.nii.gz")])
    data, _, _ = model.preprocess(image, properties)
    prompt = json.loads((folder / "prompt.json").read_text())
    slices = SliceModel(model.network, data)
    mask = segment_from_prompt(
        slices, Prompt("point", prompt["slice"], point=tuple(prompt["point"])), (0, data.shape[1] - 1)
    ).mask
    np.testing.assert_array_equal(mask, np.load(folder / "expected_mask.npy"))
    logits = radsam_seed_logits(slices, prompt).numpy()
    np.testing.assert_array_equal(logits, np.load(folder / "expected_seed_logits.npy"))
