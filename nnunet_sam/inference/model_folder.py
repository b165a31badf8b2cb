"""Loading a trained model folder (``nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION``), in one place.

Every command that predicts from a model folder (checked prediction, prompted prediction, RadSAM, the PanSAM and
prompted evaluations, the server) loads it here: :func:`check_model_folder` refuses, before anything is loaded,
a folder that is not a model folder, a fold that was never trained and a missing or damaged checkpoint (naming the
intact ones); :func:`load_predictor` then builds nnU-Net's predictor from it (plans, ``dataset.json``, trainer's
``build_network_architecture``, the checkpoint weights), and :func:`require_network` refuses the model of another
method than the caller serves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_sam.safe_checkpoints import CheckpointReadError, safe_checkpoint_loading
from nnunet_sam.training.fault_tolerance import checkpoint_problem

MODEL_FILES = ("dataset.json", "plans.json")


class ModelFolderError(ValueError):
    """A model folder that cannot be used (not a model folder, untrained fold, damaged checkpoint, or the model of
    another method); command-line tools exit with 2 before any work. The message names the problem and the fix."""


class WrongMethodError(ModelFolderError):
    """A model folder of another method than the one asked for (e.g. a U-Net given to the RadSAM command)."""


def check_model_folder(
    model_folder: str, folds: Sequence[int | str] = (), checkpoint: str = "checkpoint_final.pth"
) -> None:
    """Raise :class:`ModelFolderError` unless ``model_folder`` holds ``dataset.json`` and ``plans.json`` and every
    fold of ``folds`` an intact ``checkpoint``; the message names the missing or damaged file and the folds and
    checkpoints that do exist (``-f``, ``-chk NAME``)."""
    for name in MODEL_FILES:
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise ModelFolderError(
                f"{model_folder} is not an nnU-Net model folder (no {name}); give the trained model's folder "
                "nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION"
            )
        read_model_json(model_folder, name)
    for fold in folds:
        folder = os.path.join(model_folder, f"fold_{fold}")
        if not os.path.isdir(folder):
            trained = sorted(n[5:] for n in os.listdir(model_folder) if n.startswith("fold_"))
            raise ModelFolderError(
                f"fold {fold} was never trained: no {folder}. Trained folds: {', '.join(trained) or 'none'} (-f)"
            )
        problem = checkpoint_problem(os.path.join(folder, checkpoint))
        if problem is not None:
            others = sorted(
                n for n in os.listdir(folder) if n.endswith(".pth") and n != checkpoint and not n.startswith(".")
            )
            intact = [n for n in others if checkpoint_problem(os.path.join(folder, n)) is None]
            raise ModelFolderError(
                f"{os.path.join(folder, checkpoint)} is {problem}. Intact checkpoints in {folder}: "
                f"{', '.join(intact) or 'none'} (choose one with -chk NAME)"
            )


def load_predictor(
    model_folder: str,
    folds: Sequence[int | str],
    checkpoint: str = "checkpoint_final.pth",
    device: str = "cpu",
    step_size: float = 0.5,
    mirroring: bool = True,
    predictor_class: type[nnUNetPredictor] = nnUNetPredictor,
) -> nnUNetPredictor:
    """nnU-Net's predictor (or ``predictor_class``, a subclass) for ``folds`` of a checked model folder, as
    ``nnUNetv2_predict`` builds it: the network of the saved plans with the first fold's weights loaded (the
    predictor swaps in the others per fold). :class:`ModelFolderError` before loading if the folder is unusable,
    and for a checkpoint that needs more than the types of an nnU-Net checkpoint (it could run code): nothing of it
    runs (:mod:`nnunet_sam.safe_checkpoints`)."""
    check_model_folder(model_folder, folds, checkpoint)
    predictor = predictor_class(
        tile_step_size=step_size, use_mirroring=mirroring, device=torch.device(device), allow_tqdm=False
    )
    plans, dataset_json = read_model_json(model_folder, "plans.json"), read_model_json(model_folder, "dataset.json")

    def matches_plans(loaded: dict) -> None:  # before nnU-Net builds the network from plans.json
        check_plans_match_checkpoint(model_folder, plans, dataset_json, loaded, checkpoint)

    try:
        with safe_checkpoint_loading(matches_plans):
            predictor.initialize_from_trained_model_folder(model_folder, list(folds), checkpoint)
    except CheckpointReadError as error:
        raise ModelFolderError(str(error)) from error
    return predictor


def read_model_json(model_folder: str, name: str) -> dict:
    """``dataset.json`` or ``plans.json`` of a model folder; :class:`ModelFolderError` naming the file if it cannot
    be read or is not a JSON object."""
    path = os.path.join(model_folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except OSError as error:
        raise ModelFolderError(f"{path} cannot be read ({error.strerror or error}); check its permissions") from None
    except (ValueError, RecursionError) as error:
        raise ModelFolderError(f"{path} is not valid JSON ({error}); restore the file written by training") from None
    if not isinstance(content, dict):
        raise ModelFolderError(f"{path} holds a {type(content).__name__}, not a JSON object; restore it")
    return content


# What shapes the network and its input; batch_size (training only) may differ
_PLANS_KEYS = ("foreground_intensity_properties_per_channel", "transpose_forward", "transpose_backward")


def check_plans_match_checkpoint(
    model_folder: str, plans: dict, dataset_json: dict, checkpoint: dict, name: str
) -> None:
    """:class:`ModelFolderError` if the folder's ``plans.json`` differs from the plans stored in the checkpoint
    (``init_args``) in its configuration (patch size, spacing, normalisation, architecture, the ``nnunet_sam``
    record...) or in what preprocessing reads, or its ``dataset.json`` in labels or channels: a hand-edited file
    would change the segmentation silently (or fail with a tensor size mismatch)."""
    missing = [
        k
        for k in ("network_weights", "trainer_name", "init_args")
        if not isinstance(checkpoint, dict) or k not in checkpoint
    ]
    if missing:
        raise ModelFolderError(
            f"{os.path.join(model_folder, 'fold_*', name)} is no nnU-Net checkpoint: it lacks "
            f"{', '.join(missing)}; use the checkpoint_final.pth (or another checkpoint) written by nnUNetv2_train"
        )
    init_args = checkpoint["init_args"]
    if not isinstance(init_args, dict) or not isinstance(init_args.get("plans"), dict):
        return  # not written by nnU-Net's trainer: nothing to compare with
    stored_plans, trained = _as_json(init_args["plans"]), _as_json(init_args.get("dataset_json"))
    for key in ("labels", "channel_names", "regions_class_order") if isinstance(trained, dict) else ():
        if dataset_json.get(key) != trained.get(key):
            raise ModelFolderError(
                f"{os.path.join(model_folder, 'dataset.json')} does not match the dataset.json {name} was trained "
                f"with: {key} {dataset_json.get(key)!r} here, {trained.get(key)!r} in the checkpoint. Restore the "
                "dataset.json written by the training"
            )
    stored, configuration = stored_plans, init_args.get("configuration")
    try:
        ours = PlansManager(plans).get_configuration(configuration).configuration
        theirs = PlansManager(stored).get_configuration(configuration).configuration
    except Exception:  # noqa: BLE001  (a configuration nnU-Net cannot resolve is reported by nnU-Net itself)
        return
    differing = [
        f"{key}: {ours.get(key)!r} in plans.json, {theirs.get(key)!r} in the checkpoint"
        for key in sorted(set(ours) | set(theirs), key=str)
        if key != "batch_size" and ours.get(key) != theirs.get(key)
    ]
    differing += [f"{key} differs" for key in _PLANS_KEYS if plans.get(key) != stored.get(key) and key in stored]
    if differing:
        raise ModelFolderError(
            f"{os.path.join(model_folder, 'plans.json')} does not match the plans {name} was trained with "
            f"(configuration {configuration}): {'; '.join(differing)[:1500]}. The network would predict with "
            "settings it was not trained for. Restore the plans.json written by the training"
        )


def require_network(
    predictor: nnUNetPredictor, model_folder: str, accepts: Callable[[nn.Module], bool], method: str, advice: str
) -> nn.Module:
    """The predictor's network (without ``torch.compile``'s wrapper) if ``accepts`` it, else
    :class:`WrongMethodError`: "``model_folder`` holds no ``method`` model (trainer ...); ``advice``"."""
    network = getattr(predictor.network, "_orig_mod", predictor.network)
    if not accepts(network):
        raise WrongMethodError(
            f"{model_folder} holds no {method} model (trainer {predictor.trainer_name}, network "
            f"{type(network).__name__}); {advice}"
        )
    return network


def _as_json(value):
    """``value`` as it reads back from a JSON file (tuples become lists), to compare with plans.json/dataset.json."""
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return value
