#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs), made for a lent GPU machine as
# it comes: python3 with torch, CuPy and onnxruntime, no package registry, 600 s per command,
# only files under $OUT coming back. Run from a copy of the repository that holds the
# .gpu-bundle folder made by benchmarks/gpu_bundle.sh on a machine with a registry:
#
#   bash benchmarks/gpu_check.sh                 # writes $OUT/gpu_check.json and .md (else benchmarks/results)
#   bash benchmarks/gpu_check.sh --quick         # the tiny model only
#   bash benchmarks/gpu_check.sh --device cpu    # the same flow on CPU backends (CI's rehearsal)
#
# The bundle's wheels are installed offline (pip --no-index --no-deps, no config files, no
# index) into their own folder put first on PYTHONPATH; the image's packages are left alone.
# Environment: PYTHON (default python3), DIFFRT_BUNDLE (default .gpu-bundle),
# DIFFRT_BUNDLE_SITE (default /tmp/diffrt-gpu-site), GPU_CHECK_BUDGET (seconds, default 480:
# under the 600 s command limit with the install and a margin).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
BUNDLE="${DIFFRT_BUNDLE:-.gpu-bundle}"
SITE="${DIFFRT_BUNDLE_SITE:-/tmp/diffrt-gpu-site}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
export PYTHONUNBUFFERED=1

if [ -f "$BUNDLE/requirements.txt" ]; then
    want=$(cat "$BUNDLE/python-version" 2>/dev/null || true)
    have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -n "$want" ] && [ "$want" != "$have" ]; then
        echo "gpu_check.sh: $BUNDLE holds wheels for Python $want, $PYTHON is $have: make it with" \
            "bash benchmarks/gpu_bundle.sh --python-version $have" >&2
        exit 2
    fi
    # Installed once per machine: a second run finds the same requirements beside the site.
    if ! cmp -s "$BUNDLE/requirements.txt" "$SITE/.bundle-requirements.txt" 2>/dev/null; then
        rm -rf "$SITE"
        env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
            PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q --no-index --find-links "$BUNDLE" \
            --no-deps --no-compile --target "$SITE" -r "$BUNDLE/requirements.txt"
        cp "$BUNDLE/requirements.txt" "$SITE/.bundle-requirements.txt"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: the bundle's $(grep -c '==' "$BUNDLE/requirements.txt") packages from $BUNDLE, installed in $SITE"
else
    echo "gpu_check.sh: no $BUNDLE/requirements.txt: using what $PYTHON has (benchmarks/gpu_bundle.sh makes the bundle)"
fi
# The hard stop leaves the command limit some margin; the JSON is written after every variant.
exec timeout -k 5 560 "$PYTHON" benchmarks/gpu_check.py --budget "$BUDGET" "$@"
