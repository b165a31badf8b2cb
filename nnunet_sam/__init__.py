"""nnunet-sam: SAM-based trainers and building blocks for nnU-Net v2.

This module is imported at every interpreter start (through the ``nnunet_sam_register.pth`` start-up
hook, via ``nnunet_sam._register``), so it must stay light: no torch, no nnunetv2, no submodules.
"""

__version__ = "0.1.0"
