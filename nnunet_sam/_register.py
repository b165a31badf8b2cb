"""Zero-configuration trainer discovery for nnU-Net v2.

nnU-Net v2 (2.8+) looks up ``-tr NAME`` in its own package first, then in every folder listed in the
environment variable ``nnUNet_extTrainer`` (``os.pathsep`` separated, read from ``os.environ`` at lookup
time). This module appends our shim folder (``nnunet_sam/trainer_shim``, which holds only a tiny module
re-exporting the trainer classes from ``nnunet_sam.trainers``) to that variable, after the user's own
entries.

It is imported at every interpreter start by the ``nnunet_sam_register.pth`` file in site-packages, so it
imports nothing but ``os`` and never raises. Set ``NNUNET_SAM_NO_REGISTER=1`` to switch it off.
"""

import os

ENV_VAR = "nnUNet_extTrainer"
DISABLE_VAR = "NNUNET_SAM_NO_REGISTER"
SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_shim")


def _same_path(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def register(environ=None) -> bool:
    """Append ``SHIM_DIR`` to ``environ[nnUNet_extTrainer]`` unless it is already listed.

    The user's own entries are kept verbatim and stay first. Returns True when the variable was changed.
    Never raises.
    """
    try:
        env = os.environ if environ is None else environ
        if env.get(DISABLE_VAR, "").strip() not in ("", "0"):
            return False
        current = env.get(ENV_VAR, "")
        if any(p.strip() and _same_path(p, SHIM_DIR) for p in current.split(os.pathsep)):
            return False
        if not os.path.isdir(SHIM_DIR):
            return False
        env[ENV_VAR] = current + os.pathsep + SHIM_DIR if current.strip() else SHIM_DIR
        return True
    except Exception:
        return False


register()
