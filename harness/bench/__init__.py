"""``python -m harness bench [--json] [--quick] [--out FILE] [--threads N] [--sections ...]``: speed.

One module per benchmark (``train_throughput``, ``decode_cache``, ``pruned_decode``,
``jacobi_training``, ``threads``, ``gpu``); ``common`` holds the configuration, targets, timing and
machine info, ``run`` the whole run and its tables. Methods take part by the roles they declare
(``LanguageModel.bench_roles``).

The measurements, each with the target the project set for it (``targets`` in the JSON says met or
missed, with the number):

1. ``train_throughput`` -- training-step throughput (forward + backward, tokens/s) of our backbone
   (``vanilla`` with ``ponder_init`` off) against ``transformers.LlamaForCausalLM`` with the same
   config, weights and dtype (float32), at every rung of the CPU ladder. Both get the same batch of
   real text and the same loss function (``models.base.next_token_loss``) on their logits, so the
   comparison is of the models. The largest logit difference is recorded (the two must compute the
   same function). Target: ours / theirs >= 1.0.
2. ``decode_cache`` -- greedy generation of 512 tokens with the KV cache against recomputing the
   whole prefix for every new token (vanilla). The recomputing baseline runs the blocks over the
   prefix and the LM head on the last position only (computing logits nobody reads would flatter the
   cache). Both must generate the same tokens (``tokens_agree``). Where torch.compile can build code
   (a C++ compiler on CPU), the compiled one-slot step (``Decoder.compile_slot_steps``) is a third
   contender (``compiled_*``; its first call, which compiles, is timed apart as ``compile_seconds``)
   and must generate the eager tokens. Target: >= 10x at 512 tokens, per batch size, on the faster
   cached path (``best_speedup``).
3. ``pruned_decode`` -- every method with the ``pruned_decoding`` role (PonderLM-3) decoding with hard
   pruning against its declared ``fixed_twin`` (PonderLM-2) at the same K and the same backbone
   weights, through the deployed scoring path (``model.score``). ``force_steps(prune_kept_steps)``
   makes every token keep that many latent steps, so a known fraction ``(K - kept) / K`` is pruned
   (measured: ``pruned_fraction``). The FLOPs of both come from the compute ledger. Target: wall-clock
   saving >= 80% of the FLOPs saving.
4. ``jacobi_training`` -- training-step time of every method with the ``jacobi_training`` role
   (PonderLM-2 and PonderLM-3 at each K of ``jacobi_latent_steps``, their default Jacobi passes) against
   vanilla at the reference study's rung and batch (pico, 16 x 128), next to the analytic
   training-FLOPs ratio (``train_flops_per_token``, mean J). Each J the config samples is timed and the
   times averaged, which is the expected step time under the uniform draw. The ledger's count of one
   step per J is recorded beside the analytic one. Target: time ratio within 1.15x of the FLOPs ratio.
   Where the time goes (``time_shares``): three steps per model under torch.profiler, their operators' time
   split into matmuls, attention kernels and the rest, the FLOP/s the matmuls and the attention reached
   (ledger FLOPs over their time), ``attention_efficiency`` (attention FLOP/s over matmul FLOP/s in the
   same steps), and ``utilization_ceiling``, the fraction of the peak the step would reach with its
   matmuls at the peak, its attention at that efficiency and everything else free: when the ceiling is
   under a target, no amount of overhead removal meets it; only a faster attention kernel can.
   With ``jacobi_compiled`` (the full profile, where torch.compile can build code) every model is also
   timed at its last J with ``Decoder.compile_training_blocks`` on (``train --compile``), in the same
   rounds: ``compiled_speedup`` (eager over compiled, round by round) and ``compiled_fraction_of_peak``;
   informational (the studies train eagerly), and its FLOPs must equal the eager step's.
5. ``utilization`` -- achieved training FLOP/s (analytic training FLOPs per token x tokens/s) of every
   training measurement above, as a fraction of this machine's matmul peak (large float32 matmuls at
   the same thread count), timed in the same rounds as the steps. Target, at the rungs the reference study
   (``harness/studies/paper.toml``) trains each method at: vanilla >= 0.60, PonderLM-2/3 >= 0.55.
6. ``threads`` -- training throughput per job and in total of concurrent jobs (separate processes, as
   a sweep's workers) at each thread count per job (``threads_configs``), and the thread count per job
   that maximises the total for each number of concurrent jobs (``recommended_threads_per_job``).
7. ``gpu`` -- only with CUDA: bf16 training tokens/s and MFU against the device's measured bf16 matmul
   peak for vanilla and PonderLM-3 at 70m and 160m, and the SDPA kernel every attention call takes.

Timing: every contender is warmed up, then the contenders of one comparison are run in turn
(A, B, A, B, ...) for ``repeats`` rounds, so that a change of machine load during the run hits all of
them alike. Ratios are formed round by round (A's time over B's *in the same round*) and utilisation
against the matmul peak timed *in the same round* (a contender of sections 1 and 4); the report gives
each one's median, its range over the rounds (``_low``, ``_high``, ``_rounds``) and, per target,
``decided``: whether every round alone gives the median's verdict. Why: on the 2-core VMs this
project runs on, the speed of one and the same step drifts by 20-60% within minutes (the matmul
peak read 77 GFLOP/s in one session and 125 in the next; vanilla pico's step 0.106 s in one section
of a run and 0.182 s in another). A peak measured once at the start, or medians compared across
sections, carried that drift into the verdicts. The per-round peak removes drift that hits the peak
and the steps alike, not all of it: a 2048-square matmul streams 48 MB through the shared caches while
the CPU-sized steps stay in their own, and in one run the peak read 74 GFLOP/s in section 1's rounds and
130 in section 4's while vanilla pico's step ran at 30 and 33 GFLOP/s. Utilisations are therefore given
with their range, and the ceiling of section 4b does not use the peak. Load averages before and after
are recorded.

Threads: one by default. The CPU-sized models are dispatch-bound (many small kernels), where one
thread is as fast as two, and on a machine shared with other work a second OpenMP thread that gets
descheduled stalls every parallel kernel (measured: several times slower and far noisier).
``--threads 0`` keeps torch's default.
"""

from harness.bench.common import (
                                  SCHEMA_VERSION,
                                  SECTIONS,
                                  BenchConfig,
                                  PerRound,
                                  Timing,
                                  measure_matmul_peak,
                                  methods_with_role,
                                  op_kind,
                                  per_round,
                                  time_interleaved,
)
from harness.bench.decode_cache import bench_decode_cache, generate_cached, generate_recomputing
from harness.bench.gpu import bench_gpu
from harness.bench.jacobi_training import bench_jacobi_training
from harness.bench.pruned_decode import bench_pruned_decode
from harness.bench.run import benchmark, format_report, target_rows, utilization_rows
from harness.bench.threads import bench_threads
from harness.bench.train_throughput import bench_train_throughput, to_transformers_llama

__all__ = ["SCHEMA_VERSION", "SECTIONS", "BenchConfig", "PerRound", "Timing", "bench_decode_cache", "bench_gpu",
           "bench_jacobi_training", "bench_pruned_decode", "bench_threads", "bench_train_throughput", "benchmark",
           "format_report", "generate_cached", "generate_recomputing", "measure_matmul_peak", "methods_with_role",
           "op_kind", "per_round", "target_rows", "time_interleaved", "to_transformers_llama", "utilization_rows"]
