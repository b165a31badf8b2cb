"""Prediction around nnU-Net's predictor: checked prediction of folders (``predict``), mode-bound networks
(``bound_forward``), prompted prediction (``prompted``), RadSAM's 3D propagation (``radsam``) and the mapping
between world, voxel and preprocessed coordinates (``geometry``)."""
