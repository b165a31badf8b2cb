"""Exit codes and error lines of every ``nnunet_sam_*`` command, and of library code that ends a process.

* :data:`DONE` (0): everything done. :data:`UNUSABLE` (2, as ``argparse``): the arguments or input files cannot be
  used; nothing was done. :data:`FAILED` (1): the command ran but some cases (or a step) failed; what succeeded is
  written.
* Every error line reads ``COMMAND: error: MESSAGE`` on stderr, the format of ``argparse``'s own errors, so an
  unusable argument and an unusable file read the same. A list of failed cases follows one header line.

The command faces use these through :mod:`nnunet_sam.cli.conventions`; library code that stops a process with the
same convention (the torchrun launcher in :mod:`nnunet_sam.training.distributed`, the trainers' fold lock) imports
them from here, below the command layer.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

DONE = 0
FAILED = 1  # the command ran; some cases or a step failed
UNUSABLE = 2  # arguments or inputs unusable; nothing was done


def error(command: str, message: object, code: int = UNUSABLE) -> int:
    """Print ``COMMAND: error: MESSAGE`` to stderr; return ``code`` for ``main`` to return."""
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    return code


def failed_cases(command: str, failures: Mapping[str, str], what: str = "case(s)") -> int:
    """Report the cases that failed (one line each, after a header); return :data:`FAILED` (:data:`DONE` if none)."""
    if not failures:
        return DONE
    error(command, f"{len(failures)} {what} failed:", FAILED)
    for message in failures.values():
        print(f"  {message}", file=sys.stderr)
    return FAILED
