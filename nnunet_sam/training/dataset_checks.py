"""Checks of nnU-Net's preprocessed training data, run when a SAM trainer builds its datasets (training start).

* Label values that dataset.json does not declare: nnU-Net only notices them with
  ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``; otherwise they reach the loss as class indices out
  of range (an index error or a device-side assert far from the cause). Checked on the preprocessed
  segmentations (one read of each; the minimum and maximum decide, ``np.unique`` only names the culprits).
* A declared class that never occurs: read from the ``class_locations`` that preprocessing stores in every case's
  .pkl (no segmentation is read). Absent from every case: an error (nothing can learn it; usually a wrong
  dataset.json). Absent only from this fold's training cases: a warning (a rare class in a small dataset).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TrainingDataError(ValueError):
    """The preprocessed training data contradict dataset.json."""


def undeclared_label_values(seg: np.ndarray, labels: Sequence[int]) -> list[int]:
    """Values of ``seg`` that are neither a declared label nor -1 (nnU-Net's mark outside the nonzero mask)."""
    allowed = {-1, *labels}
    low, high = int(seg.min()), int(seg.max())
    if low >= -1 and high <= max(labels) and set(range(0, max(labels) + 1)) <= allowed:
        return []
    return [int(v) for v in np.unique(seg) if int(v) not in allowed]


def check_training_data(training, validation, labels: dict[str, int]) -> list[str]:
    """Raise :class:`TrainingDataError` on undeclared label values or a class absent from every case.

    ``training``, ``validation``: nnU-Net's datasets of the fold (``identifiers``; ``load_case(identifier)`` returns
    data, seg, seg_prev, properties); ``labels``: dataset.json's name -> value. Returns warnings (classes absent from
    the training cases of this fold only).
    """
    names = {value: name for name, value in labels.items()}
    foreground = sorted(v for v in names if v != 0)
    undeclared: dict[str, list[int]] = {}
    seen_anywhere: set[int] = set()
    seen_in_training: set[int] = set()
    for dataset, is_training in ((training, True), (validation, False)):
        for identifier in dataset.identifiers:
            _, seg, _, properties = dataset.load_case(identifier)
            bad = undeclared_label_values(np.asarray(seg[:]), sorted(names))
            if bad:
                undeclared[identifier] = bad
            present = {int(c) for c, locations in properties["class_locations"].items() if len(locations) > 0}
            seen_anywhere |= present
            if is_training:
                seen_in_training |= present
    if undeclared:
        cases = "; ".join(f"{case}: {values}" for case, values in sorted(undeclared.items())[:10])
        raise TrainingDataError(
            f"Label values not declared in dataset.json {labels} in {len(undeclared)} case(s) ({cases}). "
            "Fix the label files or dataset.json, then preprocess again "
            "(nnUNetv2_plan_and_preprocess --verify_dataset_integrity lists them per file)."
        )
    never = [f"{names[v]} ({v})" for v in foreground if v not in seen_anywhere]
    if never:
        raise TrainingDataError(
            f"Class(es) {', '.join(never)} of dataset.json never occur in any preprocessed case of this fold: nothing "
            "can learn them. Remove them from dataset.json (and renumber the labels) or add cases that contain them."
        )
    return [
        f"Class {names[v]} ({v}) does not occur in the training cases of this fold (only in its validation cases)"
        for v in foreground
        if v not in seen_in_training
    ]
