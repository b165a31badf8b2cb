"""Memory controls: checkpointing / autocast chosen from the estimate, forced by class attribute or environment."""

from __future__ import annotations

import pytest
import torch

from nnunet_sam.benchmarking.configs import build_sam_network, on_meta, sam_record
from nnunet_sam.benchmarking.counting import parameter_counts
from nnunet_sam.blocks.checkpointing import block_checkpointing, checkpointing_active, run_block_unit
from nnunet_sam.trainers.base import AUTOCAST_ENV, CHECKPOINTING_ENV
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
from nnunet_sam.training.memory_estimate import GIB, choose_memory_options, memory_row


@pytest.fixture(scope="module")
def tiny_row() -> dict:
    record = sam_record(MaskSAMTrainer_tiny, [4, 64, 64], 4)

    def build():
        return build_sam_network(MaskSAMTrainer_tiny, record, 1, 4)

    return memory_row(build, parameter_counts(on_meta(build)), 2, 1, record["patch_size"], 2)


def test_estimates_order_the_option_sets(tiny_row):
    assert tiny_row["none"] > tiny_row["checkpointing"] and tiny_row["none"] > tiny_row["autocast"]
    assert tiny_row["checkpointing+autocast"] < min(tiny_row["checkpointing"], tiny_row["autocast"])


def test_the_cheapest_fitting_setting_is_chosen(tiny_row):
    row = tiny_row
    assert choose_memory_options(row, row["autocast"]) == ("autocast", True), "16-bit, no recomputation if it fits"
    between = (row["autocast"] + row["checkpointing+autocast"]) / 2
    assert choose_memory_options(row, between) == ("checkpointing+autocast", True)
    assert choose_memory_options(row, 1) == ("checkpointing+autocast", False), "nothing fits: the smallest"
    assert choose_memory_options(row, 100 * GIB, autocast=False) == ("none", True)
    assert choose_memory_options(row, 100 * GIB, checkpointing=True) == ("checkpointing+autocast", True)
    assert choose_memory_options(row, 1, checkpointing=False, autocast=False) == ("none", False)


def test_environment_overrides_the_class_attribute(monkeypatch):
    class Forced(MaskSAMTrainer_tiny):
        block_checkpointing = True
        autocast = False

    monkeypatch.delenv(CHECKPOINTING_ENV, raising=False)
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    assert MaskSAMTrainer_tiny.forced_memory_options() == (None, None), "decided from the estimate by default"
    assert Forced.forced_memory_options() == (True, False)
    monkeypatch.setenv(CHECKPOINTING_ENV, "0")
    monkeypatch.setenv(AUTOCAST_ENV, "1")
    assert Forced.forced_memory_options() == (False, True)
    monkeypatch.setenv(AUTOCAST_ENV, "maybe")
    with pytest.raises(ValueError, match="use 1 \\(on\\) or 0 \\(off\\)"):
        Forced.forced_memory_options()


def test_block_checkpointing_is_a_context_and_recomputes_only_with_gradients():
    calls = []

    def block(x):
        calls.append(1)
        return x * x  # saves x for backward, so a checkpointed call recomputes it

    x = torch.ones(3, requires_grad=True)
    assert not checkpointing_active()
    with block_checkpointing():
        assert checkpointing_active()
        run_block_unit(block, x).sum().backward()
        with torch.no_grad():
            run_block_unit(block, x)
    assert not checkpointing_active()
    assert len(calls) == 3, "forward, recomputation in backward, and one plain no-grad call"
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
