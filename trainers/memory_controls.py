"""Memory controls of the SAM trainers: block checkpointing and 16-bit autocast, decided per run.

The saved model does not depend on them (``nnunet_sam.blocks.checkpointing``). On CUDA the trainer estimates the
peak training memory of every option set on fake tensors (:mod:`nnunet_sam.training.memory_estimate`) and takes the
first that fits the GPU; ``$nnUNet_SAM_checkpointing`` / ``$nnUNet_SAM_autocast`` (0 or 1) and the class attributes
``block_checkpointing`` / ``autocast`` force a choice.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import torch
from torch import autocast, nn

from nnunet_sam.blocks.checkpointing import block_checkpointing
from nnunet_sam.training.memory_estimate import (
    GIB,
    OPTIMIZER_STATE,
    choose_memory_options,
    memory_row,
    training_forwards,
)

CHECKPOINTING_ENV = "nnUNet_SAM_checkpointing"
AUTOCAST_ENV = "nnUNet_SAM_autocast"


class MemoryControls:
    """Mixin of :class:`~nnunet_sam.trainers.base.SAMTrainer`: :meth:`memory_controls` decides, after the network is
    built, and :meth:`forward_context` applies the choice around every training and validation forward."""

    # None = decided from the estimated peak training memory against the GPU's memory; True/False forces.
    # $nnUNet_SAM_checkpointing / $nnUNet_SAM_autocast (0 or 1) force too and take precedence. Autocast is bf16 where
    # the GPU supports it, else nnU-Net's fp16 with its grad scaler.
    block_checkpointing: bool | None = None
    autocast: bool | None = None

    @classmethod
    def forced_memory_options(cls) -> tuple[bool | None, bool | None]:
        """(checkpointing, autocast) forced by ``$nnUNet_SAM_checkpointing`` / ``$nnUNet_SAM_autocast`` or the class
        attributes ``block_checkpointing`` / ``autocast``; None where the estimate decides."""
        forced = []
        for env, attribute in ((CHECKPOINTING_ENV, cls.block_checkpointing), (AUTOCAST_ENV, cls.autocast)):
            value = os.environ.get(env, "").strip().lower()
            if value in ("1", "true", "t", "0", "false", "f"):
                forced.append(value in ("1", "true", "t"))
            elif value:
                raise ValueError(f"${env}={value!r}: use 1 (on) or 0 (off), or unset it to decide from the estimate.")
            else:
                forced.append(attribute)
        return forced[0], forced[1]

    def memory_controls(self) -> None:
        """Decide block checkpointing and 16-bit autocast for this run and log the choice with its estimate.

        On CUDA: the estimated peak training memory of every option set at this batch size
        (:func:`~nnunet_sam.training.memory_estimate.memory_row`, traced on fake tensors, seconds) against 90 % of the
        GPU's memory less 1 GiB (CUDA context, fragmentation); the first that fits of: autocast, checkpointing +
        autocast (fp32 variants only when autocast is forced off). Elsewhere nothing is estimated: nnU-Net's
        behaviour (no autocast off CUDA), checkpointing only when forced.
        """
        checkpointing, use_autocast = self.forced_memory_options()
        if self.device.type != "cuda":
            self._checkpointing = bool(checkpointing)
            self.print_to_log_file(
                f"Memory controls ({self.device.type}): block checkpointing {'on' if self._checkpointing else 'off'}, "
                "no autocast (nnU-Net autocasts on CUDA only)"
            )
            return
        net = self._plain_network()
        params = {
            "total": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
        }
        record, channels, heads = self.sam_record, self.num_input_channels, self.label_manager.num_segmentation_heads

        trainable = {n for n, p in net.named_parameters() if p.requires_grad}

        def build() -> nn.Module:  # this run's network, trainable as configure_optimizers made it
            network = type(self).build_network(record, channels, heads)
            for name, p in network.named_parameters():
                p.requires_grad_(name in trainable)
            return network

        buffers, patch = OPTIMIZER_STATE.get(self.optimizer_name, 2), record["patch_size"]
        forwards = training_forwards(type(self), heads)  # this trainer's forward_batch, per training stage
        scope = f"training forward, largest of {', '.join(forwards)}"
        try:
            row = memory_row(build, params, buffers, channels, patch, self.batch_size, forwards=list(forwards.values()))
        except Exception as e:  # noqa: BLE001  (a forward that cannot run on fake tensors must not stop training)
            self._checkpointing = bool(checkpointing)
            self._autocast_dtype = None if use_autocast is False else self._autocast_dtype
            if self._autocast_dtype is None:
                self.grad_scaler = None
            self.print_to_log_file(
                f"Memory controls: no estimate ({type(e).__name__}: {e}); block checkpointing "
                f"{'on' if self._checkpointing else 'off'}, autocast {self._autocast_dtype or 'off (float32)'}"
            )
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = 0.9 * total - GIB
        choice, fits = choose_memory_options(row, budget, checkpointing, use_autocast)
        self._checkpointing = "checkpointing" in choice
        bf16 = torch.cuda.is_bf16_supported()
        self._autocast_dtype = (torch.bfloat16 if bf16 else torch.float16) if "autocast" in choice else None
        if self._autocast_dtype != torch.float16:
            self.grad_scaler = None  # bf16 and fp32 need no loss scaling
        estimates = ", ".join(f"{k} {v / GIB:.1f}" for k, v in row.items() if not k.startswith("activations"))
        self.print_to_log_file(
            f"Memory controls: block checkpointing {'on' if self._checkpointing else 'off'}, autocast "
            f"{self._autocast_dtype or 'off (float32)'}; estimated peak {row[choice] / GIB:.1f} GiB at batch "
            f"{self.batch_size} against a budget of {budget / GIB:.1f} GiB (GPU {total / GIB:.1f} GiB); estimates "
            f"(GiB, {scope}): {estimates}"
        )
        if not fits:
            self.print_to_log_file(
                "WARNING: no allowed memory setting fits this GPU by the estimate; expect out-of-memory errors. "
                "Lower the batch size or the patch in the plans, or unset a forced setting "
                f"(${CHECKPOINTING_ENV}, ${AUTOCAST_ENV}, class attributes block_checkpointing / autocast)."
            )

    def forward_context(self) -> ExitStack:
        """Autocast and block checkpointing around a training or validation forward, as memory_controls chose."""
        stack = ExitStack()
        if self.device.type == "cuda" and self._autocast_dtype is not None:
            stack.enter_context(autocast("cuda", dtype=self._autocast_dtype))
        if self._checkpointing:
            stack.enter_context(block_checkpointing())
        return stack
