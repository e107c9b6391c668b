#!/usr/bin/env bash
# GPU readiness in one call of a few minutes (on a machine with a CUDA build of torch and this package):
#   1. the test suite's CUDA-marked tests: SDPA runs a fused kernel (flash or memory-efficient) for every
#      method's attention, PonderLM-3's biased attention included, in training and deployed scoring, at the
#      pico and 70m shapes; DDP and FSDP on two GPUs against one when there are two;
#   2. a 70m vanilla and a 70m PonderLM-3 job, a few hundred bf16 steps each (python -m harness train);
#   3. their tokens/s and MFU against the device's dense bf16 peak (harness.plan.hardware.GPU_TABLE).
# With two or more GPUs it also trains the vanilla job on 2 GPUs (DDP) and reports its rate.
#
# Knobs (environment): OUT (default: a new temporary folder), SIZE (70m), SEQ (2048), BATCH (8, sequences per
# step), STEPS (200), PYTHON (python), PEAK_TFLOPS (override the table's peak), ALLOW_CPU=1 (run the same
# steps on a CPU, e.g. SIZE=pico SEQ=64 BATCH=4 STEPS=5, to check this script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}
SIZE=${SIZE:-70m}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-8}
STEPS=${STEPS:-200}
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
started=$SECONDS

"$PYTHON" - <<'EOF'
import os, sys, torch
if torch.cuda.is_available():
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
elif os.environ.get("ALLOW_CPU") != "1":
    sys.exit("gpu_check: torch sees no CUDA device (install a CUDA build of torch; ALLOW_CPU=1 runs it on a CPU)")
else:
    print(f"torch {torch.__version__}: no CUDA device; ALLOW_CPU=1, checking the script on the CPU")
EOF

echo "== 1. CUDA-marked tests"
"$PYTHON" -m pytest -q -m cuda tests/ -p no:cacheprovider

precision=bf16
"$PYTHON" -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)" || precision=fp32
echo "== 2. ${SIZE} jobs, ${STEPS} steps of ${BATCH} x ${SEQ} tokens, ${precision}"
budget() {  # FLOPs that buy $STEPS steps of method $1 (the trainer takes round(budget / FLOPs per step))
    "$PYTHON" - "$1" <<EOF
import sys, torch
from harness.core import registry
from harness.data import DataConfig
with torch.device("meta"):
    model = registry.build(sys.argv[1], "$SIZE", {"vocab_size": DataConfig().vocab_size})
print(f"{$STEPS * model.train_flops_per_token($SEQ) * $BATCH * $SEQ:.6e}")
EOF
}
run_job() {  # method, folder, extra arguments
    local method=$1 folder=$2; shift 2
    "$PYTHON" -m harness train --method "$method" --size "$SIZE" --budget "$(budget "$method")" --out "$folder" \
        --yes --no-progress --set "train.seq_len=$SEQ" --set "train.batch_size=$BATCH" --set train.grad_accum=1 \
        --set "train.precision=$precision" --set train.log_every=20 --set train.checkpoint_every=100000 \
        --set train.eval_tokens=8192 "$@" > "$folder.log"
    echo "trained $method -> $folder"
}
run_job vanilla "$OUT/vanilla"
run_job ponderlm3 "$OUT/ponderlm3"
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    run_job vanilla "$OUT/vanilla-ddp2" --devices 2 --parallel ddp
fi

echo "== 3. throughput"
"$PYTHON" - "$OUT" <<'EOF'
import json, os, pathlib, sys, torch
from harness.plan.hardware import GPU_TABLE

out = pathlib.Path(sys.argv[1])
peak, name = None, "cpu"
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    key = name.lower().replace("nvidia", "").replace(" ", "").strip("-")
    peak = next((p for k, (p, _) in sorted(GPU_TABLE.items(), key=lambda kv: -len(kv[0])) if k in key), None)
if os.environ.get("PEAK_TFLOPS"):
    peak = float(os.environ["PEAK_TFLOPS"]) * 1e12
print(f"device {name}; dense bf16 peak {peak / 1e12:.0f} TFLOP/s per device" if peak else
      f"device {name}; peak unknown (set PEAK_TFLOPS): MFU not reported")
for folder in sorted(p for p in out.iterdir() if (p / "result.json").exists()):
    result = json.loads((folder / "result.json").read_text())
    windows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][1:]  # after warm-up
    tokens_s = sum(w["tokens_per_second"] for w in windows) / len(windows) if windows else float("nan")
    flops_per_token = result["train_flops"] / result["train_tokens"]  # measured: PonderLM's J is random
    devices = result.get("devices", 1)
    mfu = f"{tokens_s * flops_per_token / (peak * devices):.1%}" if peak else "n/a"
    print(f"{folder.name:<14} {result['method']}/{result['size']} on {devices} device(s): {result['train_steps']} steps, "
          f"{tokens_s:,.0f} tokens/s, {flops_per_token / 1e9:.2f} GFLOPs/token, MFU {mfu}, "
          f"val_ppl {result['val_ppl']:.1f}, loss {windows[-1]['loss'] if windows else float('nan'):.3f}")
EOF
echo "gpu_check: done in $((SECONDS - started)) s; jobs in $OUT"
