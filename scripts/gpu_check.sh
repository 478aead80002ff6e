#!/usr/bin/env bash
# A prepared GPU check: on one GPU, within ~8 minutes, prints a compact table last:
#   bf16 + torch.compile training of the paper-350m architecture, dense vs STEM 1/3 (tokens/s, MFU);
#   decode tokens/s; how much offload copy time the prefetch stream hides; FSDP2 + NCCL under torchrun.
# Each section that fails prints "n/a: <reason>"; the table is printed anyway. Record the table in LOG.md.
#   scripts/gpu_check.sh              # on a GPU machine
#   scripts/gpu_check.sh --dry-run    # tiny dims on the CPU (gloo, no compile): what the tests run
# Extra arguments go to `stem-nb gpu-check` (e.g. --sections train decode, --json out.json).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# the project's environment when there is one, else the python on PATH (a GPU box with torch installed)
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"      # the checkout's stem_nb, installed or not
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout "${GPU_CHECK_TIMEOUT:-590}" "$PY" -c "import sys; from stem_nb.cli import main; sys.exit(main(sys.argv[1:]))" gpu-check "$@"
