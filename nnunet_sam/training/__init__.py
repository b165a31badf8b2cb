"""What training needs around nnU-Net's trainer: the patch and resolution rules (``planning``), fault tolerance
(atomic checkpoints, fold lock, non-finite steps), dataset checks, slim checkpoints and multi-node setup."""
