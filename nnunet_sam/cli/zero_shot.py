"""``nnunet_sam_make_zero_shot``: a pretrained backbone as an interactive model folder, with no training."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nnunet_sam.backbones.checkpoints import CheckpointError
from nnunet_sam.cli.conventions import DONE, error
from nnunet_sam.inference.zero_shot import MODALITIES, TRAINERS, ZeroShotError, describe, make_zero_shot_model

COMMAND = "nnunet_sam_make_zero_shot"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description="Write a RadSAM model folder of a pretrained backbone that needs no training: slice prompts "
        "(boxes), box propagation from slice to slice, corrections. Use it with nnunet_sam_segment_radsam -m FOLDER "
        "-f all, or serve it with nnunet_sam_serve -m FOLDER -f all.",
        epilog="Example: nnunet_sam_make_zero_shot -o ~/models/lite_medsam_ct && nnunet_sam_segment_radsam -m "
        "~/models/lite_medsam_ct -f all -i ct.nii.gz --prompt box.json -o mask.nii.gz",
    )
    p.add_argument("-o", required=True, help="the model folder to write (must not exist)")
    p.add_argument(
        "--backbone",
        default="lite_medsam",
        choices=sorted(TRAINERS),
        help="pretrained weights: lite_medsam (shipped by the lite extra) or a SAM/MedSAM checkpoint in "
        "$nnUNet_SAM_checkpoints (default: %(default)s)",
    )
    p.add_argument("--modality", default="CT", choices=sorted(MODALITIES), help="image modality (default: CT)")
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="CT window in HU (default: the backbone's pretraining window, soft tissue [-160, 240])",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    window = tuple(args.window) if args.window else None
    try:
        folder = make_zero_shot_model(args.o, args.backbone, args.modality, window)
    except (ZeroShotError, CheckpointError, ImportError) as e:
        return error(COMMAND, e)
    from nnunet_sam.inference.zero_shot import zero_shot_record

    print(f"Wrote {folder}: {describe(zero_shot_record(args.backbone, window), args.modality)}.")
    print(f"Segment with: nnunet_sam_segment_radsam -m {folder} -f all -i IMAGE --prompt PROMPT.json -o MASK.nii.gz")
    return DONE


if __name__ == "__main__":
    raise SystemExit(main())
