"""Interactive segmentation over nnInteractive's remote protocol (the ``nninteractive-client`` package's HTTP API).

* :mod:`~nnunet_sam.serving.inputs`: checks of what a client sends (images, points, boxes, masks) in its grid;
* :mod:`~nnunet_sam.serving.editors`: how each interaction maps onto RadSAM and the prompted 3DSAM-adapter;
* :mod:`~nnunet_sam.serving.sessions`: one client's image, target buffer and undo log; leases and their expiry;
* :mod:`~nnunet_sam.serving.app`: the HTTP endpoints (FastAPI).

The command-line face is ``nnunet_sam_serve`` (:mod:`nnunet_sam.cli.serve`).
"""
