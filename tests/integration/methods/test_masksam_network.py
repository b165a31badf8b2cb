"""MaskSAM network: shapes, semantic output, batched decoding and learning on a fixed batch."""

from __future__ import annotations

import pytest
import torch
from sam_testing import dataset_json, minimal_plans

from nnunet_sam.losses.set_criterion import MaskSetCriterion
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(patch=(4, 32, 32), classes=3, queries=6, **options) -> MaskSAMNetwork:
    torch.manual_seed(0)
    return MaskSAMNetwork("tiny", 2, classes, queries, patch, patch[-1], MaskSAMOptions(**options))


def test_output_shapes_and_semantic_probabilities():
    net = _net()
    x = torch.randn(2, 2, 4, 32, 32)
    out = net(x, return_all=True)
    assert out["pred_logits"].shape == (2, 4, 6, 4)
    assert out["pred_masks"].shape == out["aux_masks"].shape == (2, 4, 6, 32, 32)
    assert out["pred_boxes"].shape == (2, 4, 6, 4)
    net.eval()
    with torch.no_grad():
        semantic = net(x)
    assert semantic.shape == (2, 3, 4, 32, 32)
    torch.testing.assert_close(semantic.exp().sum(1), torch.ones(2, 4, 32, 32))
    torch.testing.assert_close(semantic, out["semantic"].detach())


def test_2d_network():
    net = _net(patch=(32, 32)).eval()
    with torch.no_grad():
        assert net(torch.randn(3, 2, 32, 32)).shape == (3, 3, 32, 32)
    with pytest.raises(AssertionError, match="input patch"):
        _net()(torch.randn(1, 2, 4, 64, 64))


def test_volumes_of_a_batch_do_not_interact():
    net = _net().eval()
    x = torch.randn(2, 2, 4, 32, 32)
    y = x.clone()
    y[1] = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], net(y)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("queries,depth", [(4, 2), (9, 3)])
def test_decoder_runs_once_per_forward_for_all_queries_and_slices(queries, depth):
    net = _net(patch=(depth, 32, 32), queries=queries)
    calls = []
    decoder = net.sam.mask_decoder
    for module in (
        decoder.transformer.layers[0].self_attn,
        decoder.output_upscaling,
        net.sam.prompt_encoder.mask_downscaling,
    ):
        module.register_forward_hook(lambda m, args, kwargs, out: calls.append(out.shape[0]), with_kwargs=True)
    net(torch.randn(2, 2, depth, 32, 32))
    assert calls == [2 * queries * depth] * 3, "decoder and prompt encoder must run once, on every query and slice"


@pytest.mark.parametrize(
    "options",
    [
        {},  # B9, the full model
        {"box_source": "mask"},  # B1's prompt generator (MaskPG) on the full model
        {"box_source": "learned", "mask_prompt": False, "encoder_adapter": "vanilla", "depth_embedding": False},
    ],
)
def test_loss_decreases_on_one_fixed_batch(options):
    net = _net(patch=(2, 32, 32), **options)
    net.sam.requires_grad_(True)
    x = torch.randn(2, 2, 2, 32, 32)
    target = torch.zeros(2, 1, 2, 32, 32)
    target[:, :, :, 4:14, 6:20] = 1
    target[:, :, 1:, 18:28, 10:30] = 2
    criterion = MaskSetCriterion(3)  # importance-sampled mask points: the hard ones, whose loss falls slowest
    every_pixel = MaskSetCriterion(3, num_points=32 * 32, point_sampling="pixels")  # the measure of progress
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(40):
        outputs = net(x)
        loss = criterion(outputs, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            losses.append(every_pixel({k: v.detach() for k, v in outputs.items()}, target).item())
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_only_trainable_parameters_reach_the_optimizer(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    from sam_testing import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path)
    trainer = MaskSAMTrainer_tiny(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(3), torch.device("cpu"))
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 4, False
    )
    optimizer, _ = trainer.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.network.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert not any(p.requires_grad for p in trainer.network.sam.parameters()), "SAM weights must stay frozen"


def _adapter_kind(module: torch.nn.Module) -> str | None:
    return getattr(module, "kind", None)


