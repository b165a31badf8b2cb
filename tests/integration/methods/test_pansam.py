"""PanSAM: point generator, 3D aggregator, stage freezing, trainer stages and resuming, CLAHE, loss."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sam_testing import dataset_json, minimal_plans, nnunet_env, run_tool

from nnunet_sam.blocks.aggregator_3d import SliceAggregator3D
from nnunet_sam.demo.phantoms import make_phantom_dataset
from nnunet_sam.losses.segmentation import FocalDiceLoss
from nnunet_sam.network_architectures.pansam import STAGE_OUTPUT, PanSAMNetwork, PanSAMOptions, clahe_slices
from nnunet_sam.prompting.pansam_points import (
    LEGACY_POINTS,
    PointPromptConfig,
    background_mask,
    border,
    dilate,
    erode,
    foreground_mask,
    generate_points,
    to_pixels,
)
from nnunet_sam.trainers import pansam as trainers
from nnunet_sam.trainers.base import UnsupportedDatasetError

PATCH = (4, 32, 32)


def _square(size: int = 48, lo: int = 10, hi: int = 30) -> torch.Tensor:
    """A (1, size, size) probability map: 0.9 on rows and columns lo..hi-1, 0.05 elsewhere."""
    prob = torch.full((1, size, size), 0.05)
    prob[:, lo:hi, lo:hi] = 0.9
    return prob


def _rows_cols(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    rows = torch.nonzero(mask.any(-1))[:, -1].tolist()
    cols = torch.nonzero(mask.any(-2))[:, -1].tolist()
    return rows, cols


# ---- point generator ----------------------------------------------------------------------------------------------
def test_erosion_and_dilation_sizes_by_hand():
    mask = _square() > 0.5  # rows/cols 10..29 (20 px)
    eroded = erode(mask, 10)  # survives where offsets -5..+4 stay inside: 15..25 (11 px)
    assert _rows_cols(eroded) == (list(range(15, 26)), list(range(15, 26)))
    assert int(eroded.sum()) == 11 * 11 and bool((eroded <= mask).all()), "erosion must shrink, never grow"
    assert _rows_cols(dilate(mask, 5)) == (list(range(8, 32)), list(range(8, 32)))  # offsets -2..+2
    core = foreground_mask(_square())  # dilate(erode(., 10), 5): 13..27
    assert _rows_cols(core) == (list(range(13, 28)), list(range(13, 28))) and int(core.sum()) == 15 * 15
    # 4-neighbour border: the outline of the square, 4 * 20 - 4 pixels
    assert int(border(mask).sum()) == 76 and not bool(border(mask)[0, 11:29, 11:29].any())
    # odd window, image edge: erosion does not eat into a structure from outside the image
    edge = torch.zeros(1, 8, 8, dtype=torch.bool)
    edge[:, :4] = True
    assert _rows_cols(erode(edge, 3))[0] == [0, 1, 2]


def test_background_mask_excludes_the_dilated_prediction_and_unsure_pixels():
    prob = _square()
    prob[:, 40, 40] = 0.45  # outside the dilated square but not confident: excluded
    bg = background_mask(prob)
    assert not bool(bg[:, 8:32, 8:32].any()) and not bool(bg[0, 40, 40])
    assert bool(bg[0, 7, 7]) and bool(bg[0, 0, 0]) and int(bg.sum()) == 48 * 48 - 24 * 24 - 1


def test_points_lie_in_their_masks_with_fixed_counts_and_labels():
    prob = _square().repeat(3, 1, 1)
    config = PointPromptConfig(num_foreground=3, num_border=2, num_background=4, num_trivial_background=2)
    points, labels = generate_points(prob, 96, config, torch.Generator().manual_seed(0))
    assert points.shape == (3, 11, 2) and labels.shape == (3, 11) and points.dtype == torch.float32
    assert labels[0].tolist() == [1] * 5 + [0] * 6
    rc = to_pixels(points, 96, (48, 48))  # (row, col)
    at = [m[0][rc[..., 0], rc[..., 1]] for m in (foreground_mask(prob), border(prob > 0.5), background_mask(prob))]
    assert bool(at[0][:, :3].all()), "foreground points must lie in M_f"
    assert bool(at[1][:, 3:5].all()), "border points must lie on the border of O > 0.5"
    assert bool(at[2][:, 5:9].all()), "background points must lie in M_b"
    assert bool((prob[0][rc[:, 9:, 0], rc[:, 9:, 1]] <= 0.5).all()), "trivial points must lie outside O > 0.5"
    # pixel centres in the SAM frame: 2x scale, col c -> x = 2c + 0.5
    assert bool(((points - 0.5) % 2 == 0).all())


def test_points_are_x_then_y_as_sam_expects():
    prob = torch.zeros(1, 64, 64)
    prob[:, 2:26, 40:62] = 1.0  # rows 2..25, columns 40..61: disjoint ranges, a swap cannot pass
    config = PointPromptConfig(num_foreground=2, num_border=2, num_background=0, num_trivial_background=0)
    points, labels = generate_points(prob, 64, config)
    assert labels.tolist() == [[1, 1, 1, 1]]
    assert bool(((points[..., 0] >= 40) & (points[..., 0] <= 61)).all()), f"x must be the column: {points}"
    assert bool(((points[..., 1] >= 2) & (points[..., 1] <= 25)).all()), f"y must be the row: {points}"

    # SAM's own prompt encoder: the point's positional encoding equals its dense PE at (row, col) = (1, 6)
    net = PanSAMNetwork("tiny", 1, 2, (1, 64, 64), 64)
    grid = torch.zeros(1, 8, 8)  # the 8x8 token grid of a 64 px tiny SAM
    grid[0, 1, 6] = 1.0  # thinner than the erosion window: the fallback takes O > 0.5 itself
    config = PointPromptConfig(num_border=0, num_background=0, num_trivial_background=0, num_foreground=1)
    point, label = generate_points(grid, 64, config)
    pe = net.prompt_encoder
    sparse, _ = pe(points=(point, label), boxes=None, masks=None)
    encoded = sparse[0, 0] - pe.point_embeddings[1].weight[0]
    dense = pe.get_dense_pe()[0]
    torch.testing.assert_close(encoded, dense[:, 1, 6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encoded, dense[:, 6, 1], atol=1e-3)


def test_points_are_deterministic_given_a_seed():
    prob = torch.rand(2, 48, 48) * 0.3 + _square() * 0.7
    a = generate_points(prob, 48, generator=torch.Generator().manual_seed(3))
    b = generate_points(prob, 48, generator=torch.Generator().manual_seed(3))
    c = generate_points(prob, 48, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_background_points_follow_the_probability():
    prob = _square()
    prob[prob < 0.5] = 0.0
    prob[:, 44, 3] = 0.3  # the only background pixel with probability > 0: every weighted point lands there
    config = PointPromptConfig(num_foreground=2, num_border=2, num_background=6)
    points, labels = generate_points(prob, 48, config, torch.Generator().manual_seed(0))
    rc = to_pixels(points[0, 4:10], 48, (48, 48))
    assert rc.tolist() == [[44, 3]] * 6 and labels[0, 4:10].tolist() == [0] * 6
    # a binary (reference) map has O = 0 in M_b: uniform in M_b instead
    ref = (_square() > 0.5).float()
    points, labels = generate_points(ref, 48, config, torch.Generator().manual_seed(0))
    rc = to_pixels(points[0, 4:10], 48, (48, 48))
    assert bool(background_mask(ref)[0][rc[:, 0], rc[:, 1]].all()) and len({tuple(r) for r in rc.tolist()}) > 1


def test_empty_and_full_maps_fall_back_to_padding_points():
    maps = torch.stack([torch.zeros(32, 32), torch.ones(32, 32)])
    points, labels = generate_points(maps, 64, LEGACY_POINTS)
    assert labels.tolist() == [[-1, -1, -1, -1, 0, 0, 0, 0], [1, 1, -1, -1, -1, -1, -1, -1]]  # a full map has no border
    assert bool(torch.isfinite(points).all())
    assert bool((points[labels == -1] == 31.5).all()), "padding points sit at the image centre"


# ---- 3D aggregator ----------------------------------------------------------------------------------------------
def test_aggregator_starts_as_identity_and_mixes_neighbouring_slices():
    torch.manual_seed(0)
    agg = SliceAggregator3D(hidden=4, layers=2)
    x = torch.randn(2, 1, 8, 6, 6)
    torch.testing.assert_close(agg(x), x)
    torch.nn.init.normal_(agg.out.weight)
    y = x.clone()
    y[:, :, 3] += 5.0
    changed = (agg(y) - agg(x)).abs().amax(dim=(0, 1, 3, 4)) > 1e-6
    assert changed.tolist() == [False, True, True, True, True, True, False, False]  # slice 3 +- 2 layers
    assert sum(p.numel() for p in agg.parameters()) < 20_000


# ---- network: stages, freezing, batch, loss ---------------------------------------------------------------------
def _net(**options) -> PanSAMNetwork:
    torch.manual_seed(0)
    return PanSAMNetwork("tiny", 1, 2, PATCH, 32, options=PanSAMOptions(**options))


def _target() -> torch.Tensor:
    t = torch.zeros(2, 1, *PATCH)
    t[0, :, :, 4:20, 6:24] = 1
    t[1, :, 1:, 12:30, 2:16] = 1
    return t


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_its_own_parameters(stage):
    net = _net()
    net.set_stage(stage)
    with torch.no_grad():
        torch.nn.init.normal_(net.aggregator.out.weight, std=0.1)  # open the zero-initialised output
    output = net(torch.randn(2, 1, *PATCH), return_all=True, output=STAGE_OUTPUT[stage])
    FocalDiceLoss()(output, _target()).backward()
    own = {id(p) for m in net.stage_modules(stage) for p in m.parameters()}
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad, "no parameter received a gradient"
    wrong = [n for n, p in net.named_parameters() if p.grad is not None and id(p) not in own]
    assert not wrong, f"stage {stage}: frozen parameters got gradients: {wrong}"
    expected = {
        1: ["sam.mask_decoder.transformer.layers.0.self_attn.q_proj.weight", "sam.mask_decoder.mask_tokens.weight"],
        2: [
            "refine_decoder.transformer.layers.0.self_attn.q_proj.weight",
            "prompt_encoder.point_embeddings.0.weight",  # background points
            "prompt_encoder.point_embeddings.1.weight",  # foreground points
        ],
        3: ["aggregator.body.0.weight", "aggregator.out.weight"],
    }[stage]
    assert set(expected) <= with_grad, f"stage {stage}: missing gradients for {set(expected) - with_grad}"
    assert not any(n.startswith("sam.image_encoder") for n in with_grad)


def test_stage_one_train_encoder_option_and_frozen_upstream_outputs():
    net = _net()
    net.set_stage(1, train_encoder=True)
    assert all(p.requires_grad for p in net.sam.image_encoder.parameters())
    net.set_stage(2)
    x = torch.randn(2, 1, *PATCH)
    net.eval()
    with torch.no_grad():
        coarse = net(x, output="coarse")
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    FocalDiceLoss()(net(x, output="refined"), _target()).backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, output="coarse"), coarse)  # stage 2 training left stage 1 untouched


def test_batch_items_are_independent_and_points_follow_each_reference():
    net = _net().eval()
    x = torch.randn(2, 1, *PATCH)
    with torch.no_grad():
        both = net(x, output="coarse")
        torch.testing.assert_close(net(x[1:], output="coarse"), both[1:], atol=1e-5, rtol=1e-5)
        out = net(torch.cat([x, _target()], 1), return_all=True, output="final", reference_prompts=True)
    labels, rc = out["labels"], to_pixels(out["points"], 32, (32, 32))
    ref = _target()[:, 0].reshape(8, 32, 32)
    for row in range(8):  # (item, slice) rows: foreground points inside that item's own reference
        fg = labels[row] == 1
        if not bool(ref[row].any()):  # item 1 has no structure in slice 0: no foreground point there
            fg_rows = net.options.points.num_foreground + net.options.points.num_border
            assert not bool(fg.any()) and labels[row, :fg_rows].tolist() == [-1] * fg_rows
            continue
        assert bool(fg.any()) and bool(ref[row][rc[row, fg, 0], rc[row, fg, 1]].all()), f"row {row}"
    assert out["semantic"].shape == (2, 2, *PATCH)


def test_loss_compares_with_the_reference():
    net = _net()
    net.set_stage(3)
    out = net(torch.randn(2, 1, *PATCH), return_all=True)
    own = (out["logits"] > 0).float().detach()
    loss = FocalDiceLoss()
    assert loss(out, _target()).item() > loss(out, own).item() + 1e-3, "the loss must depend on the reference"
    assert loss(out, _target() * 2).item() != loss(out, _target()).item()  # target_label 1 only
    assert FocalDiceLoss(target_label=2)(out, _target() * 2).item() == pytest.approx(loss(out, _target()).item())


def test_clahe_slices():
    x = torch.linspace(0, 1, 32 * 32).reshape(1, 32, 32) ** 4 * 0.01 + 3.0  # dark, low-contrast ramp
    eq = clahe_slices(torch.cat([x, torch.full_like(x, 7.0)]))
    assert eq.shape == (2, 32, 32) and float(eq[0].min()) == 0.0 and float(eq[0].max()) == 1.0
    assert float(eq[0].median()) > 0.2, "CLAHE must spread the dark ramp"  # min-max alone: median ~0.06
    assert float(eq[1].abs().max()) == 0.0, "a constant slice becomes 0"
    net = _net(clahe=True)
    x5 = x.expand(4, -1, -1)[None, None]
    prepared = net._prepare(x5)
    torch.testing.assert_close(prepared, net._prepare(x5.clone()))
    mean, std = net.sam.pixel_mean.mean() / 255, net.sam.pixel_std.mean() / 255
    torch.testing.assert_close(prepared[0, 0, 0], (eq[0] - mean) / std)


def test_ct_is_windowed_in_hu_before_clahe_and_old_records_keep_min_max():
    from types import SimpleNamespace

    from nnunet_sam.model_record import options_from_json

    hu = torch.linspace(-1000, 1000, 4 * 32 * 32).reshape(1, 1, 4, 32, 32)
    expected = clahe_slices(((hu + 160) / 400).clamp(0, 1).reshape(-1, 32, 32)).reshape(hu.shape)

    def prepared(x, scheme, options=None, properties=None):
        net = PanSAMNetwork("tiny", 1, 2, PATCH, 32, options)
        plans = SimpleNamespace(plans={"foreground_intensity_properties_per_channel": {"0": properties or {}}})
        config = SimpleNamespace(configuration={"spacing": [3.0, 1.0, 1.0]}, normalization_schemes=[scheme])
        trainers.PanSAMTrainer.configure_from_plans(net, plans, config)
        mean, std = net.sam.pixel_mean.mean() / 255, net.sam.pixel_std.mean() / 255
        return net._prepare(x) * std + mean  # undo SAM's pixel normalisation

    # the HU plans (NoNormalization): the soft-tissue window of the scanner's HU, then CLAHE
    torch.testing.assert_close(prepared(hu, "NoNormalization"), expected)
    # nnU-Net's CT z-scores (clipped to [-300, 600] HU, wider than the window): HU recovered, the same image
    z = (hu.clamp(-300, 600) - 50) / 200
    torch.testing.assert_close(prepared(z, "CTNormalization", properties={"mean": 50, "std": 200}), expected)
    # a model saved before the window (its record lacks the field): CLAHE's min-max of nnU-Net's values, as before
    legacy = options_from_json({"target_label": 1}, PanSAMOptions())
    assert legacy.ct_window_hu is None
    old = clahe_slices(z.reshape(-1, 32, 32)).reshape(z.shape)
    torch.testing.assert_close(prepared(z, "CTNormalization", legacy, {"mean": 50, "std": 200}), old)
    assert (old - expected).abs().max() > 0.1


# ---- trainer --------------------------------------------------------------------------------------------------
@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    # initialize() looks for the preprocessed data only to pick its dataset class; these tests load no data
    monkeypatch.setattr(nnunet_trainer_module, "infer_dataset_class", lambda folder: None)
    return tmp_path


class _Short(trainers.PanSAMTrainer_tiny):
    epochs = 10


def test_trainer_refuses_2d_and_ambiguous_targets(nnunet_folders):
    cpu = torch.device("cpu")
    with pytest.raises(UnsupportedDatasetError, match="3d_fullres"):
        trainers.PanSAMTrainer_tiny(minimal_plans([96, 96], "2d"), "2d", 0, dataset_json(1), cpu)
    with pytest.raises(UnsupportedDatasetError, match="target_label"):
        trainers.PanSAMTrainer_tiny(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(3), cpu)

    class Kidney(trainers.PanSAMTrainer_tiny):
        target_label = 2

    trainer = Kidney(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(3), cpu)
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 4)
    assert net.target_label == 2 and trainer._build_loss().target_label == 2


def test_stages_follow_the_epoch_and_resume_from_a_checkpoint(nnunet_folders):
    cpu = torch.device("cpu")
    trainer = _Short(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(1), cpu)
    assert [trainer.stage(e) for e in range(10)] == [1] * 4 + [2] * 4 + [3] * 2
    trainer.initialize()
    net = trainer.network

    def check(t, epoch: int) -> float:
        t.current_epoch = epoch
        t.on_train_epoch_start()
        stage = t.stage(epoch)
        network, passed = t.network, []
        t.network = lambda x, **arguments: passed.append(arguments)  # what forward_batch asks the network for
        t.forward_batch(torch.zeros(1), None)
        t.network = network
        assert passed[-1]["output"] == {1: "coarse", 2: "refined", 3: "final"}[stage]
        own = {id(p) for m in t.network.stage_modules(stage, train_encoder=stage == 1) for p in m.parameters()}
        assert {id(p) for p in t.network.parameters() if p.requires_grad} == own, f"epoch {epoch}"
        return t.optimizer.param_groups[0]["lr"]

    lrs = [check(trainer, e) for e in range(6)]
    # a checkpoint written during epoch 5 (stage 2) resumes in stage 2 with its weights and optimiser state
    path = str(nnunet_folders / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    resumed = _Short(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(1), cpu)
    resumed.load_checkpoint(path)
    assert resumed.current_epoch == 6  # nnU-Net stores the next epoch
    check(resumed, 6)
    assert resumed._stage == 2  # logged as "PanSAM stage 2 from epoch 6"
    trainable = {n for n, p in resumed.network.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("prompt_encoder.", "refine_decoder.")) for n in trainable)
    for (name, a), b in zip(net.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(a, b), name
    groups = [[g["params"] for g in t.optimizer.state_dict()["param_groups"]] for t in (trainer, resumed)]
    assert groups[0] == groups[1], "the optimiser covers the same parameters in every stage"

    lrs += [check(trainer, e) for e in range(6, 10)]
    assert lrs[0] == lrs[4] == lrs[8] == pytest.approx(1e-3), "the poly schedule restarts at every stage"
    assert lrs[3] < lrs[2] < lrs[1] < lrs[0] and lrs[9] < lrs[8]


def test_stage_two_starts_from_sam_weights(nnunet_folders):
    trainer = _Short(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(1), torch.device("cpu"))
    trainer.initialize()
    net = trainer.network
    for a, b in zip(net.refine_decoder.state_dict().values(), net.sam.mask_decoder.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(net.prompt_encoder.state_dict().values(), net.sam.prompt_encoder.state_dict().values()):
        assert torch.equal(a, b)


# ---- end to end through nnU-Net's tools (slow) ------------------------------------------------------------------
E2E_TRAINER = """
from nnunet_sam.trainers.pansam import PanSAMTrainer_tiny


