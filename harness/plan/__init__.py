"""Budget planning: the jobs a sweep at a training-FLOPs budget runs, and what they need.

``python -m harness plan --budget FLOPS [--methods a,b] [--sizes s1,s2] [--match train-flops|tokens]
[--seeds N] [--rungs N] [--gpu h100] [--devices-per-job N [--parallel ddp|fsdp]] [--json] [--set k=v ...]
[--vary METHOD:FIELD=v1,v2]``

Decisions (each is printed with the plan):

* **Counting.** Parameters and training FLOPs per token come from the method itself: its config is
  built for the rung and the model constructed on the ``meta`` device (no memory, milliseconds even
  for 2.8b), then ``model.train_flops_per_token(seq_len)`` and ``num_params()`` are read.
* **Scale.** Two settings of the shared ladder (``harness/core/config.py``; the scales are in
  :mod:`harness.plan.ladder`): the CPU rungs (pico..tiny) train with ``TrainConfig``'s defaults
  (``harness/job.py``: sequences of 128 tokens, 16 per step, BPE vocabulary 8192); the Pythia rungs
  (70m..2.8b) on one GPU per job with sequences of 2048 tokens, 1024 per step as Pythia (2M tokens),
  taken as 128 micro-batches of 8 (``train.grad_accum``), Pythia's learning rate for the rung, a
  50,304-token vocabulary (Pythia's padded size) and the official PonderLM-2 recipe: RMSNorm eps 0.1,
  AdamW (0.9, 0.95), 2% warm-up, cosine to 10%, and each method's reference weight decay
  (``LanguageModel.reference_weight_decay``; sources in :mod:`harness.plan.ladder`). The plan prints
  these per method and rung. A sweep uses one scale: the one holding vanilla's Chinchilla-closest rung
  at this budget (below).
* **Sizes (an IsoFLOP ladder per method).** Unless ``--sizes`` is given, each method gets the
  ``--rungs`` (default 3) rungs of that scale whose Chinchilla-optimal tokens (20 x total parameters,
  Hoffmann et al. 2022 count embeddings) are closest, in log ratio, to the tokens the budget buys the
  method at that rung. A method that costs more per token therefore lands on smaller rungs. Rungs a
  method cannot be built at (a config error, e.g. MoR's (L-2)/R not whole) are skipped, one line each
  naming the method, the rung and the reason; the other jobs stand.
* **Matching.** ``--match train-flops`` (default): every job trains with the budget's FLOPs, so a
  method that costs more per token sees fewer tokens. ``--match tokens`` (the papers' protocol): every
  method trains on the tokens the budget buys vanilla at the same rung (and on vanilla's rungs); its
  training FLOPs are then larger, and methods are compared at measured inference FLOPs. The mode is
  recorded in every job's ``tags``.
* **Rounding.** The trainer takes ``round(budget / (FLOPs per token x tokens per step))`` steps; the
  plan reports that rounded figure (tokens = steps x batch x seq_len). Rounding is within 0.5/steps of
  the budget, so a job with fewer than 25 steps gets a smaller batch (unless ``train.batch_size`` is
  set explicitly) so that it has 25 and its training FLOPs land within 2% of the budget.
* **Estimates.** Hours = planned training FLOPs / the FLOP/s one job is assumed to reach: measured
  here (a few training steps of vanilla at the smallest CPU rung, or a matmul probe on a GPU times an
  assumed utilisation), or, with ``--gpu NAME``, the GPU's peak dense bf16 FLOP/s times an assumed MFU.
  Evaluation time is not included. Wall time spreads the jobs over the workers (longest first). Memory
  is a rough per-job estimate: 16 bytes per parameter (fp32 weights, gradients, AdamW moments), Korthikanti
  et al.'s 34 bytes x seq x batch x d_model x layers of bf16 activations (flash attention) scaled by the
  method's training FLOPs over vanilla's, and the logits. With ``--devices-per-job N`` hours are wall
  hours on N devices and memory is per device (:mod:`harness.plan.hardware`); on a GPU a job that does
  not fit one device gets a note with the devices it needs, and one note the ``--devices-per-job N
  --parallel X`` on which every job fits.
* **Overrides.** ``--set KEY=VALUE`` applies to every job (``train.X``, ``data.X`` or a model field);
  ``--set METHOD:KEY=VALUE`` to one method only; ``--vary METHOD:FIELD=v1,v2`` adds one job per value
  (e.g. PonderLM-3's compute penalty, whose sweep traces its Pareto curve), tagged ``variant``.
"""

from harness.plan import study
from harness.plan.hardware import CONFIRM_HOURS, GPU_TABLE, Hardware, detect_hardware
from harness.plan.ladder import SCALES, Counts, Scale, count, scale_of
from harness.plan.planning import MATCH_MODES, Arm, Plan, PlannedJob, PlanRequest, format_plan, make_plan

__all__ = ["CONFIRM_HOURS", "GPU_TABLE", "MATCH_MODES", "SCALES", "Arm", "Counts", "Hardware", "Plan", "PlanRequest",
           "PlannedJob", "Scale", "count", "detect_hardware", "format_plan", "make_plan", "scale_of", "study"]
