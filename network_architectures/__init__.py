"""The SAM-based networks, one module per method, composed of the blocks in ``nnunet_sam``.

The contract every network here keeps (trainers, predictors and tools rely on it):

* **Construction from the model's record only.** The constructor's arguments are named after the fields of
  :class:`nnunet_sam.model_record.ModelRecord` (``backbone``, ``patch_size``, ``sam_input_size``, ``num_queries``,
  ``slice_group``, ``window``, ``options``) plus ``in_channels`` and ``num_classes``;
  :func:`nnunet_sam.model_record.build_from_record` passes exactly those. Method switches live in the method's
  frozen options dataclass (``MaskSAMOptions``, ``SelfPromptSAMOptions``, ``SAM3DAdapterOptions``, ``PanSAMOptions``,
  ``RadSAMOptions``), which is saved in the record.
* **``.sam``** is segment-anything's ``Sam`` (image encoder, prompt encoder, mask decoder) with the state-dict
  layout of the official checkpoints, so ``net.sam.load_state_dict(checkpoint, strict=True)`` loads them; its
  weights are frozen unless the trainer decides otherwise.
* **``forward(x, ...)``**: ``x`` is nnU-Net's patch (B, M, D, P, P) (or (B, M, P, P) for 2d). Called with ``x`` only
  (nnU-Net's predictor), it returns the per-class logits nnU-Net expects, (B, C, D, P, P). Modes are explicit
  keyword arguments with prediction as their default: ``return_all`` (the dict below), Self-Prompt-SAM's
  ``run_decoder``, PanSAM's ``output`` and ``reference_prompts``, 3DSAM-adapter's ``points``/``labels``, RadSAM's
  ``prompts``/``interaction``. No network reads a mode from an attribute set from outside; a trainer passes its
  modes in ``forward_batch`` (``nnunet_sam.trainers.base.SAMTrainer``), and tools that need nnU-Net's predictor
  with a mode wrap the network in :class:`nnunet_sam.inference.bound_forward.BoundForward`.
* **``return_all=True``** (the default in training mode) returns a dict holding at least ``"semantic"``, the
  per-class logits of the plain call, plus what the method's loss needs: MaskSAM ``pred_logits``, ``pred_masks``,
  ``aux_masks``, ``pred_boxes``; Self-Prompt-SAM and 3DSAM-adapter ``aux`` and ``logits`` (Self-Prompt-SAM also
  ``binary``); PanSAM ``logits`` (and ``points``, ``labels`` when prompts were used). RadSAM has no prompt-free
  output: it returns mask logits per prompt.
"""
