"""A network with fixed forward arguments, for code that calls ``network(x)`` (nnU-Net's predictor)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class BoundForward(nn.Module):
    """``network(x, **arguments)`` as a module whose forward takes only ``x``.

    nnU-Net's predictor calls ``self.network(x)`` for every sliding-window patch and loads each fold's weights
    with ``self.network.load_state_dict``; both reach the wrapped network, whose modes are explicit forward
    arguments (e.g. PanSAM's ``output``). Its state dict is the wrapped network's, under the same names.
    """

    def __init__(self, network: nn.Module, **arguments: Any) -> None:
        super().__init__()
        self.network = network
        self.arguments = arguments

    def forward(self, x: torch.Tensor) -> Any:
        return self.network(x, **self.arguments)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.network.state_dict(*args, **kwargs)
