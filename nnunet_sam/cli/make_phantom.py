"""Command-line face of :mod:`nnunet_sam.demo.phantoms`."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from nnunet_sam.demo.phantoms import MAX_ORGANS, MIN_SHAPE, ORGAN_NAMES, make_phantom_dataset
from nnunet_sam.file_checks import unwritable_folder


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``nnunet_sam_make_phantom``."""
    p = argparse.ArgumentParser(
        prog="nnunet_sam_make_phantom",
        description="Generate a synthetic multi-organ CT-like 3D phantom dataset in nnU-Net v2 raw format "
        "(imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).",
        epilog="Example: nnunet_sam_make_phantom --raw $nnUNet_raw --id 990 && "
        "nnUNetv2_plan_and_preprocess -d 990 -c 3d_fullres --verify_dataset_integrity",
    )
    p.add_argument("--raw", default=None, help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--id", type=int, default=990, help="dataset id, 1..999 (default: %(default)s)")
    p.add_argument(
        "--name", default="Phantom", help="dataset name, the folder becomes DatasetXXX_NAME (default: %(default)s)"
    )
    p.add_argument("--num-train", type=int, default=12, help="number of training cases (default: %(default)s)")
    p.add_argument(
        "--num-test",
        type=int,
        default=4,
        help="number of held-out test cases in imagesTs/labelsTs (default: %(default)s)",
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(24, 96, 96),
        metavar=("D", "H", "W"),
        help=f"volume shape in voxels, (z, y, x) order, at least {MIN_SHAPE} (default: 24 96 96)",
    )
    p.add_argument(
        "--spacing",
        type=_positive_float,
        nargs=3,
        default=(3.0, 1.0, 1.0),
        metavar=("SZ", "SY", "SX"),
        help="voxel spacing in mm, (z, y, x) order; thicker slices by default (default: 3 1 1)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: CT only; 2: CT + MR-like channel (named T2, z-score normalised) (default: %(default)s)",
    )
    p.add_argument(
        "--organs",
        type=int,
        default=4,
        help=f"number of organ labels, 1..{MAX_ORGANS}, in this order: {', '.join(ORGAN_NAMES)} (default: 4)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed, same seed -> identical data (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nnunet_sam_make_phantom``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        parser.error("no output folder: pass --raw or set the nnUNet_raw environment variable")
    problem = unwritable_folder(raw)
    if problem is not None:
        parser.error(f"--raw / $nnUNet_raw: {problem}; give a writable folder")
    try:
        folder = make_phantom_dataset(
            raw,
            dataset_id=args.id,
            name=args.name,
            num_train=args.num_train,
            num_test=args.num_test,
            shape=tuple(args.shape),
            spacing=tuple(args.spacing),
            num_channels=args.channels,
            num_organs=args.organs,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.num_train} training + {args.num_test} test cases to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
