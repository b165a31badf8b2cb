"""The SLURM recipe for training on several nodes, shipped with the package.

``python -m nnunet_sam.training.slurm`` prints the script's path, so that a pip-installed package can be used as
``sbatch "$(python -m nnunet_sam.training.slurm)" DATASET 3d_fullres 0 -tr MaskSAMTrainer``.
"""

from pathlib import Path

SLURM_SCRIPT: Path = Path(__file__).with_name("train_multinode.sbatch")
