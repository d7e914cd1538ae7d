#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (about 5-8 minutes on one GPU): the quickstart in bf16
# on CUDA, every strategy for a few steps on CUDA, FSDP2 (NCCL, one rank) with the export of its
# sharded checkpoint, and the two-process gloo tests again on the GPU machine's CPUs.
#
#   bash tools/gpu_check.sh [OUT_DIR]        # default runs/gpu-check; needs clbench installed
#
# It prints one "gpu_check: ..." line per step and stops at the first failure. Results are in
# OUT_DIR (results.md per run); README "Several GPUs" says whether it has been run and where.
# ACCEL=cpu SKIP_QUICKSTART=1 runs the same steps on a CPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-runs/gpu-check}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "gpu_check: $*"; }

ACCEL=${ACCEL:-gpu}
if [ "$ACCEL" = gpu ]; then
  nvidia-smi -L
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))"
fi

# A two-task slice of the quickstart stream for the strategy smoke tests: 32 examples, 4 steps.
SMOKE="$OUT/smoke.yaml"
mkdir -p "$OUT"
cat > "$SMOKE" <<'YAML'
seed_everything: 1234
model: {model: smollm2-135m-instruct, lr: 5.0e-5}
trainer: {accelerator: ACCEL, devices: 1, precision: bf16-mixed, enable_progress_bar: false}
stream:
  name: smoke
  data_root: data/quickstart
  batch_size: 8
  eval_batch_size: 32
  tasks:
    - {name: FortuneTopic, path: FortuneTopic, metric: exact_match, n_train: 32, n_test: 32, epochs: 1, max_new_tokens: 5}
    - {name: WordAnalogy, path: WordAnalogy, metric: exact_match, n_train: 32, n_test: 32, epochs: 1, max_new_tokens: 5}
run: {evaluate: needed, checkpoints: last}
YAML
sed -i "s/accelerator: ACCEL/accelerator: $ACCEL/" "$SMOKE"

if [ -z "${SKIP_QUICKSTART:-}" ]; then
  step "quickstart on $ACCEL, bf16-mixed"
  start=$(date +%s)
  "$PY" -m clbench fit --config configs/quickstart.yaml --trainer.accelerator "$ACCEL" --trainer.devices 1 \
    --trainer.enable_progress_bar false --run.output_dir "$OUT" --run.name quickstart
  step "quickstart done in $(( $(date +%s) - start )) s: $OUT/quickstart/results.md"
fi

for strategy in seqft replay ewc freeze lwf multitask attribution; do
  extra=()
  [ "$strategy" = attribution ] && extra=(--strategy.max_prior_samples 16)
  "$PY" -m clbench fit --config "$SMOKE" --strategy "$strategy" "${extra[@]}" \
    --run.output_dir "$OUT/smoke" --run.name "$strategy"
  step "strategy $strategy on $ACCEL: ok"
done
"$PY" -m clbench fit --config "$SMOKE" --strategy attribution --strategy.gate_target update \
  --strategy.max_prior_samples 16 --run.output_dir "$OUT/smoke" --run.name attribution-update
step "attribution (update gate) on $ACCEL: ok"

step "FSDP2 on one $ACCEL (NCCL on a GPU), attribution, then export of the sharded checkpoint"
"$PY" -m clbench fit --config "$SMOKE" --strategy attribution --strategy.max_prior_samples 16 \
  --trainer.strategy fsdp --run.output_dir "$OUT/smoke" --run.name fsdp-attribution
"$PY" -m clbench export "$OUT/smoke/fsdp-attribution/checkpoints/task2-WordAnalogy" "$OUT/exported"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
a = json.loads((out / "smoke" / "attribution" / "results.json").read_text())["matrix"]
b = json.loads((out / "smoke" / "fsdp-attribution" / "results.json").read_text())["matrix"]
print("gpu_check: attribution matrix, one device plain vs FSDP2:", a, b)
PY

step "two-process gloo tests on this machine's CPUs"
"$PY" -m pytest -q tests/distributed
step "all done"
