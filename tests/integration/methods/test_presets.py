"""Paper presets: every preset trainer has exactly the settings of its README row and is found by nnU-Net."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sam_testing import dataset_json, minimal_plans, write_standin_checkpoint

from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.benchmarking.configs import on_meta
from nnunet_sam.network_architectures import masksam as masksam_net
from nnunet_sam.network_architectures import pansam as pansam_net
from nnunet_sam.network_architectures import sam3d_adapter as sam3d_net
from nnunet_sam.network_architectures import self_prompt_sam as self_prompt_net
from nnunet_sam.prompting.pansam_points import PointPromptConfig
from nnunet_sam.trainer_shim import nnunet_sam_trainers as shim
from nnunet_sam.trainers import base, masksam, pansam, radsam, sam3d_adapter, self_prompt_sam
from nnunet_sam.trainers.base import SAMTrainer

CPU = torch.device("cpu")

# name: (module, configuration, planned patch, foreground labels, expected settings) -- the README table's rows.
PRESETS = {
    "MaskSAMTrainer_ACDC": (masksam, "3d_fullres", [10, 256, 224], 3, dict(
        backbone="vit_b", patch=[4, 256, 256], input=1024, queries=8, epochs=500, batch=2, optimizer="sgd",
        lr=1e-3, weight_decay=3e-5, mask_weights=(1.5, 1.5))),
    "MaskSAMTrainer_AMOS": (masksam, "3d_fullres", [64, 160, 192], 15, dict(
        backbone="vit_h", patch=[9, 512, 512], input=512, queries=24, epochs=1000, batch=2, optimizer="adamw",
        lr=1e-3, weight_decay=3e-5, mask_weights=None)),
    "MaskSAMTrainer_Synapse": (masksam, "3d_fullres", [64, 160, 160], 8, dict(
        backbone="vit_h", patch=[26, 256, 256], input=256, queries=24, epochs=1000, batch=2, optimizer="sgd",
        lr=1e-3, weight_decay=3e-5, mask_weights=(1.5, 1.5))),
    "SelfPromptSAMTrainer_paper": (self_prompt_sam, "3d_fullres", [10, 256, 224], 3, dict(
        backbone="vit_b", patch=[4, 256, 256], input=1024, queries=None, epochs=1000, batch=2, optimizer="sgd",
        lr=1e-2, weight_decay=3e-5, mask_weights=None)),
    "SAM3DAdapterTrainer_prompted_paper": (sam3d_adapter, "3d_fullres", [64, 160, 160], 1, dict(
        backbone="vit_b", patch=[128, 128, 128], input=512, queries=None, epochs=500, batch=1, optimizer="adamw",
        lr=4e-4, weight_decay=0.0, mask_weights=None)),
    "SAM3DAdapterTrainer_paper": (sam3d_adapter, "3d_fullres", [64, 160, 160], 1, dict(
        backbone="vit_b", patch=[128, 128, 128], input=512, queries=None, epochs=500, batch=1, optimizer="adamw",
        lr=4e-4, weight_decay=0.0, mask_weights=None)),
    "PanSAMTrainer_NIH": (pansam, "3d_fullres", [64, 160, 160], 1, dict(
        backbone="vit_h", patch=[4, 512, 512], input=1024, queries=None, epochs=1000, batch=2, optimizer="adamw",
        lr=5e-4, weight_decay=5e-5, mask_weights=None)),
    "RadSAMTrainer_AMOS": (radsam, "2d", [448, 448], 15, dict(
        backbone="vit_b", patch=[512, 512], input=1024, queries=None, epochs=1000, batch=2, optimizer="adamw",
        lr=1e-5, weight_decay=3e-5, mask_weights=None)),
}  # fmt: skip


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_the_settings_of_its_table_row(workspace, name):
    module, configuration, planned, foreground, want = PRESETS[name]
    cls = getattr(module, name)
    spec = get_backbone(cls.backbone)
    write_standin_checkpoint(workspace / str(spec.checkpoint_file), cls.backbone)
    trainer = cls(minimal_plans(planned, configuration), configuration, 0, dataset_json(foreground), CPU)
    saved = trainer.plans_manager.plans["configurations"][configuration]
    block = json.loads(json.dumps(saved["nnunet_sam"]))
    assert block["backbone"] == want["backbone"] == spec.name
    assert block["patch_size"] == saved["patch_size"] == want["patch"]
    assert block["sam_input_size"] == want["input"]
    if want["queries"] is not None:
        assert block["num_queries"] == want["queries"]
    assert trainer.configuration_manager.batch_size == want["batch"]
    assert trainer.num_epochs == want["epochs"] and trainer.num_iterations_per_epoch == 250
    assert cls.optimizer_name == want["optimizer"]
    assert trainer.initial_lr == pytest.approx(want["lr"]) and trainer.weight_decay == pytest.approx(
        want["weight_decay"]
    )
    if want["mask_weights"] is not None:  # read by the MaskSAM loss (trainer attributes of that name)
        assert (cls.mask_bce_weight, cls.mask_dice_weight) == want["mask_weights"]

    # the network the model's record rebuilds (nnUNetv2_predict) has that resolution
    net = on_meta(lambda: cls.build_network(block, 1, foreground + 1))
    grid = want["input"] // spec.patch_size
    assert net.sam.image_encoder.pos_embed.shape[1:3] == (grid, grid)
    if isinstance(net, sam3d_adapter.SAM3DAdapterNetwork):
        assert net.encoder.grid == (want["patch"][0] // cls.slice_group, grid, grid)
    elif hasattr(net, "num_queries"):
        assert net.num_queries == want["queries"]
    if cls.input_scale in (2, 4) and getattr(net.stem, "learned_upsampling", None) is not None:
        assert net.stem.learned_upsampling  # MaskSAM's stem / Self-Prompt-SAM's MAdapter learn the x2^k


def test_a_preset_refuses_a_configuration_of_the_other_dimensionality(workspace):
    write_standin_checkpoint(workspace / "sam_vit_b_01ec64.pth", "vit_b")
    with pytest.raises(ValueError, match=r"fixes the patch \[4, 256, 256\].*3d .*Train the 3d"):
        masksam.MaskSAMTrainer_ACDC(minimal_plans([256, 256], "2d"), "2d", 0, dataset_json(3), CPU)


def test_every_trainer_class_is_exported_to_nnunet():
    """Each trainer class of the trainers modules (presets included) is in the shim nnU-Net imports."""
    defined = {
        name
        for module in (masksam, self_prompt_sam, sam3d_adapter, pansam, radsam)
        for name, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, SAMTrainer) and obj is not SAMTrainer and obj.__module__ == module.__name__
    }
    assert set(PRESETS) <= defined
    assert defined == set(shim.__all__)


def test_nnunet_finds_every_preset_by_name(tmp_path):
    """The lookup of ``nnUNetv2_train -tr NAME`` in a fresh interpreter (the start-up hook registers the shim)."""
    code = (
        "import json\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        f"print('RESULT:' + json.dumps({{n: find(n).__module__ for n in {sorted(PRESETS)!r}}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "NNUNET_SAM_NO_REGISTER")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.split("RESULT:")[-1])
    assert found == {name: PRESETS[name][0].__name__ for name in PRESETS}


# ---- one rule, a source per field (issue 25, items 1-3 and 7) ----------------------------------------------------
def _presets() -> dict[str, type]:
    return {name: cls for name, cls in vars(shim).items() if isinstance(cls, type) and base.is_preset(cls)}


ABLATION_PRESETS = {
    f"{preset.__name__}_{row}": (preset, rows[row])
    for preset, rows in (
        (masksam.MaskSAMTrainer_ACDC, masksam_net.ABLATION_ROWS),
        (self_prompt_sam.SelfPromptSAMTrainer_paper, self_prompt_net.ABLATION_ROWS),
        (sam3d_adapter.SAM3DAdapterTrainer_paper, sam3d_net.ADAPTATION_ROWS),
        (sam3d_adapter.SAM3DAdapterTrainer_prompted_paper, sam3d_net.PROMPT_ROWS),
    )
    for row in rows
}
TEXT_POINTS = PointPromptConfig(num_border=2, num_trivial_background=2)
VARIANTS = {  # the other reading of each disputed field: name -> (preset, {attribute: paper value})
    "MaskSAMTrainer_ACDC_paperLR": ("MaskSAMTrainer_ACDC", {"learning_rate": 1e-2}),
    "MaskSAMTrainer_AMOS_paperLR": ("MaskSAMTrainer_AMOS", {"learning_rate": 1e-2, "optimizer_name": "sgd"}),
    "MaskSAMTrainer_Synapse_paperLR": ("MaskSAMTrainer_Synapse", {"learning_rate": 1e-2}),
    "MaskSAMTrainer_AMOS_vitb": ("MaskSAMTrainer_AMOS", {"backbone": "vit_b"}),
    "MaskSAMTrainer_Synapse_vitb": ("MaskSAMTrainer_Synapse", {"backbone": "vit_b"}),
    "PanSAMTrainer_NIH_vitb": ("PanSAMTrainer_NIH", {"backbone": "vit_b"}),
    "RadSAMTrainer_AMOS_noMask": ("RadSAMTrainer_AMOS", {"training_mask_prompts": False}),
    "RadSAMTrainer_AMOS_noEdit": ("RadSAMTrainer_AMOS", {"correction_rounds": 0}),
    "RadSAMTrainer_AMOS_noMaskNoEdit": ("RadSAMTrainer_AMOS", {"training_mask_prompts": False, "correction_rounds": 0}),
    "PanSAMTrainer_NIH_textpoints": (
        "PanSAMTrainer_NIH",
        {"options": pansam_net.PanSAMOptions(aggregator_layers=3, points=TEXT_POINTS)},
    ),
}


def test_every_preset_gives_a_source_for_every_field():
    presets = _presets()
    lighter = {"SAM3DAdapterTrainer_prompted_paper_light"}  # a paper regime with this package's lighter network
    assert set(PRESETS) | set(VARIANTS) | set(ABLATION_PRESETS) | lighter == set(presets)
    for name, cls in presets.items():
        sources = cls.preset_sources
        missing = (set(base.PRESET_FIELDS) | base.preset_set_fields(cls)) - set(sources)
        assert not missing, f"{name}: no source for {sorted(missing)}"
        for field, source in sources.items():
            assert hasattr(cls, field), f"{name}: source for an unknown field {field}"
            kind = source.split(":", 1)[0]
            assert kind in base.SOURCE_KINDS and source[len(kind) :].startswith(": "), f"{name}.{field}: {source!r}"


def test_disputed_fields_take_the_code_and_the_paper_reading_is_a_named_variant():
    """MaskSAM's public trainers (the code behind the published numbers) set LR 1e-3, AdamW eps 1e-4 on AMOS, ViT-H
    on AMOS/Synapse and 24 Synapse queries; the paper's readings are variants that change only those fields."""
    amos, acdc, synapse = masksam.MaskSAMTrainer_AMOS, masksam.MaskSAMTrainer_ACDC, masksam.MaskSAMTrainer_Synapse
    assert (amos.optimizer_name, amos.learning_rate, amos.optimizer_eps, amos.backbone) == (
        "adamw",
        1e-3,
        1e-4,
        "vit_h",
    )
    assert (acdc.optimizer_name, acdc.learning_rate) == ("sgd", 1e-3)
    assert (synapse.learning_rate, synapse.num_queries, synapse.backbone) == (1e-3, 24, "vit_h")
    presets = _presets()
    for name, (parent, paper_values) in VARIANTS.items():
        variant, parent = presets[name], presets[parent]
        assert issubclass(variant, parent)
        for field, value in paper_values.items():
            assert getattr(variant, field) == value and variant.preset_sources[field].startswith("paper: ")
        same = set(base.PRESET_FIELDS) - set(paper_values) - {"optimizer_eps"}
        assert {f: getattr(variant, f) for f in same} == {f: getattr(parent, f) for f in same}


