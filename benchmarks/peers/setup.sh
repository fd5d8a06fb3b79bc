#!/usr/bin/env bash
# Make one venv per peer runner of benchmarks/compare.py, each from its pinned
# requirements file beside this script:
#
#     bash benchmarks/peers/setup.sh [VENV_ROOT] [PEER ...]
#
# VENV_ROOT defaults to $DIFFRT_BENCH_VENVS or ~/.cache/diffrt-bench/venvs (outside the
# repository: each venv is 1-2 GB). PEER is optimum-onnx, optimum-intel and/or
# diffusers-deepcache (default: all three). A peer's venv is VENV_ROOT/PEER; it is rebuilt
# from scratch each time. optimum-intel's venv also runs its hybrid int8 runners (nncf is
# in its requirements; the calibration prompts are benchmarks/peers/calibration_prompts.txt,
# so no dataset is downloaded).
#
# Why separate venvs: optimum-onnx 0.1 wants transformers<4.58 (so huggingface-hub<1.0)
# and optimum-intel 2.2 wants transformers<5.6 and huggingface-hub<1.22, while the main
# venv has diffusers 0.42 (huggingface-hub>=1.32) and transformers 5.24. diffusers-deepcache
# is the main venv's diffusers/transformers plus the DeepCache package (0.1.1, pure Python,
# checked with diffusers 0.42.1), kept out of the main venv.
#
# torch is installed first, alone and pinned (torch==2.13.0, the same as .ci/run): on
# these machines pip takes it from the local CPU wheel; an unpinned torch, or one pulled
# in as a dependency, would download a multi-GB CUDA build.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${1:-${DIFFRT_BENCH_VENVS:-$HOME/.cache/diffrt-bench/venvs}}"
shift || true
PEERS=("$@")
if [ ${#PEERS[@]} -eq 0 ]; then
    PEERS=(optimum-onnx optimum-intel diffusers-deepcache)
fi
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

mkdir -p "$ROOT"
for peer in "${PEERS[@]}"; do
    requirements="$HERE/requirements-$peer.txt"
    if [ ! -f "$requirements" ]; then
        echo "error: unknown peer '$peer' (no $requirements); choose from: optimum-onnx optimum-intel diffusers-deepcache" >&2
        exit 2
    fi
    venv="$ROOT/$peer"
    echo "=== $peer -> $venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$TORCH_PIN"
    "$venv/bin/python" -m pip install -q -r "$requirements" "$TORCH_PIN"
    if [ "$peer" = optimum-intel ]; then
        # optimum-intel 2.2 requires torchvision, but PyPI's torchvision 0.28 is a CUDA
        # build whose ops do not load on the CPU torch, and transformers then fails to
        # import anything that touches images. Stable Diffusion needs no torchvision, so
        # take it out again (transformers checks whether it is installed).
        "$venv/bin/python" -m pip uninstall -q -y torchvision
    fi
    "$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
    echo "=== $peer: installed ($(wc -l < "$venv/freeze.txt") packages; list in $venv/freeze.txt)"
done
