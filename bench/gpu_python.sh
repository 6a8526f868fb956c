#!/usr/bin/env bash
# Python with the project's packages on a GPU host: this checkout's .venv when `make install`
# made one, else the host's python3 plus the offline wheel bundle in .whl/ (docs/gpu.md; built
# with ../shared/gpu/make_bundle.sh .whl). Arguments go to python, e.g.
# `bench/gpu_python.sh -m oodscale run configs/fashion-gpu.yaml` (bench/gpu_check.sh uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  exec .venv/bin/python "$@"
fi
missing=$(python3 - <<'PY'
import importlib.util
need = ["ray", "diffusers", "pytorch_metric_learning", "webdataset", "pydantic", "accelerate"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_python: python3 lacks $missing and there is no .whl/ bundle; on a machine with" \
         "PyPI run ../shared/gpu/make_bundle.sh .whl (docs/gpu.md), or make install" >&2
    exit 2
  fi
  site=${OODSCALE_SITE:-/tmp/oodscale-site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 "$@"
