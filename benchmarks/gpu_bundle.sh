#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for benchmarks/gpu_check.sh, downloaded HERE (a machine
# with a package registry) into one folder that travels with the repository:
#
#   bash benchmarks/gpu_bundle.sh                           # -> .gpu-bundle/ for Python 3.12, x86-64 Linux
#   bash benchmarks/gpu_bundle.sh DIR --python-version 3.11
#
# The lent machine has python3 with torch (CUDA), CuPy, Triton, numpy and onnxruntime (CPU
# build), and no registry. The check also needs diffusers and transformers (the tiny and
# SD1.5-size random-weight checkpoints, the torch backend, the diffusers oracle), onnx (the
# export), tokenizers, pillow and array-api-compat (the runtime): those and everything they
# import, pinned below as one closure (the versions CI tests, .ci/constraints.txt, and their
# requirements as resolved when this list was written). numpy is left out: torch, CuPy and
# onnxruntime there are built against the image's own. gpu_check.sh installs the folder with
# pip --no-index --no-deps; CI rehearses that offline in a fresh venv (.ci/run).
# Fails if the folder would exceed 60 MiB (a call to that machine carries 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DIR=.gpu-bundle
PYVER=3.12  # the lent image's python3 (3.12.3 when this was written)
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) PYVER="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "gpu_bundle.sh: unknown option $1 (use DIR and --python-version X.Y)" >&2; exit 2 ;;
        *) DIR="$1"; shift ;;
    esac
done
LIMIT=$((60 * 1024 * 1024))
PACKAGES=(
    diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0
    array-api-compat==1.16.0 onnx==1.23.2 ml_dtypes==0.6.0 pillow==13.0.0 protobuf==7.36.2
    # what those require (pip download resolved them; --no-deps install needs each named)
    annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 certifi==2026.10.19.post1
    charset-normalizer==3.5.3 click==8.5.1 filelock==4.3.2 fsspec==2026.9.0 h11==0.16.0 hf-xet==1.8.0
    httpcore2==2.17.0 httpx2==2.17.0 idna==3.21 importlib_metadata==10.2.0 lazy-importer==0.1.0
    markdown-it-py==4.3.0 mdurl==0.1.2 packaging==26.4 pydantic==2.14.4 pydantic_core==2.50.5
    Pygments==2.21.0 PyYAML==6.0.4 regex==2026.12.2 requests==2.34.2 rich==15.0.0 shellingham==1.5.4
    tqdm==4.70.1 truststore==0.10.5 typer==0.29.2 typing-inspection==0.4.5 typing_extensions==4.16.0
    urllib3==2.8.0 zipp==4.1.2
)

partial="$DIR.partial"
rm -rf "$partial"
mkdir -p "$partial"
for spec in "${PACKAGES[@]}"; do echo "$spec"; done >"$partial/requirements.txt"
echo "$PYVER" >"$partial/python-version"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --dest "$partial" -r "$partial/requirements.txt"

wheels=$(find "$partial" -name '*.whl' | wc -l)
if [ "$wheels" -ne "${#PACKAGES[@]}" ]; then
    echo "gpu_bundle.sh: $wheels wheels for ${#PACKAGES[@]} packages in $partial; expected one each" >&2
    exit 1
fi
bytes=$(du -sb "$partial" | cut -f1)
if [ "$bytes" -gt "$LIMIT" ]; then
    echo "gpu_bundle.sh: $partial holds $((bytes / 1024 / 1024)) MiB, over the 60 MiB limit; nothing written" >&2
    exit 1
fi
rm -rf "$DIR"
mv "$partial" "$DIR"
echo "gpu_bundle.sh: $wheels wheels for Python $PYVER, $((bytes / 1024 / 1024)) MiB, in $DIR"
