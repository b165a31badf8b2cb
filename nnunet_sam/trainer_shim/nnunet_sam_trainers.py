"""Shim module for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports every module of this folder as a top-level module and drops it from ``sys.modules``
afterwards, so classes *defined* here could not be pickled. This module therefore only re-exports the
trainers from the installed package, where their ``__module__`` (``nnunet_sam.trainers.*``) stays
importable under both ``fork`` and ``spawn``. Keep this folder free of other modules and of ``__init__.py``.

Every trainer class defined in a module of ``nnunet_sam.trainers`` is exported (a new trainer needs no entry here).
"""

import importlib as _importlib
import inspect as _inspect
import pkgutil as _pkgutil

import nnunet_sam.trainers as _package
from nnunet_sam.trainers.base import SAMTrainer as _SAMTrainer


def _trainers() -> dict[str, type]:
    found = {}
    for info in _pkgutil.iter_modules(_package.__path__):
        module = _importlib.import_module(f"{_package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if _inspect.isclass(obj) and issubclass(obj, _SAMTrainer) and obj.__module__ == module.__name__:
                found[name] = obj
    found.pop("SAMTrainer", None)  # the abstract base is not a trainer to run
    return found


_exported = _trainers()
globals().update(_exported)
__all__ = sorted(_exported)
