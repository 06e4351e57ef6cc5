#!/usr/bin/env bash
# The first-GPU check (benchmarks/gpu_check.py): bf16 training of dense / MoD / SDT / STT at ~100M parameters,
# torch.compile without graph breaks, decoding against transformers' generate(); a JSON of the figures.
#   scripts/gpu_check.sh [--out gpu_check.json] [--steps N] [--capacity C]    # one GPU, under 8 minutes
#   scripts/gpu_check.sh --tiny --out gpu_check_tiny.json                     # CPU dry run, about a minute
# Exit status: 0 when every check passes, 1 when one fails, 124 when it ran past GPU_CHECK_TIMEOUT seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# The phases stop starting at --budget-s (450 s); the timeout is the hard stop behind it.
exec timeout "${GPU_CHECK_TIMEOUT:-480}" python benchmarks/gpu_check.py "$@"