def test_sam3d_adapter_preset_optimiser_is_the_public_code():
    cls = sam3d_adapter.SAM3DAdapterTrainer_prompted_paper
    assert (cls.optimizer_weight_decay, cls.grad_clip, cls.lr_schedule) == (0.0, 1.0, "linear")
    assert (cls.points_per_class, cls.random_points) == (10, 20)
    assert "one click" not in cls.__doc__.lower()


def test_linear_schedule_equals_torch_linear_lr_stepped_per_epoch():
    """The 3DSAM-adapter code's LinearLR(start 1, end 0.01, total 500) stepped once per epoch."""
    p = [torch.nn.Parameter(torch.zeros(1))]
    ours = base.LinearLRScheduler(torch.optim.AdamW(p, 4e-4), 4e-4, 500)
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], 4e-4)
    reference = torch.optim.lr_scheduler.LinearLR(reference_opt, start_factor=1.0, end_factor=0.01, total_iters=500)
    for epoch in range(520):
        ours.step(epoch)  # nnU-Net: lr_scheduler.step(current_epoch) at the start of each epoch
        assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-9)
        reference_opt.step()
        reference.step()


def test_self_prompt_sam_preset_cites_no_backbone_to_its_paper():
    sources = self_prompt_sam.SelfPromptSAMTrainer_paper.preset_sources
    assert sources["backbone"].startswith("chosen: ")


