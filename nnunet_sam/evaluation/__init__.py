"""Evaluation: metrics (``metrics``), folder evaluation with the published protocols (``folders``), and the
evaluations of prompted models, PanSAM and RadSAM (``prompted``, ``pansam``, ``radsam``)."""
