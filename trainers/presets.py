"""Paper presets: one rule for every field, a source per field, and the tables docs/presets.md shows.

A preset is a trainer class whose ``preset_sources`` name, for every field it fixes, where the value comes from
(:data:`PRESET_RULE`); variants and ablation rows derive from it (:func:`with_sources`, :func:`ablation_trainers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnunet_sam.trainers.base import SAMTrainer

PRESET_RULE = (
    "Every field of a preset takes the value of the code that produced the paper's published numbers, where that code "
    "exists and sets the field; otherwise the paper's; otherwise it is a stated choice. Where the paper states another "
    "value than its code, the paper's reading is a named variant of the preset."
)
# A source reads "KIND: where", KIND one of these. "nnU-Net" marks a default that the public code inherits unchanged.
SOURCE_KINDS = ("code", "paper", "nnU-Net", "chosen")
# Fields every preset's row gives (method presets add their own, e.g. loss weights, and each attribute they set).
PRESET_FIELDS = (
    "backbone",
    "fixed_patch",
    "input_scale",
    "epochs",
    "fixed_batch_size",
    "optimizer_name",
    "learning_rate",
    "optimizer_weight_decay",
    "lr_schedule",
    "grad_clip",
)
_NNUNET_DEFAULTS = {"learning_rate": 1e-2, "optimizer_weight_decay": 3e-5, "epochs": 1000}
_NOT_FIELDS = {"preset_sources", "network_class"}


def is_preset(cls: type) -> bool:
    """Whether a trainer class is a paper preset (or a variant of one): it carries per-field sources."""
    return bool(getattr(cls, "preset_sources", None))


def preset_set_fields(cls: type[SAMTrainer]) -> set[str]:
    """The attributes a preset (and each preset class it derives from) sets in its own body: each needs a source."""
    fields = set()
    for klass in cls.__mro__:
        if not is_preset(klass) or "preset_sources" not in vars(klass):
            break
        fields |= {
            name
            for name, value in vars(klass).items()
            if not name.startswith("_")
            and name not in _NOT_FIELDS
            and not callable(value)
            and not isinstance(value, (classmethod, staticmethod, property))
        }
    return fields


def preset_value(cls: type[SAMTrainer], field: str) -> str:
    """A preset field's effective value as the table shows it (None: nnU-Net's default or the patch rule)."""
    value = getattr(cls, field)
    if value is None and field in _NNUNET_DEFAULTS:
        value = _NNUNET_DEFAULTS[field]
    if value is None and field == "num_queries":
        return "max(8, ceil(1.5 C))"
    if value is None and field == "input_scale":
        value = 1
    if field == "options" and dataclasses.is_dataclass(value):
        default = type(value)()
        changed = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if getattr(value, f.name) != getattr(default, f.name)
        }
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def preset_rows(cls: type[SAMTrainer]) -> list[tuple[str, str, str]]:
    """``(field, value, source)`` for every field of a preset's sources, in their order."""
    return [(field, preset_value(cls, field), source) for field, source in cls.preset_sources.items()]


def preset_markdown(cls: type[SAMTrainer]) -> str:
    """The markdown table of one preset (docs/presets.md holds these tables; a test keeps them equal)."""
    lines = [f"#### `{cls.__name__}`", "", "| field | value | source |", "|---|---|---|"]
    lines += [f"| `{field}` | {value} | {source} |" for field, value, source in preset_rows(cls)]
    return "\n".join(lines)


def with_sources(base: dict[str, str], **changes: str) -> dict[str, str]:
    """A variant's sources: its parent's, with the fields it changes."""
    return {**base, **changes}


def ablation_trainers(preset: type[SAMTrainer], rows: Mapping[str, Any], table: str) -> dict[str, type[SAMTrainer]]:
    """``{PRESET_ROW: trainer}``: every ablation row (``rows``: row name -> options) on top of a paper preset, so that
    the paper's ablation table runs in the paper's regime by name (``nnUNetv2_train ... -tr MaskSAMTrainer_ACDC_B4``).
    The module that defines ``preset`` binds them (``globals().update(...)``), so nnU-Net finds and pickles them."""
    trainers = {}
    for row, options in rows.items():
        name = f"{preset.__name__}_{row}"
        trainers[name] = type(
            name,
            (preset,),
            {
                "__module__": preset.__module__,
                "__qualname__": name,
                "__doc__": f"Row {row} of {table} on top of :class:`{preset.__name__}` (its regime, these options).",
                "options": options,
                "preset_sources": with_sources(preset.preset_sources, options=f"paper: {table}, row {row}"),
            },
        )
    return trainers
