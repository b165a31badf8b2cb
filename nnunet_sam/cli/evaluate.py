"""Command-line face of :mod:`nnunet_sam.evaluation.folders` (``nnunet_sam_evaluate``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.cli import conventions
from nnunet_sam.evaluation.folders import EvaluationError, run_evaluation
from nnunet_sam.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM
from nnunet_sam.evaluation.protocols import PROTOCOLS
from nnunet_sam.file_checks import unwritable_folder

COMMAND = "nnunet_sam_evaluate"


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``nnunet_sam_evaluate``."""
    p = argparse.ArgumentParser(
        prog="nnunet_sam_evaluate",
        description="Per-case and per-class Dice, normalized surface Dice (NSD) and HD95 (mm, spacing-aware) of "
        "one or more nnU-Net prediction folders against a reference folder. Writes evaluation.json, tables.md "
        "and table_<metric>.csv (one row per run, class columns, mean column), optionally with a paper "
        "protocol's published rows. Empty masks: Dice/NSD/HD95 are NaN when reference and prediction are both "
        "empty (left out of means, as in nnU-Net); Dice/NSD 0 and HD95 inf when exactly one is empty.",
    )
    p.add_argument("-ref", "--reference", required=True, help="folder of reference label maps (e.g. labelsTs)")
    p.add_argument("-pred", "--predictions", required=True, nargs="+", help="prediction folder(s), one table row each")
    p.add_argument("--names", nargs="+", help="row name per prediction folder (default: the folder names)")
    p.add_argument("-djfile", "--dataset-json", required=True, help="the dataset's dataset.json (labels, file_ending)")
    p.add_argument("-o", "--output", required=True, help="output folder for evaluation.json, tables.md, table_*.csv")
    p.add_argument(
        "--nsd-tolerance",
        type=float,
        default=DEFAULT_NSD_TOLERANCE_MM,
        help=f"NSD tolerance in mm (default {DEFAULT_NSD_TOLERANCE_MM:g}: the MSD-Pancreas tumour protocol of "
        "3DSAM-adapter / MaskSAM)",
    )
    p.add_argument(
        "--published",
        choices=sorted(PROTOCOLS),
        help="append this protocol's published rows (numbers from the papers' tables, sources listed) to the tables",
    )
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nnunet_sam_evaluate``."""
    args = build_parser().parse_args(argv)
    problem = unwritable_folder(args.output)  # before the evaluation, not after it
    if problem is not None:
        return conventions.error(COMMAND, f"the output folder -o: {problem}; give a writable folder")
    try:
        run_evaluation(
            args.reference,
            args.predictions,
            args.dataset_json,
            args.output,
            args.names,
            args.nsd_tolerance,
            args.published,
            args.num_processes,
        )
    except EvaluationError as e:
        return conventions.error(COMMAND, e)
    print((Path(args.output) / "tables.md").read_text())
    print(f"written: {Path(args.output) / 'evaluation.json'}, tables.md, table_*.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
