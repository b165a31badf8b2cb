"""Fault tolerance of the SAM trainers in nnU-Net's hooks: one training per fold, checked checkpoints, checked
training data (a case file cut short is named, before training and from a data-augmentation worker), skipped
non-finite steps.

The mechanisms are in :mod:`nnunet_sam.training.fault_tolerance` (fold lock, atomic writes, damaged-checkpoint
checks); this mixin puts them into nnU-Net's training start and end and its checkpoint loading. The atomic
checkpoint write and the skip of a non-finite step are part of :class:`~nnunet_sam.trainers.base.SAMTrainer`'s
``save_checkpoint`` and ``train_step``, which call :meth:`FaultTolerance.on_nonfinite_step`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from nnunet_sam.exit_codes import FAILED, UNUSABLE, error
from nnunet_sam.safe_checkpoints import safe_checkpoint_loading
from nnunet_sam.training.dataset_checks import (
    CheckedDataset,
    TrainingDataError,
    case_file_problems,
    check_training_data,
)
from nnunet_sam.training.fault_tolerance import (
    DamagedCheckpointError,
    FolderBusyError,
    NonFiniteTrainingError,
    checkpoint_problem,
    intact_checkpoint,
    lock_folder,
    remove_stale_temp_files,
    workers_die_with_parent,
)


class FaultTolerance:
    """Mixin of :class:`~nnunet_sam.trainers.base.SAMTrainer` (which sets ``_fold_lock``, ``_continue_training``,
    ``_nonfinite_steps_in_a_row``, ``_checked_datasets`` and ``_training_started`` at construction)."""

    # Training stops (NonFiniteTrainingError) after this many steps in a row with a non-finite loss or gradient.
    max_consecutive_nonfinite_steps: int = 50

    def on_train_start(self) -> None:
        if self.local_rank == 0:  # before anything is written: a second training of this fold stops here
            try:
                self._fold_lock = lock_folder(self.output_folder)
            except FolderBusyError as busy:  # a refusal, not a crash: the convention's message and exit code 2
                self._refuse(str(busy))
        workers_die_with_parent()  # the augmentation workers nnU-Net starts next end with this process, even on SIGKILL
        super().on_train_start()
        self._training_started = True
        if self.local_rank == 0:
            for path in remove_stale_temp_files(self.output_folder):
                self.print_to_log_file(f"Removed {path.name}, a partial checkpoint left by a killed process")
            best = os.path.join(self.output_folder, "checkpoint_best.pth")
            if self._best_ema is not None and not os.path.isfile(best):  # killed while the first best was saved
                self.print_to_log_file("checkpoint_best.pth is missing after the resume: writing it from this state")
                self.current_epoch -= 1  # the loaded state is the end of the previous epoch, as nnU-Net saves it
                try:
                    self.save_checkpoint(best)
                finally:
                    self.current_epoch += 1

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets of this fold (built when training starts): every case's files readable, labels as
        dataset.json declares them (nnunet_sam.training.dataset_checks); a case that fails to load later is named."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        fix = self._preprocess_again()
        case_file_problems((dataset_tr, dataset_val), fix)
        for warning in check_training_data(dataset_tr, dataset_val, self.dataset_json["labels"]):
            self.print_to_log_file(f"WARNING: {warning}")
        self._checked_datasets = (CheckedDataset(dataset_tr, fix), CheckedDataset(dataset_val, fix))
        return self._checked_datasets

    def _preprocess_again(self) -> str:
        """How to write this configuration's preprocessed data again (nnUNetv2_preprocess rewrites the folder)."""
        name = self.plans_manager.dataset_name  # DatasetXXX_Name; nnUNetv2_preprocess -d takes the number
        number = name.removeprefix("Dataset").split("_")[0]
        dataset_id = int(number) if number.isdigit() else name
        plans = self.plans_manager.plans_name
        command = f"nnUNetv2_preprocess -d {dataset_id} -c {self.configuration_name}"
        command += "" if plans == "nnUNetPlans" else f" -plans_name {plans}"
        return f"Preprocess the data again ({command} rewrites {self.preprocessed_dataset_folder}), then train again"

    def run_training(self) -> None:
        """nnU-Net's training; unusable training data end it with ``nnUNetv2_train: error: MESSAGE`` (exit code 2
        before the first step, 1 after it) instead of a traceback, also when a data-augmentation worker died of a
        case it could not read (nnU-Net would say only that its background workers are no longer alive)."""
        try:
            super().run_training()
        except TrainingDataError as error:
            self._refuse(str(error))
        except RuntimeError as error:
            if "background workers are no longer alive" not in str(error):
                raise
            failures = [m for d in self._checked_datasets if (m := d.reported_failure()) is not None]
            if not failures:
                try:  # a worker killed by a signal reports nothing: look at the files
                    case_file_problems(self._checked_datasets, self._preprocess_again())
                except TrainingDataError as problem:
                    failures = [str(problem)]
            if not failures:
                raise
            self._refuse(f"a data-augmentation worker stopped: {failures[0]}")

    def _refuse(self, message: str) -> None:
        """End the training with ``nnUNetv2_train: error: MESSAGE`` (also in the log): exit code 2 if no step ran."""
        if self._training_started:
            message += "; after the fix, continue this training from its last checkpoint with nnUNetv2_train ... --c"
        self.print_to_log_file(f"ERROR: {message}")
        raise SystemExit(error("nnUNetv2_train", message, FAILED if self._training_started else UNUSABLE)) from None

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._fold_lock is not None:
            self._fold_lock.close()  # releases the lock
            self._fold_lock = None

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):  # a damaged file: name it; --c falls back to an intact one
            if self._continue_training:
                path, note = intact_checkpoint(filename_or_checkpoint)
                if note is not None:
                    self.print_to_log_file(f"WARNING: {note}", also_print_to_console=True)
                filename_or_checkpoint = str(path)
            elif (problem := checkpoint_problem(filename_or_checkpoint)) is not None:
                raise DamagedCheckpointError(f"{filename_or_checkpoint} is {problem}")
        with safe_checkpoint_loading():  # weights_only: a crafted checkpoint cannot run code (UnsafeCheckpointError)
            super().load_checkpoint(filename_or_checkpoint)
        # nnU-Net saves checkpoint_latest before it updates _best_ema for that epoch, so after --c a later, worse
        # EMA could overwrite checkpoint_best. The best EMA so far is the maximum of the logged EMAs.
        emas = [e for e in self.logger.get_value("ema_fg_dice", step=None) if np.isfinite(e)]
        if emas:
            self._best_ema = max(emas)

    def on_nonfinite_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Log a skipped step; raise :class:`NonFiniteTrainingError` after ``max_consecutive_nonfinite_steps``."""
        self._nonfinite_steps_in_a_row += 1
        count, limit = self._nonfinite_steps_in_a_row, self.max_consecutive_nonfinite_steps
        self.print_to_log_file(
            f"Epoch {self.current_epoch}: non-finite training step (loss {loss.item():.4g}, gradient norm "
            f"{grad_norm.item():.4g}) skipped, no weight changed ({count} in a row, stop at {limit})"
        )
        if count < limit:
            return
        names = ("checkpoint_latest.pth", "checkpoint_best.pth")
        saved = [n for n in names if os.path.isfile(os.path.join(self.output_folder, n))]
        message = (
            f"Training stopped: {count} training steps in a row had a non-finite loss or gradient "
            f"(max_consecutive_nonfinite_steps = {limit}). None of them changed a weight, so every checkpoint "
            f"holds finite weights; last checkpoints: {', '.join(saved) or 'none written yet'} in "
            f"{self.output_folder}. Usual causes: a learning rate too high for this model, NaN or infinite values "
            "in the training data, or float16 overflow. Fix the cause, then continue with --c."
        )
        self.print_to_log_file(message)
        raise NonFiniteTrainingError(message)