class PanSAMTrainer_tiny_e2e(PanSAMTrainer_tiny):
    epochs = 6
    stage_fractions = (0.5, 0.3, 0.2)  # stage 1: epochs 0-2 (its encoder learns from scratch), 2: 3-4, 3: 5
    iterations_per_epoch = 25
    val_iterations_per_epoch = 2

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # no test-time mirroring in the final validation either
        return rotation, dummy_2d, patch, None
"""


def _shift_intensities(src: Path, dst: Path, seed: int = 0) -> None:
    """Copy CT images with a different intensity profile: contrast x1.3 around soft tissue, +60 HU, extra noise."""
    dst.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for path in sorted(src.glob("*.nii.gz")):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        arr = 40 + 1.3 * (arr - 40) + 60 + rng.normal(0, 15, arr.shape)
        out = sitk.GetImageFromArray(np.clip(np.rint(arr), -1024, 3071).astype(np.int16))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(dst / path.name))


@pytest.mark.slow
def test_pansam_train_predict_ablation_and_zero_shot_cli(tmp_path):
    bin_dir = Path(sys.executable).parent
    (tmp_path / "user_trainers").mkdir()
    (tmp_path / "user_trainers" / "pansam_e2e.py").write_text(E2E_TRAINER)
    env = nnunet_env(tmp_path, OMP_NUM_THREADS="1")

    def run(cmd: list[str]) -> str:
        start = time.time()
        stdout = run_tool(cmd, env, timeout=900)
        print(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}: {time.time() - start:.0f} s")
        return stdout

    # one-class phantom (liver only) for training; a second phantom (other seed) with another intensity profile
    shape = (16, 64, 64)
    source = make_phantom_dataset(tmp_path / "raw", 991, "PanSAMPhantom", 6, 2, shape=shape, num_organs=1, seed=0)
    other = make_phantom_dataset(tmp_path / "other", 992, "Shifted", 1, 2, shape=shape, num_organs=1, seed=7)
    _shift_intensities(other / "imagesTs", tmp_path / "shifted_images")
    run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "991", "-c", "3d_fullres", "-np", "1"])
    trainer = "PanSAMTrainer_tiny_e2e"
    train_log = run([str(bin_dir / "nnUNetv2_train"), "991", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"])
    for stage, epoch in ((1, 0), (2, 3), (3, 5)):
        assert f"PanSAM stage {stage} from epoch {epoch}" in train_log

    model = tmp_path / "results" / "Dataset991_PanSAMPhantom" / f"{trainer}__nnUNetPlans__3d_fullres"
    pred = tmp_path / "pred"
    predict = [str(bin_dir / "nnUNetv2_predict"), "-i", str(source / "imagesTs"), "-o", str(pred), "-d", "991"]
    run(
        predict
        + ["-c", "3d_fullres", "-f", "0", "-tr", trainer, "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"]
    )

    report_dir = tmp_path / "eval"
    evaluate = [sys.executable, "-m", "nnunet_sam.cli.evaluate_pansam", "-m", str(model), "-f", "0", "--disable_tta"]
    table = run(
        evaluate
        + ["--data", "phantom", str(source / "imagesTs"), str(source / "labelsTs")]
        + ["--data", "zero-shot", str(tmp_path / "shifted_images"), str(other / "labelsTs")]
        + ["-o", str(report_dir)]
    )
    print(table)
    report = json.loads((report_dir / "pansam_eval.json").read_text())
    assert set(report["datasets"]) == {"phantom", "zero-shot"}
    for rows in report["datasets"].values():
        assert list(rows) == ["stage1", "stage1+aggregator", "stage1+prompts", "full", "reference-2d", "reference-3d"]
        for result in rows.values():
            assert len(result["cases"]) == 2 and all(0 <= v <= 1 for v in result["mean"].values())
    # the "full" row is exactly what nnUNetv2_predict writes
    for case in ("case_006", "case_007"):
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(report_dir / "phantom" / "full" / f"{case}.nii.gz")))
        stock = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        assert np.array_equal(ours, stock), case
    means = {row: r["mean"]["Dice"] for row, r in report["datasets"]["phantom"].items()}
    assert means["full"] > 0.5, f"PanSAM learned nothing on the phantom: {means}"

    # one row = one command
    single = run(
        evaluate
        + ["--data", "phantom", str(source / "imagesTs"), str(source / "labelsTs")]
        + ["--rows", "stage1", "-o", str(tmp_path / "eval_stage1")]
    )
    assert "stage1 (fine-tuned SAM)" in single
    row = json.loads((tmp_path / "eval_stage1" / "pansam_eval.json").read_text())["datasets"]["phantom"]
    assert row["stage1"]["mean"] == report["datasets"]["phantom"]["stage1"]["mean"]


def test_jaccard_precision_recall_by_hand():
    from nnunet_sam.evaluation.metrics import jaccard, precision, recall

    pred = np.zeros((4, 4), bool)
    ref = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 voxels, 2 of them in the reference
    ref[0, 1:] = True  # 3 voxels
    ref[1, 0] = True  # 4 voxels
    assert jaccard(pred, ref) == pytest.approx(2 / 5)
    assert precision(pred, ref) == pytest.approx(2 / 3)
    assert recall(pred, ref) == pytest.approx(2 / 4)
    empty = np.zeros_like(pred)
    assert np.isnan(jaccard(empty, empty)) and np.isnan(precision(empty, empty)) and np.isnan(recall(empty, empty))
    assert precision(empty, ref) == 0.0 and recall(pred, empty) == 0.0 and jaccard(empty, ref) == 0.0


def test_vit_b_stage_sizes_on_meta():
    with torch.device("meta"):
        net = PanSAMNetwork("vit_b", 1, 2, (8, 224, 224), 224)
    sizes = [sum(p.numel() for m in net.stage_modules(s) for p in m.parameters()) for s in (1, 2, 3)]
    assert 4.0e6 < sizes[0] < 4.1e6 and 4.0e6 < sizes[1] < 4.1e6 and sizes[2] < 20_000  # decoders ~4 M each
    assert sum(p.numel() for p in net.sam.image_encoder.parameters()) > 85e6


def test_eval_refuses_unknown_rows(tmp_path):
    from nnunet_sam.evaluation.pansam import evaluate

    with pytest.raises(ValueError, match="unknown rows"):
        evaluate(tmp_path, [("x", tmp_path, tmp_path)], rows=["stage4"])


# ---- zero-shot datasets: the target is found by name ------------------------------------------------------------
def _raw_dataset(root: Path, labels: dict | None) -> tuple[Path, Path]:
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root / "imagesTs", root / "labelsTs"


def test_zero_shot_target_is_looked_up_by_name_or_refused(tmp_path):
    from nnunet_sam.evaluation.pansam import DatasetLabelError, dataset_target

    a1k = _raw_dataset(tmp_path / "a1k", {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4})
    # the pancreas of a model whose dataset.json says pancreas = 1 is label 4 there, not the liver (1)
    assert dataset_target("a1k", *a1k, "pancreas") == 4
    assert dataset_target("a1k", *a1k, "Pancreas") == 4
    assert dataset_target("a1k", *a1k, "pancreas", given="spleen") == 3  # by hand: a name of that dataset
    assert dataset_target("a1k", *a1k, "pancreas", given="2") == 2  # or a value
    with pytest.raises(DatasetLabelError, match="no label named 'tumour'.*--target-label a1k"):
        dataset_target("a1k", *a1k, "tumour")
    with pytest.raises(DatasetLabelError, match="no such label name"):
        dataset_target("a1k", *a1k, "pancreas", given="stomach")
    unnamed = _raw_dataset(tmp_path / "unnamed", None)
    with pytest.raises(DatasetLabelError, match="not named.*--target-label other VALUE"):
        dataset_target("other", *unnamed, "pancreas")
    assert dataset_target("other", *unnamed, "pancreas", given=7) == 7
    # images elsewhere (e.g. intensity-shifted copies): the labels' dataset folder names them
    assert dataset_target("a1k", tmp_path / "elsewhere", a1k[1], "pancreas") == 4


# ---- the paper's point count; windows of a physical size --------------------------------------------------------
def test_default_is_four_points_one_per_source_and_old_models_keep_eight():
    import dataclasses

    config = PointPromptConfig()
    assert config.num_points == 4  # the paper's Table 3
    points, labels = generate_points(_square(), 48, config, torch.Generator().manual_seed(0))
    assert labels.tolist() == [[1, 1, 0, 0]]  # core, border, hard background, trivial background
    legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(PointPromptConfig) if "legacy" in f.metadata}
    assert PointPromptConfig(**legacy) == LEGACY_POINTS and LEGACY_POINTS.num_points == 8
    points_field = next(f for f in dataclasses.fields(PanSAMOptions) if f.name == "points")
    assert points_field.metadata["legacy"] == LEGACY_POINTS


def test_windows_keep_their_physical_size_at_any_spacing():
    config = PointPromptConfig(window_unit_mm=1.6)
    assert config.in_pixels(None) == config  # no spacing known: map pixels
    fine = config.in_pixels((0.8, 0.8))  # 0.8 mm pixels: 10 and 5 windows of 1.6 mm = 20 and 10 px
    assert (fine.erosion, fine.dilation, fine.window_unit_mm) == ((20, 20), (10, 10), None)
    coarse = config.in_pixels((1.6, 3.2))  # anisotropic rows / columns: a rectangle of the same millimetres
    assert (coarse.erosion, coarse.dilation) == ((10, 5), (5, 2))
    assert LEGACY_POINTS.in_pixels((0.8, 0.8)) == LEGACY_POINTS  # old models: pixels of the map, as before
    # the same physical square (25.6 mm) eroded at two spacings leaves the same physical core
    extent = {}
    for spacing, size in ((0.8, 64), (1.6, 32)):
        prob = torch.zeros(1, size, size)
        side = round(25.6 / spacing)
        prob[:, 4 : 4 + side, 4 : 4 + side] = 0.9
        core = foreground_mask(prob, config.in_pixels((spacing, spacing)))
        extent[spacing] = len(_rows_cols(core)[0]) * spacing
    assert extent == {0.8: pytest.approx(17.6), 1.6: pytest.approx(17.6)}  # (32 - 19 + 9) px x 0.8 mm


def test_network_converts_windows_with_the_plans_spacing():
    net = PanSAMNetwork("tiny", 1, 2, PATCH, 32)
    assert net.pixel_spacing is None
    net.set_pixel_spacing([3.0, 0.8, 0.8])
    assert net.pixel_spacing == (0.8, 0.8)
    assert net.options.points.in_pixels(net.pixel_spacing).erosion == (20, 20)
