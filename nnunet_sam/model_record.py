"""The record of one model: everything that shapes its network, saved with the model and rebuilt from there.

At training time a SAM trainer writes the record into the ``nnunet_sam`` block of its configuration in the plans
(``plans.json`` of the model folder); ``nnUNetv2_predict`` and every other loader rebuild the network from that
block alone (:func:`build_from_record`), never from class defaults that a later version may change.

The block (JSON)::

    {"format": 2, "backbone": "vit_b", "patch_size": [8, 224, 224], "sam_input_size": 224, "num_queries": 8,
     "attention": "sdpa", "options": {...the method's options dataclass...}}   (+ "slice_group", "window")

Format 1 (models trained before version 0.2) had no ``format`` and no ``options``: their options are the trainer
class's options, with every field that was added or changed since then set to its legacy value (the field's
``metadata["legacy"]``), which reproduces how that version built the network. Within a format-2 record, an option
field that the record lacks (added by a later version) also takes its legacy value; a field the record has but this
version does not know is refused (the model was saved by a newer version).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nnunet_sam.backbones.attention import LEGACY_ATTENTION, check_attention

PLANS_KEY = "nnunet_sam"
RECORD_FORMAT = 2


class RecordError(ValueError):
    """A saved record that this version cannot rebuild a network from."""


def legacy_value(f: dataclasses.Field) -> Any:
    """The value a field had before it was added or changed (its ``metadata["legacy"]``), else its default."""
    if "legacy" in f.metadata:
        return f.metadata["legacy"]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def options_to_json(options: Any) -> dict | None:
    """A method's options dataclass -> a JSON-ready dict (None stays None)."""
    return None if options is None else _jsonable(dataclasses.asdict(options))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def options_from_json(saved: Mapping | None, template: Any) -> Any:
    """Options of the type of ``template`` from a saved dict; ``saved=None`` (format 1): ``template``, legacy values.

    Nested options dataclasses are rebuilt recursively; lists become tuples where the field holds a tuple.
    """
    if template is None:
        if saved:
            raise RecordError(f"the saved record has method options {dict(saved)} but this trainer has none")
        return None
    fields = {f.name: f for f in dataclasses.fields(template)}
    if saved is None:
        values = {}
        for name, f in fields.items():
            current = getattr(template, name)
            if "legacy" in f.metadata:
                values[name] = f.metadata["legacy"]
            elif dataclasses.is_dataclass(current):
                values[name] = options_from_json(None, current)
            else:
                values[name] = current
        return dataclasses.replace(template, **values)
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise RecordError(
            f"the saved model has options {unknown} that {type(template).__name__} of this nnunet-sam version does "
            "not know: it was trained with a newer version. Install that version (or newer) to use it."
        )
    values = {}
    for name, f in fields.items():
        if name not in saved:
            values[name] = legacy_value(f)
            continue
        current, value = getattr(template, name), saved[name]
        if dataclasses.is_dataclass(current):
            value = options_from_json(value, current)
        elif isinstance(value, list) and isinstance(current, tuple):
            value = tuple(value)
        values[name] = value
    return type(template)(**values)


@dataclass(frozen=True)
class ModelRecord:
    """Everything that shapes one trained network (see the module docstring)."""

    backbone: str
    patch_size: tuple[int, ...]
    sam_input_size: int
    num_queries: int
    options: Any = None  # the method's options dataclass (MaskSAMOptions, ...), or None
    slice_group: int | None = None  # volumetric methods (3DSAM-adapter)
    window: int | None = None
    attention: str = LEGACY_ATTENTION  # nnunet_sam.backbones.attention; blocks saved before the field: SAM's own
    format: int = RECORD_FORMAT
    extra: dict = field(default_factory=dict)  # top-level fields this version does not interpret

    BASE_FIELDS = ("backbone", "patch_size", "sam_input_size", "num_queries", "slice_group", "window", "attention")

    @classmethod
    def from_block(cls, block: Mapping, options_template: Any) -> ModelRecord:
        """Parse the plans block; ``options_template`` is the trainer's options (used for format-1 records)."""
        fmt = int(block.get("format", 1))
        if fmt > RECORD_FORMAT:
            raise RecordError(
                f"the model's record has format {fmt}, newer than this nnunet-sam version understands "
                f"({RECORD_FORMAT}): it was trained with a newer version. Install that version (or newer) to use it."
            )
        missing = [k for k in cls.BASE_FIELDS[:4] if k not in block]
        if missing:
            raise RecordError(f"the model's '{PLANS_KEY}' block lacks {missing}; it cannot be rebuilt")
        options = options_from_json(block.get("options") if fmt >= 2 else None, options_template)
        known = set(cls.BASE_FIELDS) | {"options", "format"}
        return cls(
            backbone=str(block["backbone"]),
            patch_size=tuple(int(s) for s in block["patch_size"]),
            sam_input_size=int(block["sam_input_size"]),
            num_queries=int(block["num_queries"]),
            options=options,
            slice_group=None if block.get("slice_group") is None else int(block["slice_group"]),
            window=None if block.get("window") is None else int(block["window"]),
            attention=check_attention(block.get("attention", LEGACY_ATTENTION)),
            format=fmt,
            extra={k: v for k, v in block.items() if k not in known},
        )

    def to_block(self) -> dict:
        """The JSON block written into the plans."""
        block: dict = {
            "format": self.format,
            "backbone": self.backbone,
            "patch_size": list(self.patch_size),
            "sam_input_size": self.sam_input_size,
            "num_queries": self.num_queries,
        }
        if self.slice_group is not None:
            block.update(slice_group=self.slice_group, window=self.window)
        block["attention"] = self.attention
        block["options"] = options_to_json(self.options)
        block.update(self.extra)
        return block

    def network_arguments(self) -> dict[str, Any]:
        """The record's values by the constructor-argument names that networks use."""
        return {
            "backbone": self.backbone,
            "patch_size": list(self.patch_size),
            "sam_input_size": self.sam_input_size,
            "num_queries": self.num_queries,
            "slice_group": self.slice_group,
            "window": self.window,
            "attention": self.attention,
            "options": self.options,
        }


def build_from_record(
    network_class: type[nn.Module], record: ModelRecord, in_channels: int, num_classes: int
) -> nn.Module:
    """``network_class`` built from the record: every constructor argument is taken, by name, from the record
    (``backbone``, ``patch_size``, ``sam_input_size``, ``num_queries``, ``slice_group``, ``window``, ``options``) or
    is ``in_channels`` / ``num_classes``. A constructor argument the record cannot supply is an error, never a
    silent default: whatever shapes the network must be in the record."""
    available = {**record.network_arguments(), "in_channels": in_channels, "num_classes": num_classes}
    kwargs, missing = {}, []
    for name, parameter in inspect.signature(network_class).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in available and (available[name] is not None or name == "options"):
            kwargs[name] = available[name]
        else:
            missing.append(name)
    if missing:
        raise RecordError(
            f"{network_class.__name__} takes {missing}, which the model's record does not hold: everything that "
            "shapes a network must be saved in the record (put it into the method's options)."
        )
    return network_class(**kwargs)
