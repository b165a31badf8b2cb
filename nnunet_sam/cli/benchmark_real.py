"""``nnunet_sam_benchmark_real``: LiteMedSAM's own recipe against the zero-shot model on a real CT and MR."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.cli.conventions import DONE, error

COMMAND = "nnunet_sam_benchmark_real"
DEFAULT_CACHE = Path.home() / ".cache" / "nnunet_sam" / "test_data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description="Per structure Dice of LiteMedSAM's own recipe and of this package's zero-shot interactive model "
        "(slice level, one box + propagation, 1/3/5 simulated corrections) on the real CT and MR of the "
        "totalsegmentator source distribution; writes real_images.md, real_images.json and a figure per scan.",
    )
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument(
        "--reference-files",
        help="the sdist's tests/reference_files folder (default: downloaded once with pip into "
        f"$NNUNET_SAM_TEST_DATA or {DEFAULT_CACHE})",
    )
    p.add_argument("--modalities", nargs="+", default=["CT", "MR"], choices=["CT", "MR"], help="scans to run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnunet_sam.backbones.lite_medsam import INSTALL_HINT, lite_medsam_available
    from nnunet_sam.benchmarking import real_images

    if not lite_medsam_available():
        return error(COMMAND, f"LiteMedSAM is not installed: {INSTALL_HINT}")
    if args.reference_files:
        files = Path(args.reference_files)
        if not (files / "example_ct_sm.nii.gz").is_file():
            return error(COMMAND, f"{files} holds no example_ct_sm.nii.gz: give the sdist's tests/reference_files")
    else:
        try:
            files = real_images.fetch_reference_files(os.environ.get("NNUNET_SAM_TEST_DATA") or DEFAULT_CACHE)
        except RuntimeError as e:
            return error(COMMAND, e)
    results = real_images.run(files, Path(args.o), tuple(args.modalities))
    for modality, result in results.items():
        print(f"## {modality}\n\n{real_images.markdown_table(result)}\n")
    print(f"Wrote {Path(args.o) / 'real_images.md'}, real_images.json and the figures.")
    return DONE


if __name__ == "__main__":
    raise SystemExit(main())
