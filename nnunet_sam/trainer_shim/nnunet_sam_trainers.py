"""Shim module for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports every module of this folder as a top-level module and drops it from ``sys.modules``
afterwards, so classes *defined* here could not be pickled. This module therefore only re-exports the
trainers from the installed package, where their ``__module__`` (``nnunet_sam.trainers.*``) stays
importable under both ``fork`` and ``spawn``. Keep this folder free of other modules and of ``__init__.py``.
"""

from nnunet_sam.trainers.masksam import (
    MaskSAMTrainer,
    MaskSAMTrainer_LiteMedSAM,
    MaskSAMTrainer_LiteMedSAM_demo,
    MaskSAMTrainer_MedSAM,
    MaskSAMTrainer_tiny,
    MaskSAMTrainer_tiny_demo,
    MaskSAMTrainer_vith,
    MaskSAMTrainer_vitl,
)
from nnunet_sam.trainers.sam3d_adapter import (
    SAM3DAdapterTrainer,
    SAM3DAdapterTrainer_MedSAM,
    SAM3DAdapterTrainer_prompted,
    SAM3DAdapterTrainer_prompted_tiny,
    SAM3DAdapterTrainer_prompted_tiny_demo,
    SAM3DAdapterTrainer_tiny,
    SAM3DAdapterTrainer_tiny_demo,
    SAM3DAdapterTrainer_vith,
    SAM3DAdapterTrainer_vitl,
)
from nnunet_sam.trainers.self_prompt_sam import (
    SelfPromptSAMTrainer,
    SelfPromptSAMTrainer_LiteMedSAM,
    SelfPromptSAMTrainer_LiteMedSAM_demo,
    SelfPromptSAMTrainer_MedSAM,
    SelfPromptSAMTrainer_S1,
    SelfPromptSAMTrainer_S2,
    SelfPromptSAMTrainer_S3,
    SelfPromptSAMTrainer_S6,
    SelfPromptSAMTrainer_S7,
    SelfPromptSAMTrainer_S8,
    SelfPromptSAMTrainer_S9,
    SelfPromptSAMTrainer_tiny,
    SelfPromptSAMTrainer_tiny_demo,
    SelfPromptSAMTrainer_vith,
    SelfPromptSAMTrainer_vitl,
)

__all__ = [
    "MaskSAMTrainer",
    "MaskSAMTrainer_vitl",
    "MaskSAMTrainer_vith",
    "MaskSAMTrainer_MedSAM",
    "MaskSAMTrainer_LiteMedSAM",
    "MaskSAMTrainer_LiteMedSAM_demo",
    "MaskSAMTrainer_tiny",
    "MaskSAMTrainer_tiny_demo",
    "SelfPromptSAMTrainer",
    "SelfPromptSAMTrainer_vitl",
    "SelfPromptSAMTrainer_vith",
    "SelfPromptSAMTrainer_MedSAM",
    "SelfPromptSAMTrainer_LiteMedSAM",
    "SelfPromptSAMTrainer_LiteMedSAM_demo",
    "SelfPromptSAMTrainer_tiny",
    "SelfPromptSAMTrainer_tiny_demo",
    "SelfPromptSAMTrainer_S1",
    "SelfPromptSAMTrainer_S2",
    "SelfPromptSAMTrainer_S3",
    "SelfPromptSAMTrainer_S6",
    "SelfPromptSAMTrainer_S7",
    "SelfPromptSAMTrainer_S8",
    "SelfPromptSAMTrainer_S9",
    "SAM3DAdapterTrainer",
    "SAM3DAdapterTrainer_vitl",
    "SAM3DAdapterTrainer_vith",
    "SAM3DAdapterTrainer_MedSAM",
    "SAM3DAdapterTrainer_tiny",
    "SAM3DAdapterTrainer_tiny_demo",
    "SAM3DAdapterTrainer_prompted",
    "SAM3DAdapterTrainer_prompted_tiny",
    "SAM3DAdapterTrainer_prompted_tiny_demo",
]
