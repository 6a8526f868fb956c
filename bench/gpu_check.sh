#!/usr/bin/env bash
# `make gpu-check`: the project's GPU check (bench/gpu_check.py) with the packages gpu_python.sh
# finds. Arguments go to bench/gpu_check.py, e.g. `bench/gpu_check.sh --out "$OUT/gpu_check.md"`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bench/gpu_python.sh bench/gpu_check.py "$@"
