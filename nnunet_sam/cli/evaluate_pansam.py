"""Command-line face of :mod:`nnunet_sam.evaluation.pansam` (``nnunet_sam_evaluate_pansam``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.cli import conventions
from nnunet_sam.evaluation.pansam import ROWS, DatasetLabelError, evaluate, markdown

COMMAND = "nnunet_sam_evaluate_pansam"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_sam_evaluate_pansam",
        description="PanSAM ablation rows (stage 1; + aggregator; + prompts; full; reference prompts) and "
        "zero-shot figures of one trained PanSAM model: Dice, Jaccard, precision, recall per case and mean.",
        epilog="Example: nnunet_sam_evaluate_pansam -m $nnUNet_results/Dataset082_NIH/PanSAMTrainer__nnUNetPlans__"
        "3d_fullres -f 0 --data nih imagesTs labelsTs --data abdomen1k A1K/images A1K/labels -o eval_pansam",
    )
    p.add_argument("-m", "--model", required=True, help="model folder (TRAINER__PLANS__CONFIGURATION)")
    p.add_argument(
        "-f", "--fold", type=conventions.fold, default=0, help="fold (default: %(default)s; 'all' for -f all models)"
    )
    p.add_argument(
        "--data",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "IMAGES", "LABELS"),
        help="a dataset: name, images folder (CASE_0000.nii.gz ...) and reference folder (CASE.nii.gz); repeat it "
        "for zero-shot datasets",
    )
    p.add_argument(
        "--target-label",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "LABEL"),
        help="the target structure's label value (or name) in dataset NAME, when its dataset.json does not name "
        "it as the model's dataset.json does (default: looked up by name)",
    )
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows (default: all)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="default: %(default)s")
    p.add_argument("-o", "--output", required=True, help="folder for pansam_eval.json/.md and the segmentations")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-device", default="cpu", help="cpu or cuda (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from nnunet_sam.inference.model_folder import ModelFolderError

    args = build_parser().parse_args(argv)
    try:
        report = evaluate(
            args.model,
            [tuple(d) for d in args.data],
            args.rows,
            args.fold,
            args.checkpoint,
            args.output,
            args.disable_tta,
            args.device,
            dict(args.target_label),
        )
    except (DatasetLabelError, ModelFolderError) as error:
        return conventions.error(COMMAND, error)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pansam_eval.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "pansam_eval.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
