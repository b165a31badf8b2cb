"""The one convention of every ``nnunet_sam_*`` command: messages, exit codes, nnU-Net's model flags.

* Exit codes and error lines (``COMMAND: error: MESSAGE``, 0 done, 1 some cases failed, 2 unusable input) are
  defined in :mod:`nnunet_sam.exit_codes`, below the command layer, and re-exported here for the command faces.
* Flags follow nnU-Net's own commands where they overlap (``-i``, ``-o``, ``-m``, ``-d``, ``-tr``, ``-c``,
  ``-f``, ``-chk``, ``-device``, ``--disable_tta``); other flags are ``--long-names``.
"""

from __future__ import annotations

import argparse

from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunet_sam.exit_codes import DONE, FAILED, UNUSABLE, error, failed_cases

__all__ = [
    "DONE",
    "FAILED",
    "UNUSABLE",
    "add_model_arguments",
    "error",
    "failed_cases",
    "fold",
    "model_folder_and_folds",
]


def add_model_arguments(parser: argparse.ArgumentParser, trainer: str, configuration: str | None) -> None:
    """Model selection and inference options, named as in ``nnUNetv2_predict``; see :func:`model_folder_and_folds`."""
    parser.add_argument("-m", help="model folder (instead of -d, -c, -tr, -p), as nnUNetv2_predict_from_modelfolder")
    parser.add_argument("-d", help="dataset name or id")
    parser.add_argument("-c", default=configuration, help=f"configuration (default {configuration})")
    parser.add_argument("-tr", default=trainer, help=f"trainer (default {trainer})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", nargs="+", type=fold, default=[0, 1, 2, 3, 4], help="folds (or 'all')")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding window step (fraction of the patch)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("--save_probabilities", action="store_true", help="also write the probabilities (.npz)")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device")


def model_folder_and_folds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, list]:
    """The model folder (``-m``, or nnU-Net's results folder of ``-d -c -tr -p``) and the folds of ``-f``."""
    if args.m is None and (args.d is None or args.c is None):
        parser.error("give -d and -c (with -tr, -p), or the model folder with -m")
    return args.m or get_output_folder(args.d, args.tr, args.p, args.c), list(args.f)


def fold(value: str) -> int | str:
    """argparse type of ``-f``: a fold number (0, 1, ...) or ``all``; anything else is a usage error (exit 2)."""
    if value == "all":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fold: give a number (0, 1, ...) or 'all'") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fold: give a number (0, 1, ...) or 'all'")
    return number
