"""Checks of nnU-Net's preprocessed training data, run when a SAM trainer builds its datasets (training start).

* Label values that dataset.json does not declare: nnU-Net only notices them with
  ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``; otherwise they reach the loss as class indices out
  of range (an index error or a device-side assert far from the cause). Checked on the preprocessed
  segmentations (one read of each; the minimum and maximum decide, ``np.unique`` only names the culprits).
* A declared class that never occurs: read from the ``class_locations`` that preprocessing stores in every case's
  .pkl (no segmentation is read). Absent from every case: an error (nothing can learn it; usually a wrong
  dataset.json). Absent only from this fold's training cases: a warning (a rare class in a small dataset).
* Preprocessed files that cannot be read (cut short by a full disk or a killed copy, missing, empty): each case's
  files get a cheap look before anything else (:func:`case_file_problems`), and while training
  :class:`CheckedDataset` names the case whose loading fails, also from inside a data-augmentation worker, where
  nnU-Net would only report that "background workers are no longer alive".
"""

from __future__ import annotations

import multiprocessing
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from pickletools import genops

import blosc2
import numpy as np


class TrainingDataError(ValueError):
    """The preprocessed training data contradict dataset.json, or cannot be read."""


class UnreadableCaseError(TrainingDataError):
    """A preprocessed case's files cannot be read."""


def case_files(dataset, identifier: str) -> list[Path]:
    """The files nnU-Net's dataset class reads for ``identifier``: data, segmentation (blosc2 ``.b2nd``, or the
    older ``.npz`` with its unpacked ``.npy``), a previous stage's segmentation, and the properties ``.pkl``."""
    folder = Path(dataset.source_folder)
    if (folder / f"{identifier}.b2nd").exists() or not (folder / f"{identifier}.npz").exists():
        names = [f"{identifier}.b2nd", f"{identifier}_seg.b2nd"]
    else:
        names = [
            f"{identifier}.npz",
            *(n for n in (f"{identifier}.npy", f"{identifier}_seg.npy") if (folder / n).exists()),
        ]
    files = [folder / name for name in names]
    previous = getattr(dataset, "folder_with_segs_from_previous_stage", None)
    if previous is not None:
        stage = Path(previous)
        files.append(
            stage / f"{identifier}.b2nd" if (stage / f"{identifier}.b2nd").exists() else stage / f"{identifier}.npz"
        )
    return [*files, folder / f"{identifier}.pkl"]


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read, from a cheap look (None: readable): missing or empty; a ``.b2nd`` that blosc2
    cannot open (a file cut short lacks the chunk index at its end); an ``.npz`` without its zip directory; an
    ``.npy`` shorter than its header says; a ``.pkl`` whose opcodes end before their STOP (walked with pickletools,
    nothing is unpickled)."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    try:
        if path.suffix == ".b2nd":
            blosc2.open(urlpath=str(path), mode="r")
        elif path.suffix == ".npz":
            zipfile.ZipFile(path).close()
        elif path.suffix == ".npy":
            np.load(path, mmap_mode="r")
        elif path.suffix == ".pkl":
            with open(path, "rb") as f:
                for _ in genops(f):
                    pass
    except Exception as error:  # each reader has its own exceptions for a damaged file
        return f"cut short or damaged ({type(error).__name__}: {error})"
    return None


def case_file_problems(datasets: Iterable, fix: str) -> None:
    """Raise :class:`UnreadableCaseError` naming every case of ``datasets`` (nnU-Net's datasets of a fold) whose
    files :func:`file_problem` finds unreadable; ``fix`` says how to write them again."""
    problems = [
        f"{path} is {problem}"
        for dataset in datasets
        for identifier in dataset.identifiers
        for path in case_files(dataset, identifier)
        if (problem := file_problem(path)) is not None
    ]
    if problems:
        listed = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise UnreadableCaseError(f"{len(problems)} preprocessed file(s) cannot be read: {listed}. {fix}")


class CheckedDataset:
    """One of nnU-Net's datasets whose ``load_case`` names the case when it fails (a file damaged or removed after
    training started): :class:`UnreadableCaseError` with :func:`file_problem` of each of its files and ``fix``.

    The message is also left in ``failure`` (shared memory, written by whichever process failed): nnU-Net's
    data-augmentation workers only print their exception, and the training process reads it from there.
    """

    def __init__(self, dataset, fix: str):
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.fix = fix
        self.failure = multiprocessing.Array("c", 4096, lock=False)

    def __getattr__(self, name: str):  # the rest of nnU-Net's dataset (not while unpickling, before __dict__ is set)
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def load_case(self, identifier: str):
        try:
            return self.dataset.load_case(identifier)
        except Exception as error:
            causes = [
                f"{path} is {problem}"
                for path in case_files(self.dataset, identifier)
                if (problem := file_problem(path))
            ]
            cause = "; ".join(causes) or f"{type(error).__name__}: {error}"
            message = f"preprocessed case {identifier} cannot be read: {cause}. {self.fix}"
            self.failure.value = message.encode()[: len(self.failure) - 1]
            raise UnreadableCaseError(message) from error

    def reported_failure(self) -> str | None:
        """The message of the last failed ``load_case`` in any process, or None."""
        return self.failure.value.decode(errors="replace") or None


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
