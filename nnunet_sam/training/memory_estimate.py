"""Estimated peak training memory, from the tensors a forward pass saves for backward (no GPU needed).

Peak = fp32 parameters + fp32 gradients and optimiser state of the trainable parameters + activations.
Activations = bytes of the tensors saved for backward at the end of the forward pass, summed through
``torch.autograd.graph.saved_tensors_hooks`` on fake CPU tensors and deduplicated by storage (parameters
excluded); "autocast" = 16-bit autocast (nnU-Net's fp16 on CUDA, or bf16: same bytes), traced as bf16 autocast
with the CPU's autocast rules standing in for CUDA's. Block checkpointing is estimated from the same trace:
tensors saved outside the encoder blocks + the input of every block (kept for the recomputation) + the largest
single block (recomputed in backward). Not included: the CUDA context and allocator fragmentation (about
0.5-1 GiB) and transient backward buffers.

:func:`choose_memory_options` is how a trainer turns these estimates into its checkpointing / autocast setting
(``nnunet_sam.trainers.memory_controls``); :func:`training_forwards` runs the trainer's own training forward on the
fake tensors. The benchmark (``nnunet_sam.benchmarking``) reports the same estimates for every preset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from nnunet_sam.blocks.injection import EncoderAdditions
from nnunet_sam.blocks.volumetric_encoder import VolumetricEncoder

GIB = 2**30


MEMORY_OPTIONS = ("none", "checkpointing", "autocast", "checkpointing+autocast")


OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}  # fp32 buffers per trainable parameter (momentum; Adam's two moments)


Forward = Callable[[nn.Module, torch.Tensor], object]


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device (no memory, no init cost); tensors a builder pins to the CPU move too."""
    with torch.device("meta"):
        return build().to("meta")


def stand_in_trainer(trainer: type, net: nn.Module, num_classes: int, epoch: int = 0) -> nnUNetTrainer:
    """An instance of ``trainer`` without nnU-Net's initialisation (no plans, data or output folder) that holds what
    its training hooks (``forward_batch``, ``configure_optimizers``, ``stage``) read: ``net``, the epoch, the
    schedule and a pretrained SAM checkpoint (the presets train from SAM's weights: SAM frozen where the method
    freezes it). The memory estimate and the benchmark run the trainers' own hooks on it, not a restatement."""
    stand_in = object.__new__(trainer)
    stand_in.network = net
    stand_in.current_epoch = epoch
    stand_in.num_epochs = trainer.epochs or 1000
    stand_in.initial_lr = trainer.learning_rate or 1e-2
    stand_in.weight_decay = 3e-5 if trainer.optimizer_weight_decay is None else trainer.optimizer_weight_decay
    stand_in._sam_checkpoint_path = "pretrained"  # only whether there is one is read
    stand_in.label_manager = SimpleNamespace(num_segmentation_heads=num_classes)
    return stand_in


