"""The CPU demo: synthetic phantom datasets (``phantoms``) and the end-to-end pipeline (``pipeline``)."""
