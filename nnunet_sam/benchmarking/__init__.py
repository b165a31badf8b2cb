"""What the SAM trainers cost next to nnU-Net's default U-Net, on any machine (``nnunet_sam_benchmark``).

Modules: ``configs`` (what is measured, built through the trainers' own builders; the preset table),
``counting`` (parameters, FLOPs), ``timing`` (measured on this CPU), ``gpu`` (measured on a CUDA device), ``report``;
``prediction`` (``nnunet_sam_benchmark_prediction``: where the time of a sliding-window prediction goes on a CPU).
The estimated peak training memory comes from ``nnunet_sam.training.memory_estimate``, where the trainers take it
from to decide checkpointing and autocast.

Figures and how each is obtained:

* **Parameters**: total / trainable / frozen; trainable = ``requires_grad``, exactly what
  ``SAMTrainer.configure_optimizers`` gives the optimiser when a pretrained SAM checkpoint is used (SAM frozen).
* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``) on networks built on the ``meta`` device with meta
  inputs: nothing is computed, full-size ViTs are counted in seconds. A training step is forward (train mode) +
  loss + backward; on meta tensors the loss is a surrogate (the mean of every output the real loss reads), because
  the real set loss needs Hungarian matching on real values; its own FLOPs are negligible and the backward graph
  through the network is the same. Inference is one eval-mode forward under ``no_grad``. Per sample (batch 1).
* **Frozen-backbone floor**: forward+backward / forward of the network's encoder path (stem, SAM image encoder,
  adapters) with every weight frozen and only the input needing a gradient; full fine-tuning is about 3. The
  all-frozen ratio of the whole network is reported too: the real step minus it is the weight-gradient work of the
  trainable parameters.
* **Presets** (``--presets``, nnunet_sam.benchmarking.configs.PRESETS: every method's plain trainer and the papers'
  largest settings): parameters, FLOPs of a training step and an inference forward, and estimated peak training
  memory at the preset's batch size with segment-anything's attention and ours, with and without block
  checkpointing and 16-bit autocast, against the issue's targets.
* **Attention on this CPU** (``--attention-sizes``): SAM ViT-B's encoder forward + backward on one slice with
  segment-anything's attention and with ours, each in a fresh process of the same run (time, added peak memory).
* **GPU mode** (``--device cuda``, nnunet_sam.benchmarking.gpu): real step time and
  ``torch.cuda.max_memory_allocated`` per preset and for nnU-Net's ResEnc U-Net at the same patch, and one short
  real ``nnUNetv2_train`` of a preset on phantom data; each part within a time budget (about 8 minutes in all).
* **Training step of a preset**: the trainer's own ``forward_batch`` hook (run on a stand-in trainer,
  ``nnunet_sam.training.memory_estimate.stand_in_trainer``) for each of its training phases (stages), with the
  parameters its ``configure_optimizers`` trains; memory and FLOPs of the costliest phase.
* **Peak training memory** = fp32 parameters + fp32 gradients and optimiser state of the trainable parameters +
  activations. Activations = bytes of the tensors saved for backward at the end of the forward pass, summed
  through ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage (parameters excluded), on fake
  CPU tensors (the meta device would run attention's math path); "autocast" = 16-bit autocast (nnU-Net's fp16 on
  CUDA, or bf16: same bytes), traced as bf16 autocast (CPU autocast rules stand in for CUDA's). Activation
  checkpointing of the encoder blocks is estimated from the same trace: tensors saved outside the encoder blocks +
  the input of every block (kept for the recomputation) + the largest single block (recomputed in backward).
  Not included: the CUDA context and allocator fragmentation (about 0.5-1 GiB) and transient backward buffers.
* **CPU wall time** per training step (forward + real loss + backward + optimiser step) and per inference patch:
  median of ``--runs`` after ``--warmup`` runs, for the backbones that run here, with nnU-Net's U-Net at the same
  patch measured in the same run.
* **Inference against volume size**: nnU-Net's own sliding-window predictor (``nnUNetPredictor``, tile step 0.5,
  Gaussian weighting, no mirroring) on volumes of 1x, 2x, 4x voxels with the tiny backbone.
"""
