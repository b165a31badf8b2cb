"""nnunet_sam_make_zero_shot's refusals (the model itself: tests/e2e/test_real_images.py, on the real CT)."""

from __future__ import annotations

import pytest

from nnunet_sam.backbones.checkpoints import CheckpointError
from nnunet_sam.cli.zero_shot import main
from nnunet_sam.inference.zero_shot import ZeroShotError, make_zero_shot_model, zero_shot_record


def test_zero_shot_record_asks_for_the_contract_box_propagation_and_native_spacing():
    record = zero_shot_record("lite_medsam")
    assert record.sam_input_size == 256 and record.patch_size == (256, 256)
    options = record.options
    assert options.input_contract and options.prompt_tokens == "sam" and options.propagation == "box"
    assert options.native_spacing and options.ct_window_hu == (-160.0, 240.0)
    assert zero_shot_record("vit_b", (-200.0, 300.0)).options.ct_window_hu == (-200.0, 300.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "tiny"}, "no zero-shot model for the backbone 'tiny'"),
        ({"modality": "PET"}, "unknown modality 'PET'"),
        ({"ct_window_hu": (240.0, -160.0)}, "empty or reversed"),
    ],
)
def test_unusable_requests_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ZeroShotError, match=message):
        make_zero_shot_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_missing_sam_weights_are_named_and_nothing_is_left(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth"):
        make_zero_shot_model(tmp_path / "m", backbone="vit_b")
    assert main(["-o", str(tmp_path / "m"), "--backbone", "vit_b"]) == 2
    assert "sam_vit_b_01ec64.pth" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