@pytest.mark.parametrize("row", [f"B{i}" for i in range(1, 10)])
def test_ablation_rows_build_their_modules_and_train_one_step(row):
    """Every row of the paper's Table 4 is a trainer whose network has that row's modules and trains."""
    from nnunet_sam.network_architectures.masksam import ABLATION_ROWS
    from nnunet_sam.prompting.from_masks import box_prompts
    from nnunet_sam.trainers import masksam as trainers

    options = getattr(trainers, f"MaskSAMTrainer_{row}").options
    assert options == ABLATION_ROWS[row]
    vanilla = row in ("B1", "B2", "B3", "B4", "B5")
    expected_kinds = {
        "B6": ("dmlp_after",) * 3,
        "B7": ("dmlp_before",) * 3,
        "B8": ("dmlp",) * 3,
        "B9": ("dconv", "dmlp", "dconv"),
    }.get(row, ("vanilla",) * 3)
    torch.manual_seed(0)
    net = MaskSAMNetwork("tiny", 2, 3, 6, (2, 32, 32), 32, options)
    enc, dec = net.encoder_additions, net.decoder_additions
    kinds = (_adapter_kind(enc.attn_adapters[0]), _adapter_kind(dec.self_attn[0]), _adapter_kind(dec.image_to_token[0]))
    assert kinds == expected_kinds
    assert all(_adapter_kind(a) == expected_kinds[0] for a in [*enc.attn_adapters, *enc.mlp_adapters])
    assert all(_adapter_kind(a) == expected_kinds[1] for a in [*dec.token_to_image, *dec.mlp])
    depth_embedding = row not in ("B1", "B2", "B3", "B4")
    assert (enc.depth_embedding is not None) == (dec.depth_embedding is not None) == depth_embedding
    assert vanilla == (expected_kinds == ("vanilla",) * 3)
    assert (net.prompt_generator.box_head is None) == (row == "B1"), "MaskPG predicts no boxes"

    seen = {}
    net.prompt_generator.register_forward_hook(lambda m, a, out: seen.__setitem__("proposals", out))
    net.sam.prompt_encoder.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("prompts", kw), with_kwargs=True)
    x = torch.randn(2, 2, 2, 32, 32)
    target = torch.zeros(2, 1, 2, 32, 32)
    target[:, :, :, 4:14, 6:20] = 1
    target[:, :, 1:, 18:28, 10:30] = 2
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = MaskSetCriterion(3)(net(x), target)
    loss.backward()
    torch.optim.SGD(params, lr=0.01).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))

    proposals, prompts = seen["proposals"], seen["prompts"]
    assert (prompts["masks"] is None) == (row == "B2"), "BBoxPG gives no mask prompt"
    source = {"B1": "mask", "B2": "learned", "B3": "learned"}.get(row, "mean")
    expected_boxes = net.to_rows(box_prompts(proposals.boxes, proposals.masks, source)) * net.input_size
    torch.testing.assert_close(prompts["boxes"], expected_boxes)


def test_every_ablation_row_is_found_by_nnunets_trainer_lookup():
    """``nnUNetv2_train ... -tr MaskSAMTrainer_B6`` (and every other row of both papers) finds the trainer."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_sam.network_architectures import masksam, self_prompt_sam

    rows = [(f"MaskSAMTrainer_{r}", o) for r, o in masksam.ABLATION_ROWS.items()]
    rows += [(f"SelfPromptSAMTrainer_{r}", o) for r, o in self_prompt_sam.ABLATION_ROWS.items()]
    assert len(rows) == 18
    for name, options in rows:
        found = recursive_find_trainer_class_by_name(name)
        assert found is not None and found.__name__ == name and found.options == options, name


def test_auxiliary_masks_at_input_scale_4_average_every_logit():
    """At input scale 4 the prompt generator's auxiliary logits are 4x the patch; the auxiliary-mask loss sees their
    area mean, so every logit (all of which feed the box and mask prompts) gets a gradient, not 1 in 16 (issue 25,
    item 5; a bilinear x4 subsample reads only the centre 2x2 of each 4x4 cell)."""
    torch.manual_seed(0)
    net = MaskSAMNetwork("tiny", 1, 3, 4, (2, 16, 16), 64, MaskSAMOptions())
    captured = {}
    net.prompt_generator.register_forward_hook(lambda module, args, out: captured.update(masks=out.masks))
    out = net(torch.randn(1, 1, 2, 16, 16), return_all=True)
    masks = captured["masks"]  # (B * D, N, 64, 64)
    assert masks.shape[-1] == 64 and out["aux_masks"].shape[-1] == 16
    expected = torch.nn.functional.avg_pool2d(masks, 4).reshape(out["aux_masks"].shape)
    torch.testing.assert_close(out["aux_masks"], expected)
    (grad,) = torch.autograd.grad(out["aux_masks"].sum(), masks)
    assert bool((grad != 0).all())
