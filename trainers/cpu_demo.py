"""The CPU demo trainers' schedule: a few minutes of seeded CPU training (``nnunet_sam_demo``), as mixins:
``class XTrainer_tiny_demo(CPUDemo, XTrainer_tiny)``."""

from __future__ import annotations

import random

import numpy as np
import torch


class CPUDemo:
    """A few minutes of CPU training (about 600 steps), seeded.

    nnU-Net's final validation after training is skipped: with test-time mirroring it predicts every validation
    case with 8 forwards per tile (44 tiles of 4x64x64 per 24x96x96 phantom), which took longer than the whole
    training; ``nnunet_sam_demo`` evaluates the held-out test cases itself. ``nnUNetv2_train ... --val`` still runs
    nnU-Net's full validation.

    ``seed`` seeds Python's, numpy's and torch's generators before the network is built, so a fresh training
    starts from the same weights and, with nnU-Net's single-threaded augmenter (``nnUNet_n_proc_DA=0``, as
    ``nnunet_sam_demo`` runs it), draws the same batches: one CPU thread then repeats the run exactly. nnU-Net's
    augmentation workers seed themselves from the system, so with workers only the initial weights repeat.
    """

    epochs = 20
    iterations_per_epoch = 30
    val_iterations_per_epoch = 3
    # Intra-op threads of a CPU training (nnUNetv2_train -device cpu uses one per core, which on a 2-core machine
    # competes with nnU-Net's augmentation workers; under load the second thread multiplied the CPU time of a tiny
    # forward by about 10: nnunet_sam_benchmark_prediction). None keeps nnU-Net's choice.
    cpu_threads: int | None = 1
    seed: int | None = 0

    def on_train_start(self) -> None:
        if self.seed is not None and not self.was_initialized:  # not on --c: a resumed run keeps its own state
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
            self.print_to_log_file(f"{type(self).__name__}: seeded with {self.seed}")
        if self.device.type == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
            self.print_to_log_file(f"{type(self).__name__}: {self.cpu_threads} intra-op thread(s) on the CPU")
        super().on_train_start()

    def on_train_end(self) -> None:
        super().on_train_end()
        self._demo_training_just_ended = True

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if getattr(self, "_demo_training_just_ended", False):
            self.print_to_log_file(
                f"{type(self).__name__}: nnU-Net's final validation is skipped for this demo trainer (nnunet_sam_demo "
                "evaluates the held-out cases itself); run nnUNetv2_train with --val to validate the fold."
            )
            return
        super().perform_actual_validation(save_probabilities)


class LiteMedSAMCPUDemo(CPUDemo):
    """LiteMedSAM within a CPU demo: 4 slices of 64 px (about 6 GFLOPs per slice in the encoder, 75 at 256 px), 100
    steps. Fewer slices break nnU-Net's Gaussian blur augmentation (reflect padding along the depth axis).

    The additions train with AdamW (LR 1e-3; the encoder stays frozen): on the phantom, nnU-Net's SGD left
    MaskSAM's pseudo-Dice at 0 after 80 steps, while Self-Prompt-SAM with AdamW reached liver 0.83, aorta 0.67
    after 60. nnU-Net's final validation is skipped, as for :class:`CPUDemo`.
    """

    max_depth = 4
    max_tiles = 1
    epochs = 10
    iterations_per_epoch = 10
    val_iterations_per_epoch = 2
    optimizer_name = "adamw"
    learning_rate = 1e-3
