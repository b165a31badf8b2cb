"""Inference beyond nnU-Net's predictor: mode-bound networks, prompted prediction, geometry."""
