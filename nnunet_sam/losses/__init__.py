"""Losses: MaskSAM's matched set loss (``set_criterion``, with Hungarian ``matching`` over the segments of
``mask_classification``) and the dense segmentation losses of the other methods (``segmentation``). Import from the
submodules; this package imports nothing, so that the prompt generators can use ``mask_classification`` without
loading every loss."""
