"""The command-line faces: one naming scheme, every command answers --help, old names still work for one release."""

from __future__ import annotations

import re
import sys
from importlib.metadata import distribution

import pytest

from nnunet_sam.cli.deprecated import RENAMED

SCRIPTS = {e.name: e for e in distribution("nnunet-sam").entry_points if e.group == "console_scripts"}
SCHEME = re.compile(r"^nnunet_sam_(demo|make|benchmark|predict|segment|evaluate|convert|serve|train)(_[a-z0-9_]+)?$")


def _help(name: str, monkeypatch, capsys) -> tuple[str, str]:
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].load()()
    assert exit_info.value.code in (0, None), f"{name} --help exited with {exit_info.value.code}"
    return capsys.readouterr()


def test_every_current_command_follows_the_scheme():
    current = sorted(set(SCRIPTS) - set(RENAMED))
    assert current and not [n for n in current if not SCHEME.match(n)], current
    assert {new for new, _ in RENAMED.values()} <= set(current), "every old name points at an installed command"


@pytest.mark.parametrize("name", sorted(SCRIPTS), ids=str)
def test_command_answers_help(name, monkeypatch, capsys):
    out, err = _help(name, monkeypatch, capsys)
    assert "usage:" in out.lower()
    if name in RENAMED:
        new = RENAMED[name][0]
        assert f"{name} is deprecated" in err and f"use {new}" in err
        assert SCRIPTS[new].value == RENAMED[name][1], "the old name runs the same function as the new one"
    else:
        assert "deprecated" not in err


def test_train_help_lists_its_own_options_with_nnunets(monkeypatch, capsys):
    """Issue 26/29: nnunet_sam_train --help printed nnU-Net's help only, without --batch-per-process."""
    out, _ = _help("nnunet_sam_train", monkeypatch, capsys)
    assert out.startswith("usage: nnunet_sam_train [-h] [--batch-per-process B] [-tr TR]")
    assert "dataset_name_or_id" in out and "-num_gpus NUM_GPUS" in out  # nnU-Net's options
    assert re.search(r"nnunet_sam_train's own options:.*--batch-per-process B\s+under torchrun", out, re.S)