@pytest.mark.parametrize("name", sorted(ABLATION_PRESETS))
def test_ablation_row_runs_in_the_paper_regime(name):
    preset, options = ABLATION_PRESETS[name]
    cls = getattr(shim, name)
    assert issubclass(cls, preset) and cls.options == options and cls.__module__ == preset.__module__
    assert {f: getattr(cls, f) for f in base.PRESET_FIELDS} == {f: getattr(preset, f) for f in base.PRESET_FIELDS}
    assert pickle.loads(pickle.dumps(cls)) is cls  # spawn workers and checkpoints pickle the class by name


def test_docs_hold_every_preset_table():
    """docs/presets.md holds each preset's table as generated from its class (no drift between code and docs)."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "presets.md").read_text()
    for name, cls in _presets().items():
        if name not in ABLATION_PRESETS:
            assert base.preset_markdown(cls) in text, f"docs/presets.md: table of {name} out of date"


def test_nnunet_finds_every_preset_variant_and_ablation_row_by_name(tmp_path):
    names = sorted(set(VARIANTS) | set(ABLATION_PRESETS))
    comparison = ("houlsby", "stAdapter", "medTuning", "fullFT")  # 3DSAM-adapter's comparison with other adaptations
    assert {f"SAM3DAdapterTrainer_paper_{row}" for row in comparison} <= set(names)
    code = (
        "import json\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        f"print('RESULT:' + json.dumps({{n: find(n).__name__ for n in {names!r}}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "NNUNET_SAM_NO_REGISTER")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.split("RESULT:")[-1]) == {n: n for n in names}


def test_pansam_preset_aggregator_has_the_papers_14k_parameters():
    """PanSAM's appendix: a 3D aggregator of 14 K parameters (the default 2-layer one has 7.4 K); Table 3: 4 points."""
    cls = pansam.PanSAMTrainer_NIH
    block = cls.sam_block({"patch_size": [64, 160, 160]}, 2)
    net = on_meta(lambda: cls.build_network(block, 1, 2))
    count = sum(p.numel() for p in net.aggregator.parameters())
    assert abs(count / 14e3 - 1) < 0.05, count
    assert cls.record_options().points.num_points == 4
    assert pansam.PanSAMTrainer_NIH_textpoints.options.points.num_points == 6
