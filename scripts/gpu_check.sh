#!/usr/bin/env bash
# The CUDA paths CPU CI cannot run (training loop in bf16/fp16 for tiny and RN50, the device's image
# view and evaluation, a 1-process nccl torchrun, RN50 throughput), in one command, ~5 minutes on one
# GPU. Writes one JSON: $OUT/gpu_check.json (OUT is set on this project's device machine), else
# runs/gpu_check/gpu_check.json. Run from anywhere:
#
#   bash scripts/gpu_check.sh                  # uses the machine's python3 and its CUDA torch
#   bash scripts/gpu_check.sh --fetch-wheels   # on a machine with a package registry: fetch the few
#                                              # pure-Python packages a bare GPU image may lack into .whl/
#
# Nothing is installed into the machine's Python: the toolkit is put on PYTHONPATH, and wheels found
# in .whl/ are unpacked into a temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ "${1:-}" = "--fetch-wheels" ]; then
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl ftfy wcwidth nltk webdataset braceexpand
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 2
    export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 900 "$PY" scripts/gpu_check.py "$@"
