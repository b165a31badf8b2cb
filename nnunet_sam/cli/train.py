"""``nnunet_sam_train``: ``nnUNetv2_train`` as one process of a torchrun job, on any number of nodes.

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB \\
        -m nnunet_sam.cli.train DATASET 3d_fullres 0 -tr MaskSAMTrainer

The arguments are ``nnUNetv2_train``'s, parsed by nnU-Net itself; each process first joins torchrun's process
group (:mod:`nnunet_sam.training.distributed`), so nnU-Net's trainer sees a DDP run, as under ``-num_gpus``. Without
torchrun the command is ``nnUNetv2_train``.

Own option (taken out before nnU-Net parses the rest): ``--batch-per-process B`` makes the global batch B x the
number of processes instead of the plans' batch (the learning rate stays the trainer's, as for ``-num_gpus``).

Under ``torchrun --max-restarts N`` a restarted group (``TORCHELASTIC_RESTART_COUNT`` > 0) continues from the last
checkpoint by itself (``--c`` is added; nnU-Net starts afresh when there is none yet).

Each process's exit code: 0 done; 2 settings the job cannot use (before any training step); 1 a rank failed or was
lost; 128 + N after signal N (SIGTERM 143, SIGUSR1 138). torchrun itself exits 0 or 1 and names each process's
code in its failure summary (``exitcode: 2``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence

from nnunetv2.run.run_training import run_training_entry

from nnunet_sam.cli import conventions
from nnunet_sam.training.distributed import (
    BATCH_PER_PROCESS_ENV,
    DistributedSetupError,
    RankInfo,
    group_restarted,
    run_as_rank,
)

COMMAND = "nnunet_sam_train"


def _launch_options(argv: Sequence[str]) -> argparse.Namespace:
    """The two ``nnUNetv2_train`` options that decide how processes start (nnU-Net parses them all later)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-num_gpus", type=int, default=1)
    parser.add_argument("-device", default="cuda")
    parser.add_argument("--c", action="store_true")
    return parser.parse_known_args(argv)[0]


def _own_parser() -> argparse.ArgumentParser:
    """This command's own options (nnU-Net's parser reads the rest)."""
    parser = argparse.ArgumentParser(prog=COMMAND, add_help=False)
    group = parser.add_argument_group(
        f"{COMMAND}'s own options",
        "One process of a torchrun job on any number of nodes; without torchrun the command "
        "is nnUNetv2_train. A restarted torchrun group continues from the last checkpoint by itself.",
    )
    group.add_argument(
        "--batch-per-process",
        type=int,
        default=None,
        metavar="B",
        help="under torchrun: a global batch of B x the number of processes instead of the plans' batch (the "
        "learning rate stays the trainer's)",
    )
    return parser


def _own_options(argv: list[str]) -> tuple[int | None, list[str]]:
    """``--batch-per-process B`` and the arguments left for nnU-Net."""
    parser = _own_parser()
    own, rest = parser.parse_known_args(argv)
    if own.batch_per_process is not None and own.batch_per_process < 1:
        parser.error(f"--batch-per-process {own.batch_per_process}: expected a whole number >= 1")
    return own.batch_per_process, rest


def _help() -> str:
    """nnU-Net's help of ``nnUNetv2_train`` (its own parser, which prints it) followed by this command's options."""
    nnunet_help, argv = io.StringIO(), sys.argv
    sys.argv = [COMMAND, "-h"]
    try:
        with contextlib.redirect_stdout(nnunet_help), contextlib.suppress(SystemExit):
            run_training_entry()
    finally:
        sys.argv = argv
    own = _own_parser().format_help().split("\n\n", 1)[1]  # without its usage line
    usage = nnunet_help.getvalue().replace("[-h]", "[-h] [--batch-per-process B]", 1)
    return f"{usage.rstrip()}\n\n{own}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(_help(), end="")
        raise SystemExit(0)  # as argparse's help
    per_process, argv = _own_options(argv)
    try:
        info = RankInfo.from_environ()
    except DistributedSetupError as error:
        return conventions.error(COMMAND, error)
    if per_process is not None:
        if info is None:
            return conventions.error(
                COMMAND, "--batch-per-process applies under torchrun only; set the batch in the plans"
            )
        os.environ[BATCH_PER_PROCESS_ENV] = str(per_process)  # read by the trainer (nnunet_sam.training.distributed)
    options = _launch_options(argv)
    sys.argv = [sys.argv[0], *argv]  # nnU-Net's parser reads sys.argv
    if info is None:
        run_training_entry()
        return 0
    if options.num_gpus != 1:
        return conventions.error(
            COMMAND,
            f"-num_gpus {options.num_gpus} starts processes of its own; under torchrun, choose the processes per "
            "node with torchrun's --nproc-per-node instead",
        )
    return run_as_rank(lambda: _train(options.c), info, options.device)


def _train(continuing: bool) -> None:
    """nnU-Net's training; with ``--c`` added when torchrun restarted the group (on every rank alike)."""
    if not continuing and group_restarted():
        sys.argv.append("--c")  # continue from the last checkpoint (nnU-Net starts afresh when there is none)
    run_training_entry()


if __name__ == "__main__":
    sys.exit(main())
