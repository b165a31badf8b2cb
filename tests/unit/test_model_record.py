"""The model record: everything that shapes a network is saved with the model and rebuilt from there only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest
import torch
from sam_testing import dataset_json, minimal_plans
from torch import nn

from nnunet_sam.model_record import RECORD_FORMAT, ModelRecord, RecordError, build_from_record, options_from_json
from nnunet_sam.network_architectures.masksam import MaskSAMOptions
from nnunet_sam.network_architectures.pansam import PanSAMOptions
from nnunet_sam.prompting.pansam_points import PointPromptConfig
from nnunet_sam.trainers import masksam, pansam, radsam, sam3d_adapter, self_prompt_sam

CPU = torch.device("cpu")
ALL_TRAINERS = [
    masksam.MaskSAMTrainer_tiny,
    self_prompt_sam.SelfPromptSAMTrainer_tiny,
    sam3d_adapter.SAM3DAdapterTrainer_prompted_tiny,
    pansam.PanSAMTrainer_tiny,
    radsam.RadSAMTrainer_tiny,
]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    return tmp_path


def _saved_block(trainer_class, patch, configuration="3d_fullres", foreground=3) -> dict:
    """The plans block a training of ``trainer_class`` writes (through JSON, as in plans.json)."""
    trainer = trainer_class(minimal_plans(patch, configuration), configuration, 0, dataset_json(foreground), CPU)
    return json.loads(json.dumps(trainer.plans_manager.plans["configurations"][configuration]["nnunet_sam"]))


@pytest.mark.parametrize("trainer_class", ALL_TRAINERS, ids=lambda c: c.__name__)
def test_every_trainer_saves_its_options_and_rebuilds_them_exactly(workspace, trainer_class):
    is_2d = trainer_class is radsam.RadSAMTrainer_tiny
    foreground = 1 if trainer_class is pansam.PanSAMTrainer_tiny else 3
    block = _saved_block(
        trainer_class, [64, 64] if is_2d else [24, 96, 96], "2d" if is_2d else "3d_fullres", foreground
    )
    assert block["format"] == RECORD_FORMAT and isinstance(block["options"], dict)
    record = ModelRecord.from_block(block, trainer_class.record_options())
    assert record.options == trainer_class.record_options()
    assert ModelRecord.from_block(record.to_block(), trainer_class.record_options()) == record
    net = trainer_class.build_network(block, 1, foreground + 1)
    assert net.options == trainer_class.record_options()


def test_the_saved_record_wins_over_a_changed_class_default(workspace):
    """A later version (here: a subclass) changes an option default; the saved model keeps what it was trained with."""

    class Trained(masksam.MaskSAMTrainer_tiny):
        options = MaskSAMOptions(box_source="learned", mask_prompt=False)

    block = _saved_block(Trained, [24, 96, 96])

    class Later(Trained):  # the same trainer name in a later version, with other defaults
        options = MaskSAMOptions(box_source="mask", mask_prompt=True, encoder_adapter="vanilla")

    net = Later.build_network(block, 1, 4)
    assert net.options == Trained.options
    trained_keys = set(Trained.build_network(block, 1, 4).state_dict())
    assert set(net.state_dict()) == trained_keys  # same modules (the "vanilla" adapter of Later would differ)
    assert net.prompt_generator.box_head is not None  # learned boxes need the box head ("mask" boxes have none)


def test_pansam_target_label_is_saved(workspace):
    class Liver(pansam.PanSAMTrainer_tiny):
        target_label = 2

    block = _saved_block(Liver, [24, 96, 96])
    assert block["options"]["target_label"] == 2
    assert pansam.PanSAMTrainer_tiny.build_network(block, 1, 4).target_label == 2


@dataclass(frozen=True)
class _Nested:
    count: int = field(default=4, metadata={"legacy": 8})
    size: int = 3


@dataclass(frozen=True)
class _Options:
    kept: int = 1
    changed: str = field(default="new", metadata={"legacy": "old"})
    added: bool = field(default=True, metadata={"legacy": False})
    window: tuple[float, float] = (0.0, 1.0)
    nested: _Nested = field(default_factory=_Nested)


def test_records_before_options_were_saved_get_the_legacy_values():
    template = _Options(kept=5, nested=_Nested(size=7))
    legacy = options_from_json(None, template)
    assert legacy == _Options(kept=5, changed="old", added=False, nested=_Nested(count=8, size=7))


def test_fields_added_after_a_record_was_saved_take_their_legacy_value():
    saved = {"kept": 3, "changed": "new", "window": [-1.0, 2.0], "nested": {"size": 1}}
    options = options_from_json(saved, _Options())
    assert options.added is False and options.kept == 3 and options.window == (-1.0, 2.0)
    assert options.nested == _Nested(count=8, size=1)  # a nested field the record lacks: its legacy value too


def test_nested_options_survive_json():
    options = replace(PanSAMOptions(), points=replace(PointPromptConfig(), num_border=5), target_label=3)
    saved = json.loads(json.dumps(ModelRecord("tiny", (4, 64, 64), 64, 8, options).to_block()))
    assert ModelRecord.from_block(saved, PanSAMOptions()).options == options


def test_unknown_options_and_newer_formats_are_refused():
    block = ModelRecord("tiny", (4, 64, 64), 64, 8, MaskSAMOptions()).to_block()
    with pytest.raises(RecordError, match="newer version"):
        ModelRecord.from_block({**block, "options": {**block["options"], "future_switch": 1}}, MaskSAMOptions())
    with pytest.raises(RecordError, match="newer than this nnunet-sam version"):
        ModelRecord.from_block({**block, "format": RECORD_FORMAT + 1}, MaskSAMOptions())
    with pytest.raises(RecordError, match="lacks"):
        ModelRecord.from_block({"backbone": "tiny", "format": 2}, MaskSAMOptions())


def test_a_network_argument_the_record_cannot_supply_is_an_error():
    class NeedsMore(nn.Module):
        def __init__(self, backbone: str, in_channels: int, depth_of_something: int = 3) -> None:
            super().__init__()

    record = ModelRecord("tiny", (4, 64, 64), 64, 8, None)
    with pytest.raises(RecordError, match="depth_of_something"):
        build_from_record(NeedsMore, record, 1, 2)
