"""Counting without computing: parameters, FLOPs and checkpoint sizes of networks on the meta device.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on networks built on the ``meta`` device with meta
inputs: nothing is computed, full-size ViTs are counted in seconds. A training step is forward (train mode) +
surrogate loss + backward (the real set losses need values; their own FLOPs are negligible and the backward graph
through the network is the same); inference is one eval-mode forward under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """PyTorch's conv backward formula with the weight-gradient term divided by ``groups``.

    ``torch.utils.flop_counter`` (2.14) ignores ``groups`` in that term and so counts a depth-wise conv's weight
    gradient ``channels`` times over (e.g. 3.1 GFLOP instead of 0.02 for a ViT-B DConv adapter on 8 slices).
    """
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    total = conv_backward_flop(*args, output_mask, out_val=out_shape)  # shape-wrapped: takes out_val
    if groups == 1 or not output_mask[1]:
        return total
    weight = conv_backward_flop(*args, [False, True, False], out_val=out_shape)
    return total - weight + weight // groups


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn`` by ``FlopCounterMode`` (with grouped-conv backward counted correctly)."""
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def allow_meta_masks():
    # SAM's prompt encoder indexes with boolean masks; on meta tensors assume every element selected (token counts)
    return fx_config.patch(meta_nonzero_assume_all_nonzero=True)


def surrogate_loss(outputs) -> torch.Tensor:
    """Mean of every output tensor the training losses read ("semantic" is derived for nnU-Net only)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean()
    if isinstance(outputs, dict):
        outputs = [v for k, v in outputs.items() if k != "semantic"]
    return sum(surrogate_loss(o) for o in outputs)


def train_step_flops(
    net: nn.Module, x: torch.Tensor, forward: Callable[[nn.Module, torch.Tensor], object] | None = None
) -> tuple[int, int]:
    """FLOPs of forward + surrogate loss + backward, and how many frozen parameters got a ``.grad`` from it.

    ``forward(net, x)``: the training forward (a trainer's ``forward_batch``); default ``net(x)``."""
    net.zero_grad(set_to_none=True)
    forward = forward or (lambda n, inputs: n(inputs))

    def step():
        net.train()
        loss = surrogate_loss(forward(net, x))
        if loss.requires_grad:  # a frozen encoder path (PanSAM's) trains nothing: its step is the forward
            loss.backward()

    with allow_meta_masks():
        flops = count_flops(step)
    frozen_with_grad = sum(1 for p in net.parameters() if not p.requires_grad and p.grad is not None)
    net.zero_grad(set_to_none=True)
    return flops, frozen_with_grad


def inference_flops(
    net: nn.Module, x: torch.Tensor, forward: Callable[[nn.Module, torch.Tensor], object] | None = None
) -> int:
    """FLOPs of one eval-mode forward (``forward(net, x)``, default ``net(x)``) without gradients.

    Every weight is frozen meanwhile: ``FlopCounterMode``'s module tracker fails on a parameter view that a module
    passes on under ``no_grad`` (it still reports ``requires_grad``), e.g. learned query tokens."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    forward = forward or (lambda n, inputs: n(inputs))
    try:
        net.eval()
        with allow_meta_masks(), torch.no_grad():
            return count_flops(lambda: forward(net, x))
    finally:
        for p in trainable:
            p.requires_grad_(True)


def encoder_floor(net: nn.Module, x: torch.Tensor) -> float:
    """Training / forward FLOP ratio of the network's encoder path (stem, SAM encoder, adapters) with every weight
    frozen and only the input needing a gradient: the floor that no trainable addition can go below."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    x = x.detach().requires_grad_(True)

    def backward():
        embedding, features = net.encode(x)
        surrogate_loss([embedding, *features]).backward()

    try:
        net.train()
        return count_flops(backward) / count_flops(lambda: net.encode(x))
    finally:
        for p in trainable:
            p.requires_grad_(True)


def all_frozen_floor(net: nn.Module, x: torch.Tensor) -> int:
    """Training-step FLOPs of ``net`` with every weight frozen and only its input needing a gradient.

    The difference to the real training step is the weight-gradient work of the trainable parameters.
    """
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    try:
        return train_step_flops(net, x.detach().requires_grad_(True))[0]
    finally:
        for p in trainable:
            p.requires_grad_(True)


def parameter_counts(net: nn.Module) -> dict:
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def checkpoint_bytes(net: nn.Module, optimizer_buffers: int) -> dict:
    """Bytes of an nnU-Net checkpoint's weights: the full state dict, its optimiser state, and the weights of a slim
    checkpoint (nnunet_sam.training.slim_checkpoints: all but the frozen ``sam.*`` tensors, which the base file
    holds)."""
    state = net.state_dict(keep_vars=True)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    trainable_bytes = sum(
        t.numel() * t.element_size() for n, t in state.items() if n in trainable or not n.startswith("sam.")
    )
    trainable_params = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {
        "full_state_dict": sum(t.numel() * t.element_size() for t in state.values()),
        "optimizer_state": optimizer_buffers * trainable_params,
        "trainable_only": trainable_bytes,
    }
