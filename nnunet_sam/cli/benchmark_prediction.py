"""Command-line face of :mod:`nnunet_sam.benchmarking.prediction`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.benchmarking.prediction import benchmark_prediction, format_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_sam_benchmark_prediction",
        description="Time nnU-Net's CPU sliding-window prediction of one phantom volume for tiny MaskSAM, tiny "
        "Self-Prompt-SAM and nnU-Net's default U-Net (same run), per thread setting, with a per-forward breakdown, "
        "the export and the cheaper prediction choices.",
    )
    p.add_argument("--backbones", nargs="+", default=["tiny"], choices=["tiny", "lite_medsam"])
    p.add_argument("--shape", nargs=3, type=int, default=[24, 96, 96], metavar=("D", "H", "W"))
    p.add_argument(
        "--threads",
        nargs="+",
        default=["nnunet", "1"],
        help="intra-op thread settings to compare, 'nnunet' = what nnUNetv2_predict uses (default: nnunet 1)",
    )
    p.add_argument("--disable_tta", action="store_true", help="time the settings without test-time mirroring")
    p.add_argument("--no-cheaper", action="store_true", help="skip the --disable_tta / -step_size 1 rows")
    p.add_argument("--forwards", type=int, default=3, help="forwards per model for the breakdown (default: 3)")
    p.add_argument("-o", "--output", default=None, help="also write the result as JSON to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for t in args.threads:
        if t != "nnunet" and not (t.isdigit() and int(t) > 0):
            print(f"nnunet_sam_benchmark_prediction: error: --threads takes 'nnunet' or positive integers, not {t!r}")
            return 2
    if "lite_medsam" in args.backbones:
        from nnunet_sam.backbones.lite_medsam import INSTALL_HINT, lite_medsam_available

        if not lite_medsam_available():
            print(f"nnunet_sam_benchmark_prediction: error: --backbones lite_medsam needs {INSTALL_HINT}")
            return 2
    result = benchmark_prediction(
        args.backbones,
        args.shape,
        threads=[t if t == "nnunet" else int(t) for t in args.threads],
        mirroring=not args.disable_tta,
        cheaper=not args.no_cheaper,
        forwards=args.forwards,
        log=lambda s: print(s, flush=True),
    )
    print("\n" + format_report(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
