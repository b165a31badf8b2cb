"""Test helpers (``sam_testing``, ``serving_testing``, ``conversion_testing``) live in this folder; the tests are
in subfolders mirroring the package (unit, integration, e2e)."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
