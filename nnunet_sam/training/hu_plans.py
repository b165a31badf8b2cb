"""Plans that keep CT channels in HU, for methods that window the scanner's values (RadSAM, zero-shot models).

nnU-Net's CT normalisation clips every CT channel to the 0.5 and 99.5 percentiles of the training labels' voxels
and z-scores it: a window in HU applied afterwards (RadSAM's [-500, 1000], LiteMedSAM's soft-tissue [-160, 240])
sees values nnU-Net already clipped. :func:`hu_plans` turns a dataset's plans into a variant (nnU-Net's plans
identifier mechanism, ``-p``) whose CT channels use nnU-Net's own ``NoNormalization`` (HU as float32) and whose
preprocessed data goes to folders of its own; the network then windows the HU itself
(:func:`nnunet_sam.network_architectures.radsam.intensity_windows`). Nothing else of the plans changes.

    nnunet_sam_make_hu_plans -d DATASET                                   # writes nnUNetPlans_HU.json
    nnUNetv2_preprocess -d DATASET -plans_name nnUNetPlans_HU -c 2d
    nnUNetv2_train DATASET 2d 0 -tr RadSAMTrainer -p nnUNetPlans_HU
"""

from __future__ import annotations

import copy

HU_SUFFIX = "_HU"


class HUPlansError(ValueError):
    """Plans that cannot be turned into HU plans (no CT channel)."""


def hu_plans(plans: dict) -> dict:
    """A copy of ``plans`` whose CT channels are not normalised (``NoNormalization``: HU), renamed ``<name>_HU``,
    with its own ``data_identifier`` per configuration."""
    out = copy.deepcopy(plans)
    name = str(plans["plans_name"])
    out["plans_name"] = name + HU_SUFFIX
    changed = False
    for configuration in out["configurations"].values():
        schemes = configuration.get("normalization_schemes")
        if schemes is not None:
            if "CTNormalization" in schemes:
                changed = True
            configuration["normalization_schemes"] = [
                "NoNormalization" if s == "CTNormalization" else s for s in schemes
            ]
        identifier = configuration.get("data_identifier")
        if identifier is not None:
            configuration["data_identifier"] = (
                name + HU_SUFFIX + identifier[len(name) :] if identifier.startswith(name) else identifier + HU_SUFFIX
            )
    if not changed:
        raise HUPlansError(
            f"the plans '{name}' have no CT channel (CTNormalization): there are no HU to keep. The dataset.json "
            "channel name 'CT' makes nnU-Net plan one."
        )
    return out
