"""Efficiency properties of the SAM networks: no wasted gradients, batched decoding, checkpointing, autocast."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sam_testing import dataset_json, minimal_plans, write_tiny_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_sam.blocks.adapters import Adapter
from nnunet_sam.losses.segmentation import DeepSupervisedSegLoss
from nnunet_sam.losses.set_criterion import MaskSetCriterion, dice_loss, elementwise_generalized_box_iou
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.network_architectures.self_prompt_sam import SelfPromptSAMNetwork, SelfPromptSAMOptions
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer_tiny

CPU = torch.device("cpu")


def _randomise_adapters(net: torch.nn.Module, seed: int = 0) -> None:
    """Adapters start as identities (zero up-projections); give them weights so that their path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, Adapter):
                module.up.weight.copy_(0.05 * torch.randn(module.up.weight.shape, generator=generator))


def _masksam(depth: int = 2, queries: int = 8, checkpointing: bool = False, size: int = 32) -> MaskSAMNetwork:
    torch.manual_seed(0)
    options = MaskSAMOptions(gradient_checkpointing=checkpointing)
    return MaskSAMNetwork("tiny", 1, 4, queries, [depth, size, size], size, options)


def _selfprompt(depth: int = 2, classes: int = 4, checkpointing: bool = False) -> SelfPromptSAMNetwork:
    torch.manual_seed(0)
    options = SelfPromptSAMOptions(gradient_checkpointing=checkpointing)
    return SelfPromptSAMNetwork("tiny", 1, classes, [depth, 32, 32], 32, options)


def _labels(depth: int, classes: int = 4, size: int = 32) -> torch.Tensor:
    target = torch.zeros(2, 1, depth, size, size)
    for c in range(1, classes):
        target[:, :, :, 4 * c : 4 * c + 6, 3 * c : 3 * c + 8] = c
    return target


# ---- no gradient for frozen weights -------------------------------------------------------------------------------
@pytest.fixture
def tiny_trainer_env(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset999_Test" / "x"  # minimal_plans' data identifier
    preprocessed.mkdir(parents=True)
    (preprocessed / "case.b2nd").touch()  # initialize() only infers the dataset class from the file ending
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    write_tiny_checkpoint(folder)  # with a pretrained checkpoint SAM stays frozen, as in the papers
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(folder))


def _assert_frozen_params_have_no_grad(trainer, stage: str) -> None:
    net = trainer._plain_network()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("sam.") for n in frozen), "SAM (and only SAM) should be frozen"
    with_grad = [n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None]
    assert with_grad == [], f"{stage}: frozen parameters got gradients: {with_grad[:5]}"
    trained = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is not None]
    assert any(n.startswith("encoder_additions.") for n in trained), f"{stage}: encoder adapters got no gradient"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in net.parameters() if p.requires_grad}, "optimiser != trainable parameters"


@pytest.mark.parametrize("trainer_class", [MaskSAMTrainer_tiny, SelfPromptSAMTrainer_tiny])
def test_training_step_leaves_frozen_parameters_without_grad(tiny_trainer_env, trainer_class):
    trainer = trainer_class(minimal_plans([8, 32, 32]), "3d_fullres", 0, dataset_json(3), CPU)
    trainer.initialize()  # the real path: build_network_architecture, SAM weights, configure_optimizers
    depth = trainer.sam_record["patch_size"][0]
    batch = {"data": torch.randn(2, 1, depth, 32, 32), "target": _labels(depth)}
    stages = [("only stage", None)]
    if trainer_class is SelfPromptSAMTrainer_tiny:
        stages = [("stage 1", 0), ("stage 2", trainer.num_epochs - 1)]
    for name, epoch in stages:
        if epoch is not None:
            trainer.current_epoch = epoch  # the stage (and so forward_batch's run_decoder) follows the epoch
        trainer.network.train()
        trainer.train_step(batch)
        _assert_frozen_params_have_no_grad(trainer, name)
        if name == "stage 2":
            grads = [n for n, p in trainer._plain_network().named_parameters() if p.grad is not None]
            assert any(n.startswith("decoder_additions.") for n in grads), "stage 2 trains the decoder adapters"


