"""Model folders are loaded in one place (nnunet_sam.inference.model_folder): each unusable folder is refused
with a message naming the problem and the fix, and every command refuses another method's model the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from sam_testing import TESTS

from nnunet_sam.inference.model_folder import (
    ModelFolderError,
    WrongMethodError,
    check_model_folder,
    load_predictor,
)

FIXTURES = TESTS / "fixtures" / "saved_models"


def _fixture(trainer: str) -> Path:
    return next(p.parent for p in FIXTURES.glob(f"*/{trainer}__*/plans.json"))


@pytest.fixture(autouse=True)
def _no_checkpoint_folder(monkeypatch):
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)


def test_unusable_folders_are_refused_before_loading(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(_fixture("MaskSAMTrainer_tiny"), model)
    (model / "plans.json").rename(model / "plans.json.bak")
    with pytest.raises(ModelFolderError, match=r"is not an nnU-Net model folder \(no plans.json\); give the"):
        check_model_folder(str(model))
    (model / "plans.json.bak").rename(model / "plans.json")
    with pytest.raises(ModelFolderError, match=r"fold 3 was never trained: .* Trained folds: 0 \(-f\)"):
        load_predictor(str(model), [3])
    (model / "fold_0" / "checkpoint_best.pth").write_bytes(b"")
    with pytest.raises(ModelFolderError, match=r"checkpoint_best.pth is an empty .* Intact checkpoints .*: "
                       r"checkpoint_final.pth \(choose one with -chk NAME\)"):  # fmt: skip
        load_predictor(str(model), [0], "checkpoint_best.pth")
    predictor = load_predictor(str(model), [0])
    assert predictor.trainer_name == "MaskSAMTrainer_tiny" and predictor.device == torch.device("cpu")


def test_another_methods_model_is_named_by_each_loader(tmp_path):
    from nnunet_sam.evaluation.pansam import evaluate
    from nnunet_sam.inference.prompted import initialize_predictor
    from nnunet_sam.inference.radsam import RadSAMModel
    from nnunet_sam.serving.editors import load_model

    masksam = str(_fixture("MaskSAMTrainer_tiny"))
    with pytest.raises(WrongMethodError, match=r"holds no RadSAM model \(trainer MaskSAMTrainer_tiny, network "):
        RadSAMModel(masksam, 0)
    with pytest.raises(WrongMethodError, match="holds no point-prompted model .*SAM3DAdapterTrainer_prompted"):
        initialize_predictor(masksam, [0])
    with pytest.raises(WrongMethodError, match="holds no PanSAM model .*; evaluate a model trained with PanSAMTrainer"):
        evaluate(masksam, [("other", tmp_path, tmp_path)])
    with pytest.raises(ValueError, match="holds no point-prompted model .*nnunet_sam_serve serves RadSAM"):
        load_model(masksam)  # neither RadSAM nor prompted: the server says what it serves


class _Payload:
    """Unpickled as ``open(path, "w")``: creates ``path`` if loading runs code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted(tmp_path: Path, trainer: str) -> tuple[Path, Path]:
    """(copy of a saved model whose checkpoint also holds a payload, the file the payload would create)."""
    model, marker = tmp_path / trainer, tmp_path / f"{trainer}_code_ran"
    shutil.copytree(_fixture(trainer), model)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    torch.save({**torch.load(checkpoint, weights_only=True), "extra": _Payload(marker)}, checkpoint)
    return model, marker


def test_checkpoint_that_would_run_code_is_refused_by_every_loader(tmp_path):
    """nnU-Net would unpickle it (weights_only=False) and run its code; every loader of the package refuses it."""
    from nnunet_sam.inference.prompted import initialize_predictor
    from nnunet_sam.inference.radsam import RadSAMModel
    from nnunet_sam.serving.editors import load_model

    refused = r"checkpoint_final.pth is refused: loading it needs io.open, which no nnU-Net checkpoint holds"
    masksam, marker = _crafted(tmp_path, "MaskSAMTrainer_tiny")
    with pytest.raises(ModelFolderError, match=refused):
        load_predictor(str(masksam), [0])  # nnunet_sam_predict, the evaluations
    radsam, radsam_marker = _crafted(tmp_path, "RadSAMTrainer_tiny")
    prompted, prompted_marker = _crafted(tmp_path, "SAM3DAdapterTrainer_prompted_tiny")
    with pytest.raises(ModelFolderError, match=refused):
        RadSAMModel(str(radsam), 0)  # nnunet_sam_segment_radsam
    with pytest.raises(ModelFolderError, match=refused):
        initialize_predictor(str(prompted), [0])  # nnunet_sam_predict_prompted
    with pytest.raises(ModelFolderError, match=refused):
        load_model(str(radsam))  # nnunet_sam_serve -m
    assert not any(m.exists() for m in (marker, radsam_marker, prompted_marker)), "a checkpoint's code ran"


