"""Losses: MaskSAM's matched set loss (``set_criterion``, with Hungarian ``matching`` over the segments of
``mask_classification``) and the dense segmentation losses of the other methods (``segmentation``). Import from the
submodules; this package imports nothing. Box and mask geometry (``boxes_from_masks``) lives below the losses and the
prompt code, in :mod:`nnunet_sam.mask_geometry`."""