def training_forwards(trainer: type, num_classes: int) -> dict[str, Forward]:
    """The training forward of each phase of ``trainer`` (its stages, for trainers with a ``stage(epoch)``): what
    its ``forward_batch`` hook runs on a batch x (B, M, ...) with an all-background target (B, 1, ...).

    The hook draws its prompts (RadSAM's simulated interaction, 3DSAM-adapter's clicks) from the target itself, so
    a trace on tensors without values runs the same operations on the same shapes as a real step; where a branch
    depends on values (RadSAM decodes mask prompts only when a row has one) the network takes the costlier one.
    A trainer with stages gets its network set to each stage first (``set_stage``, as at the stage's first epoch)."""
    epochs = [0]
    if callable(getattr(trainer, "stage", None)):
        stand_in = stand_in_trainer(trainer, nn.Identity(), num_classes)
        stages = [stand_in.stage(e) for e in range(stand_in.num_epochs)]
        epochs = [e for e in range(len(stages)) if e == 0 or stages[e] != stages[e - 1]]

    def forward(epoch: int) -> Forward:
        def run(net: nn.Module, x: torch.Tensor) -> object:
            stand_in = stand_in_trainer(trainer, net, num_classes, epoch)
            if len(epochs) > 1 and callable(getattr(net, "set_stage", None)):
                net.set_stage(stand_in.stage(epoch))  # as the trainer's epoch start: only this stage trains
            target = torch.zeros(x.shape[0], 1, *x.shape[2:], device=x.device)
            return stand_in.forward_batch(x, target)

        return run

    if len(epochs) == 1:
        return {"training": forward(0)}
    stand_in = stand_in_trainer(trainer, nn.Identity(), num_classes)
    return {f"stage {stand_in.stage(e)}": forward(e) for e in epochs}


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(storage identity, storage bytes); bytes 0 where the size is symbolic (a few prompt tokens on fake tensors)."""
    try:
        storage = t.untyped_storage()
        return storage._cdata, int(storage.nbytes())
    except Exception:  # noqa: BLE001  (unbacked symbolic sizes cannot be turned into an int)
        return id(t), 0


class SavedTensorTrace:
    """Sums the tensors saved for backward during a forward pass, attributed to encoder blocks or "outside".

    Attribution wraps ``_block`` of the encoders of this (throw-away, fake) network instance
    (:class:`EncoderAdditions`, :class:`VolumetricEncoder`): the unit that activation checkpointing recomputes.
    """

    def __init__(self, net: nn.Module) -> None:
        self.params = {_storage(p)[0] for p in net.parameters()} | {_storage(b)[0] for b in net.buffers()}
        self.where: int | None = None
        self.seen: dict[int, tuple[int | None, int]] = {}  # storage -> (block or None, bytes)
        self.block_inputs: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps storages alive so that their identities stay unique
        self.units = [m for m in net.modules() if isinstance(m, (EncoderAdditions, VolumetricEncoder))]
        for unit in self.units:
            unit._block = self._traced(unit._block)  # instance attribute shadows the method

    def _traced(self, run_block: Callable) -> Callable:
        def block(i: int, module: nn.Module, x: torch.Tensor, *rest: object) -> object:
            # rest: what a unit passes on beside x (VolumetricEncoder's stage-to-stage carry of Med-Adapters)
            key, size = _storage(x)
            self.block_inputs[key] = size
            self.keep.append(x)
            self.where = i
            try:
                return run_block(i, module, x, *rest)
            finally:
                self.where = None

        return block

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, size = _storage(t)
        if key not in self.params and key not in self.seen:
            self.seen[key] = (self.where, size)
            self.keep.append(t)
        return t

    def run(self, fn: Callable[[], object]) -> dict:
        """Run ``fn`` (a forward pass) and return the byte counts."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                fn()
        finally:
            for unit in self.units:
                del unit._block
        per_block: dict[int, int] = {}
        outside = 0
        for where, size in self.seen.values():
            if where is None:
                outside += size
            else:
                per_block[where] = per_block.get(where, 0) + size
        total = outside + sum(per_block.values())
        inputs_not_outside = sum(s for k, s in self.block_inputs.items() if self.seen.get(k, (0,))[0] is not None)
        checkpointed = outside + inputs_not_outside + max(per_block.values()) if per_block else None
        return {"total": total, "checkpointed": checkpointed}


def activation_bytes(
    build: Callable[[], nn.Module], batch: int, bf16: bool, in_channels: int, patch, forward: Forward | None = None
) -> dict:
    """Saved-for-backward bytes of one training forward on fake CPU tensors, float32 or under bf16 autocast.

    ``forward(net, x)`` is the training forward (e.g. a trainer's ``forward_batch``,
    :func:`training_forwards`); default ``net(x)``. Fake CPU tensors, not the meta
    device: on meta, ``scaled_dot_product_attention`` runs its math path, which keeps the full attention matrix for
    backward, while fake CPU tensors dispatch to the fused kernel that the real run uses (and that stores no
    (N, N) tensor).
    """
    net = on_meta(build)  # built on meta, then given fake CPU storage: builders may call .item() at init
    forward = forward or (lambda n, inputs: n(inputs))
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with mode:
        net.to_empty(device="cpu")
        x = torch.zeros(batch, in_channels, *patch)
    net.train()
    trace = SavedTensorTrace(net)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return trace.run(lambda: forward(CallInMode(net, mode), x))


