#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it does): one single-GPU machine,
# at most 10 minutes. Extra arguments go to the script, e.g. --quick or --backends torch,tensorrt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec timeout 600 "$PYTHON" benchmarks/gpu_check.py "$@"
