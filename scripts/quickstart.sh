#!/usr/bin/env bash
# The quickstart: seqft on the bundled model and the bundled 4-task stream, offline, on CPU.
# Each run gets its own folder under runs/, so an earlier run is never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/clbench fit --config configs/quickstart.yaml "$@"
