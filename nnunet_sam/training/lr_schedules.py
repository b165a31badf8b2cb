"""Learning-rate schedules over the epochs, stepped once per epoch with nnU-Net's ``step(current_epoch)`` interface.

nnU-Net's own "poly" schedule is ``nnunetv2``'s ``PolyLRScheduler``; these add what some methods' published code
runs instead.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import _LRScheduler


class EpochLRScheduler(_LRScheduler):
    """A schedule that sets every parameter group's LR to :meth:`lr_at` of the epoch: ``step(epoch)`` as nnU-Net
    calls it, or ``step()`` counting the calls."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int):
        self.initial_lr = initial_lr
        self.num_epochs = num_epochs
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class LinearLRScheduler(EpochLRScheduler):
    """LR falling linearly from ``initial_lr`` to ``end_factor * initial_lr`` over ``num_epochs`` (torch's LinearLR
    with start factor 1, stepped once per epoch, as the 3DSAM-adapter code steps it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int, end_factor: float = 0.01):
        self.end_factor = end_factor
        super().__init__(optimizer, initial_lr, num_epochs)

    def lr_at(self, epoch: int) -> float:
        fraction = min(epoch, self.num_epochs) / max(1, self.num_epochs)
        return self.initial_lr * (1 + (self.end_factor - 1) * fraction)


class StagePolyLRScheduler(EpochLRScheduler):
    """nnU-Net's poly schedule (exponent 0.9) restarted at the first epoch of every stage (``starts``; PanSAM)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, starts: tuple[int, ...], num_epochs: int):
        self.starts = starts
        super().__init__(optimizer, initial_lr, num_epochs)

    def lr_at(self, epoch: int) -> float:
        start = max(s for s in self.starts if s <= epoch)
        end = min([s for s in self.starts if s > epoch] + [self.num_epochs])
        return self.initial_lr * (1 - (epoch - start) / max(1, end - start)) ** 0.9
