"""Running code in a fresh interpreter with a clean environment, and finding trainers the way ``nnUNetv2_train -tr``
does (shared by the installation tests and the trainers' discovery tests)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PTH_NAME = "nnunet_sam_register.pth"
TRAINERS = [
    "MaskSAMTrainer",
    "MaskSAMTrainer_tiny",
    "SelfPromptSAMTrainer",
    "SelfPromptSAMTrainer_tiny",
    "SelfPromptSAMTrainer_S1",
]
TRAINER_MODULE = "nnunet_sam.trainers.masksam"
RESULT = "RESULT:"


def _clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in (
        "nnUNet_extTrainer",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "NNUNET_SAM_NO_REGISTER",
        "PYTHONNOUSERSITE",
    ):
        env.pop(var, None)
    env.update(extra)
    return env


def _run(code: str, cwd: Path, env: dict[str, str], python: str = sys.executable, timeout: int = 300):
    """Run ``code`` in a fresh interpreter; return the JSON printed after ``RESULT:``."""
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"no result line\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return json.loads(lines[-1][len(RESULT) :])


def _find_code(names=TRAINERS, extra: str = "") -> str:
    """Code that looks the trainers up the way ``nnUNetv2_train -tr NAME`` does and prints a result."""
    return f"""
import json, os, subprocess, sys
env_value = os.environ.get("nnUNet_extTrainer")
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnunet_sam._register as reg
found = {{}}
for name in {list(names)!r}:
    cls = recursive_find_trainer_class_by_name(name)
    found[name] = [cls.__module__, cls.__qualname__]
result = {{
    "env": env_value,
    "shim_dir": reg.SHIM_DIR,
    "found": found,
    "shim_left_in_sys_modules": "nnunet_sam_trainers" in sys.modules,
}}
{extra}
print({RESULT!r} + json.dumps(result))
"""


def _check_found(result: dict, names=TRAINERS) -> None:
    for name in names:
        module = TRAINER_MODULE if name.startswith("MaskSAM") else "nnunet_sam.trainers.self_prompt_sam"
        assert result["found"][name] == [module, name]
    assert result["env"].split(os.pathsep)[-1] == result["shim_dir"]
    assert result["env"].split(os.pathsep).count(result["shim_dir"]) == 1
    # only the shim module is dropped by nnU-Net; the trainer module itself stays importable
    assert not result["shim_left_in_sys_modules"]


# (a) ------------------------------------------------------------------------------------------------------
