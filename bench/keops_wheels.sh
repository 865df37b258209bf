#!/usr/bin/env bash
# Build pykeops/keopscore wheels (pure Python) into .keops_wheels/ so that a GPU machine without a
# package index can install them:  python bench/gpu_bench.py --keops-wheels .keops_wheels ...
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip wheel --quiet --no-deps pykeops keopscore -w .keops_wheels
ls .keops_wheels