# ---- activation checkpointing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [_masksam, _selfprompt])
def test_activation_checkpointing_gives_equal_outputs_and_gradients(build):
    plain, checkpointed = build(), build(checkpointing=True)
    _randomise_adapters(plain)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.encoder_additions.gradient_checkpointing and not plain.encoder_additions.gradient_checkpointing
    x = torch.randn(2, 1, 2, 32, 32)
    results = []
    for net in (plain, checkpointed):
        net.train()
        out = net(x)
        loss = sum(v.float().square().mean() for k, v in out.items() if isinstance(v, torch.Tensor) and k != "semantic")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out["semantic"].detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("encoder_additions.") for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- no Python loops over queries or slices in forward -----------------------------------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts every ATen operator call (a Python loop over queries or slices multiplies them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _call_profile(net: torch.nn.Module, x: torch.Tensor) -> tuple[Counter, Counter]:
    """(module calls by name, ATen op calls) of one eval-mode forward."""
    calls: Counter = Counter()
    handles = [m.register_forward_hook(lambda m, a, o, n=n: calls.update([n])) for n, m in net.named_modules()]
    net.eval()
    try:
        with torch.no_grad(), _OpCounter() as counter:
            net(x)
    finally:
        for h in handles:
            h.remove()
    return calls, counter.ops


@pytest.mark.parametrize("method", ["masksam", "selfprompt"])
def test_forward_call_counts_do_not_grow_with_queries_or_slices(method):
    profiles = {}
    for depth in (2, 4):
        for n in (8, 12):  # MaskSAM: queries; Self-Prompt-SAM: classes (one decoder row per class)
            net = _masksam(depth, queries=n) if method == "masksam" else _selfprompt(depth, classes=n)
            if method == "selfprompt":  # the same prompts for every shape (no class present): SAM's prompt
                with torch.no_grad():  # encoder's op count depends on which point labels occur
                    net.generator.heads[-1].weight.zero_()
                    net.generator.heads[-1].bias.zero_()
            profiles[(depth, n)] = _call_profile(net, torch.randn(1, 1, depth, 32, 32))
    calls, ops = profiles[(2, 8)]
    decoder_calls = {k: v for k, v in calls.items() if k.startswith(("sam.mask_decoder", "sam.prompt_encoder"))}
    assert calls["sam.prompt_encoder"] == 1, "the prompt encoder runs once per forward, on all rows"
    assert decoder_calls["sam.mask_decoder.transformer.layers.0.cross_attn_token_to_image"] == 1
    for key, (other_calls, other_ops) in profiles.items():
        assert other_calls == calls, f"module calls change with (depth, {method} n) = {key}"
        assert other_ops == ops, f"ATen op calls change with (depth, n) = {key}: {other_ops - ops or ops - other_ops}"


# ---- autocast --------------------------------------------------------------------------------------------------
def test_losses_run_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    boxes1 = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8]])
    boxes2 = torch.tensor([[0.15, 0.1, 0.55, 0.7], [0.0, 0.0, 0.3, 0.3]])
    logits, targets = torch.randn(3, 50), (torch.rand(3, 50) > 0.5).float()
    exact_giou, exact_dice = elementwise_generalized_box_iou(boxes1, boxes2), dice_loss(logits, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        giou = elementwise_generalized_box_iou(boxes1.bfloat16(), boxes2.bfloat16())
        dice = dice_loss(logits.bfloat16(), targets.bfloat16())
    assert giou.dtype == torch.float32 and dice.dtype == torch.float32
    # only the bf16 rounding of the inputs differs (8 mantissa bits: ~0.4% relative)
    torch.testing.assert_close(giou, exact_giou, rtol=0, atol=2e-2)
    torch.testing.assert_close(dice, exact_dice, rtol=0, atol=2e-2)

    net = _masksam()
    _randomise_adapters(net)
    net.train()
    target = _labels(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 2, 32, 32))
        loss = MaskSetCriterion(4)(out, target)
    assert out["pred_masks"].dtype == torch.bfloat16, "autocast should be active in the network"
    assert loss.dtype == torch.float32 and torch.isfinite(loss)

    net = _selfprompt()
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DeepSupervisedSegLoss()(net(torch.randn(2, 1, 2, 32, 32)), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["vanilla", "dmlp", "dconv"])
def test_adapters_are_finite_and_close_to_float32_under_bf16_autocast(kind):
    torch.manual_seed(0)
    adapter = Adapter(64, kind, depth=4)
    torch.nn.init.normal_(adapter.up.weight, std=0.2)
    x = 30 * torch.randn(8, 6, 6, 64)  # large activations, as in deep ViT blocks
    exact = adapter(x, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = adapter(x, 4)
    assert torch.isfinite(half).all()
    assert (half.float() - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("build", [_masksam, _selfprompt])
def test_networks_are_finite_under_bf16_autocast(build):
    net = build()
    _randomise_adapters(net)
    net.eval()
    x = torch.randn(1, 1, 2, 32, 32)
    with torch.no_grad():
        exact = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net(x)
    assert torch.isfinite(half).all()
    # the semantic output's argmax (the segmentation) agrees on almost every voxel
    agree = (half.float().argmax(1) == exact.argmax(1)).float().mean()
    assert agree > 0.9, f"bf16 and fp32 segmentations agree on only {agree:.0%} of voxels"


# ---- torch.compile ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_forward_and_backward_match_eager():
    eager = _masksam()
    _randomise_adapters(eager)
    compiled_net = _masksam()
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net)
    x = torch.randn(2, 1, 2, 32, 32)
    outs = []
    for net in (eager, compiled):
        net.train()
        out = net(x)
        out["pred_masks"].float().square().mean().backward()
        outs.append(out["pred_masks"].detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled_net.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
