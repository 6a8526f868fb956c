#!/usr/bin/env bash
# `make benchmark-gpu`: the full-fidelity Fashion-MNIST benchmark (configs/fashion-gpu.yaml) on
# one GPU host, in one command, with the packages gpu_python.sh finds; then its claims. Extra
# arguments are config overrides, e.g. `bench/benchmark_gpu.sh storage.root="$OUT/runs"`.
# Fashion-MNIST must be at /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)
# or under data.path=... .
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bench/gpu_python.sh -m oodscale run configs/fashion-gpu.yaml "$@"
bench/gpu_python.sh -m oodscale claims configs/fashion-gpu.yaml "$@"
echo "benchmark-gpu: $(( $(date +%s) - started )) s in all"