def test_predict_command_refuses_a_checkpoint_that_would_run_code(tmp_path):
    import subprocess
    import sys

    model, marker = _crafted(tmp_path, "MaskSAMTrainer_tiny")
    (tmp_path / "in").mkdir()
    shutil.copy(model / "image_0000.nii.gz", tmp_path / "in" / "case_0000.nii.gz")
    command = Path(sys.executable).parent / "nnunet_sam_predict"
    args = ["-i", tmp_path / "in", "-o", tmp_path / "out", "-m", model, "-f", "0", "-device", "cpu"]
    result = subprocess.run([command, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "nnunet_sam_predict: error: " in result.stderr and "is refused: loading it needs io.open" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def test_plans_edited_after_training_are_refused(tmp_path):
    """A hand-edited plans.json (patch size changed) changed the segmentation without a word (issue 29, item 9):
    it must match the plans stored in the checkpoint; the batch size (training only) may differ."""
    import json

    model = tmp_path / "model"
    shutil.copytree(_fixture("MaskSAMTrainer_tiny"), model)
    plans = json.loads((model / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration["batch_size"] = 7
    (model / "plans.json").write_text(json.dumps(plans))
    load_predictor(str(model), [0])
    configuration["patch_size"] = [8, 64, 64]
    configuration["nnunet_sam"]["patch_size"] = [8, 64, 64]
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(
        ModelFolderError,
        match=r"plans.json does not match the plans checkpoint_final.pth was trained with \(configuration 3d_fullres\)"
        r": .*patch_size: \[8, 64, 64\] in plans.json, \[4, 64, 64\] in the checkpoint.*Restore the plans.json",
    ):
        load_predictor(str(model), [0])


@pytest.mark.parametrize("problem", ["not_json", "not_an_object", "label_removed", "plans_not_json"])
def test_damaged_or_edited_dataset_json_is_named(tmp_path, problem):
    """Before: a traceback without the file's name, or a tensor size mismatch (also for plans.json)."""
    import json

    model = tmp_path / "model"
    shutil.copytree(_fixture("MaskSAMTrainer_tiny"), model)
    path = model / "dataset.json"
    if problem == "not_json":
        path.write_text('{"labels": ')
        message = r"dataset.json is not valid JSON .*restore the file written by training"
    elif problem == "plans_not_json":
        (model / "plans.json").write_text('{"configurations": ')
        message = r"plans.json is not valid JSON .*restore the file written by training"
    elif problem == "not_an_object":
        path.write_text("[1, 2]")
        message = r"dataset.json holds a list, not a JSON object"
    else:
        content = json.loads(path.read_text())
        content["labels"].pop(next(k for k in content["labels"] if k != "background"))
        path.write_text(json.dumps(content))
        message = r"dataset.json does not match the dataset.json checkpoint_final.pth was trained with: labels "
    with pytest.raises(ModelFolderError, match=message):
        load_predictor(str(model), [0])


@pytest.mark.parametrize("content", ["zip", "no_checkpoint_dict"])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content):
    """A valid zip (its CRCs pass) that torch cannot load, or a torch file without nnU-Net's keys: a message naming
    the file instead of a torch error or KeyError (issue 29 item 13)."""
    import zipfile

    model = tmp_path / "model"
    shutil.copytree(_fixture("MaskSAMTrainer_tiny"), model)
    path = model / "fold_0" / "checkpoint_final.pth"
    if content == "zip":
        path.unlink()
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
        message = r"checkpoint_final.pth is not a loadable PyTorch checkpoint \(RuntimeError: "
    else:
        torch.save({"weights": torch.zeros(2)}, path)
        message = r"checkpoint_final.pth is no nnU-Net checkpoint: it lacks network_weights, trainer_name, init_args"
    with pytest.raises(ModelFolderError, match=message):
        load_predictor(str(model), [0])
