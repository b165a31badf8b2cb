"""``nnunet_sam_make_hu_plans``: a plans variant whose CT channels stay in HU (see nnunet_sam.training.hu_plans)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunet_sam.cli.conventions import DONE, error
from nnunet_sam.training.hu_plans import HU_SUFFIX, HUPlansError, hu_plans

COMMAND = "nnunet_sam_make_hu_plans"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description="Write a plans variant (PLANS_HU.json) whose CT channels are kept in HU (nnU-Net's "
        "NoNormalization) for methods that window HU themselves (RadSAM); then nnUNetv2_preprocess -plans_name "
        "PLANS_HU and train with -p PLANS_HU.",
    )
    p.add_argument("-d", required=True, help="dataset name or id (its plans must exist in nnUNet_preprocessed)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier to start from (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        return error(COMMAND, "the environment variable nnUNet_preprocessed is not set")
    try:
        dataset = maybe_convert_to_dataset_name(args.d)
    except RuntimeError as e:
        return error(COMMAND, e)
    source = os.path.join(root, dataset, f"{args.p}.json")
    target = os.path.join(root, dataset, f"{args.p}{HU_SUFFIX}.json")
    try:
        with open(source, encoding="utf-8") as f:
            plans = json.load(f)
        variant = hu_plans(plans)
    except FileNotFoundError:
        return error(COMMAND, f"no plans {source}: run nnUNetv2_plan_and_preprocess -d {args.d} first")
    except (json.JSONDecodeError, KeyError, HUPlansError) as e:
        return error(COMMAND, f"{source}: {e}")
    tmp = target + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(variant, f, indent=4)
    os.replace(tmp, target)
    print(
        f"Wrote {target}. Next: nnUNetv2_preprocess -d {args.d} -plans_name {variant['plans_name']} -c 2d, then "
        f"nnUNetv2_train {args.d} 2d FOLD -tr RadSAMTrainer -p {variant['plans_name']}"
    )
    return DONE


if __name__ == "__main__":
    raise SystemExit(main())
