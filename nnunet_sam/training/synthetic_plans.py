"""An nnU-Net plans dict for a given patch, written without a dataset (benchmarks and tests).

nnU-Net's experiment planner writes ``plans.json`` from a dataset's fingerprint. Code that measures or tests a
network without a dataset (the benchmark, unit tests of the trainers) needs the same layout: :func:`plans_for_patch`
is the one place that writes it (no transpose, one configuration), with the configuration fields a caller gives
(nnU-Net's default preprocessing from :func:`nnunet_preprocessing`, an ``architecture`` for nnU-Net's own builder,
an ``nnunet_sam`` record block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def configuration_name(patch_size: Sequence[int]) -> str:
    """nnU-Net's name of the configuration of a 3D (``3d_fullres``) or 2D (``2d``) patch."""
    return "3d_fullres" if len(patch_size) == 3 else "2d"


def nnunet_preprocessing(spacing: Sequence[float]) -> dict:
    """Configuration fields of nnU-Net's default preprocessing and export at the target ``spacing`` (mm, one per
    patch axis): z-score normalisation of one channel and the resampling functions and arguments nnU-Net's
    experiment planner writes (what the predictor's preprocessing and
    ``convert_predicted_logits_to_segmentation_with_correct_shape`` read)."""
    resample, z = "resample_data_or_seg_to_shape", {"order_z": 0, "force_separate_z": None}
    return {
        "preprocessor_name": "DefaultPreprocessor",
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": resample,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **z},
        "resampling_fn_seg": resample,
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **z},
        "resampling_fn_probabilities": resample,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **z},
    }


def plans_for_patch(
    patch_size: Sequence[int],
    configuration: str | None = None,
    dataset_name: str = "Dataset999_Synthetic",
    **fields: Any,
) -> dict:
    """A plans dict whose one configuration (``configuration``, default :func:`configuration_name`) has
    ``patch_size``: what nnU-Net's ``PlansManager`` and trainer constructor and our patch rule read.

    ``fields`` add to or override the configuration's fields (``batch_size``, ``data_identifier``,
    ``architecture``, ``nnunet_sam``, :func:`nnunet_preprocessing` for a predictor's preprocessing and export,
    ...). The default architecture names no network: give one (as the benchmark's U-Net does) where nnU-Net's own
    ``build_network_architecture`` is called; SAM trainers build theirs from the record.
    """
    settings = {
        "patch_size": [int(s) for s in patch_size],
        "data_identifier": "synthetic",
        "batch_size": 2,
        "architecture": {"network_class_name": "none", "arch_kwargs": {}, "_kw_requires_import": []},
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [64, 256, 256],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {configuration or configuration_name(patch_size): settings | fields},
    }
