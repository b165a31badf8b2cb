"""Print the path of the shipped SLURM script (see the package docstring)."""

from nnunet_sam.training.slurm import SLURM_SCRIPT

if __name__ == "__main__":
    print(SLURM_SCRIPT)