class CallInMode:
    """``net`` as a training hook sees it, every call of it run inside ``mode`` (a fake-tensor mode): what the hook
    prepares around the call (clicks drawn from the target) runs on real tensors, the network on fake ones."""

    def __init__(self, net: nn.Module, mode: FakeTensorMode) -> None:
        self._net, self._mode = net, mode

    def __getattr__(self, name: str):
        return getattr(self._net, name)

    def __call__(self, *args, **kwargs):
        with self._mode:
            return self._net(*args, **kwargs)


def peak_activation_bytes(
    build: Callable[[], nn.Module], batch: int, bf16: bool, in_channels: int, patch, forwards: Sequence[Forward] = ()
) -> dict:
    """:func:`activation_bytes` of the largest of several training forwards (a trainer's phases), per figure."""
    traces = [activation_bytes(build, batch, bf16, in_channels, patch, f) for f in forwards or [None]]
    checkpointed = [t["checkpointed"] for t in traces if t["checkpointed"] is not None]
    return {"total": max(t["total"] for t in traces), "checkpointed": max(checkpointed) if checkpointed else None}


def memory_estimate(params: dict, optimizer_buffers: int, activations: int) -> int:
    """fp32 weights + fp32 gradients and optimiser buffers of the trainable weights + activations (bytes)."""
    return 4 * params["total"] + 4 * (1 + optimizer_buffers) * params["trainable"] + activations


def memory_row(
    build,
    params: dict,
    buffers: int,
    in_channels: int,
    patch,
    batch: int,
    bf16: bool = True,
    forwards: Sequence[Forward] = (),
) -> dict:
    """Estimated peak training bytes at ``batch``: none / checkpointing / 16-bit autocast / both (bytes); the
    largest over ``forwards`` (training forwards ``forward(net, x)``; default ``net(x)``)."""
    return memory_table(build, params, buffers, in_channels, patch, bf16, (batch,), forwards)[f"batch{batch}"]


def memory_table(
    build,
    params: dict,
    buffers: int,
    in_channels: int,
    patch,
    bf16: bool,
    batches: tuple[int, ...] = (1, 2),
    forwards: Sequence[Forward] = (),
) -> dict:
    """Estimated peak training bytes for batch 1 and 2: none / checkpointing / 16-bit autocast / both."""
    table = {}
    for batch in batches:
        fp32 = peak_activation_bytes(build, batch, False, in_channels, patch, forwards)
        row = {"activations_fp32": fp32["total"]}
        row["none"] = memory_estimate(params, buffers, fp32["total"])
        if fp32["checkpointed"] is not None:
            row["checkpointing"] = memory_estimate(params, buffers, fp32["checkpointed"])
        if bf16:
            half = peak_activation_bytes(build, batch, True, in_channels, patch, forwards)
            row["activations_autocast"] = half["total"]
            row["autocast"] = memory_estimate(params, buffers, half["total"])
            if half["checkpointed"] is not None:
                row["checkpointing+autocast"] = memory_estimate(params, buffers, half["checkpointed"])
        table[f"batch{batch}"] = row
    return table


def choose_memory_options(
    row: dict, budget: float, checkpointing: bool | None = None, autocast: bool | None = None
) -> tuple[str, bool]:
    """The option set of a memory row (:func:`memory_row`) to train with, and whether it fits ``budget`` bytes.

    ``checkpointing`` / ``autocast`` None leave the choice to the estimate, True/False force it. Preference: 16-bit
    autocast (faster on GPUs, nnU-Net's default) without checkpointing, then with it; float32 only when autocast is
    forced off. When nothing allowed fits, the smallest allowed set is returned with ``False``.
    """
    order = ["autocast", "checkpointing+autocast", "none", "checkpointing"]
    allowed = [
        o
        for o in order
        if o in row
        and (checkpointing is None or ("checkpointing" in o) == checkpointing)
        and (autocast is None or ("autocast" in o) == autocast)
    ]
    if autocast is None:  # float32 only where 16-bit cannot be estimated
        allowed = [o for o in allowed if "autocast" in o] or allowed
    assert allowed, f"no option set of {sorted(row)} is allowed (checkpointing={checkpointing}, autocast={autocast})"
    fitting = [o for o in allowed if row[o] <= budget]
    if fitting:
        return fitting[0], True
    return min(allowed, key=row.get), False
