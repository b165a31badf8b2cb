"""``nnunet_sam_train``: ``nnUNetv2_train`` as one process of a torchrun job, on any number of nodes.

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB \\
        -m nnunet_sam.cli.train DATASET 3d_fullres 0 -tr MaskSAMTrainer

The arguments are ``nnUNetv2_train``'s, parsed by nnU-Net itself; each process first joins torchrun's process
group (:mod:`nnunet_sam.training.distributed`), so nnU-Net's trainer sees a DDP run, as under ``-num_gpus``. Without
torchrun the command is ``nnUNetv2_train``. Exit codes: 2 for settings the job cannot use (before any training
step), 1 when a rank failed or was lost.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunetv2.run.run_training import run_training_entry

from nnunet_sam.cli import conventions
from nnunet_sam.training.distributed import DistributedSetupError, RankInfo, run_as_rank

COMMAND = "nnunet_sam_train"


def _launch_options(argv: Sequence[str]) -> argparse.Namespace:
    """The two ``nnUNetv2_train`` options that decide how processes start (nnU-Net parses them all later)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-num_gpus", type=int, default=1)
    parser.add_argument("-device", default="cuda")
    return parser.parse_known_args(argv)[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]  # nnU-Net's parser reads sys.argv
    try:
        info = RankInfo.from_environ()
    except DistributedSetupError as error:
        return conventions.error(COMMAND, error)
    if info is None:
        run_training_entry()
        return 0
    options = _launch_options(argv)
    if options.num_gpus != 1:
        return conventions.error(
            COMMAND,
            f"-num_gpus {options.num_gpus} starts processes of its own; under torchrun, choose the processes per "
            "node with torchrun's --nproc-per-node instead",
        )
    return run_as_rank(run_training_entry, info, options.device)


if __name__ == "__main__":
    sys.exit(main())
