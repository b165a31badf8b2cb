"""Command names of version 0.1 that do not follow the ``nnunet_sam_<verb>[_<method>]`` scheme.

Each still works for one release: it prints one deprecation line (to stderr) naming the new command, then runs it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# old name -> (new name, "module:function" of the new command)
RENAMED: dict[str, tuple[str, str]] = {
    "nnunet_sam_phantom": ("nnunet_sam_make_phantom", "nnunet_sam.cli.make_phantom:main"),
    "nnunet_sam_radsam": ("nnunet_sam_segment_radsam", "nnunet_sam.cli.segment_radsam:main"),
    "nnunet_sam_radsam_benchmark": ("nnunet_sam_benchmark_radsam", "nnunet_sam.cli.benchmark_radsam:main"),
    "nnunet_sam_prompted_eval": ("nnunet_sam_evaluate_prompted", "nnunet_sam.cli.evaluate_prompted:main"),
    "nnunet_sam_pansam_eval": ("nnunet_sam_evaluate_pansam", "nnunet_sam.cli.evaluate_pansam:main"),
    "nnunet_sam_submission": ("nnunet_sam_convert_submission", "nnunet_sam.dataset_conversion.submission:main"),
}


def _forward(old: str) -> Callable[[Sequence[str] | None], int | None]:
    new, target = RENAMED[old]

    def run(argv: Sequence[str] | None = None) -> int | None:
        message = f"{old} is deprecated and will be removed in the next release: use {new} (same arguments)."
        print(message, file=sys.stderr)
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        return main(argv) if argv is not None else main()

    run.__name__ = old
    return run


phantom = _forward("nnunet_sam_phantom")
radsam = _forward("nnunet_sam_radsam")
radsam_benchmark = _forward("nnunet_sam_radsam_benchmark")
prompted_eval = _forward("nnunet_sam_prompted_eval")
pansam_eval = _forward("nnunet_sam_pansam_eval")
submission = _forward("nnunet_sam_submission")
