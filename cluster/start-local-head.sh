#!/usr/bin/env bash
# Start a one-node Ray head on this machine, reachable on loopback only, with Ray's token
# authentication on. Jobs are then submitted to it with `ray job submit` (see cluster/README.md).
#
#   cluster/start-local-head.sh                  # all cores and GPUs of this machine
#   cluster/start-local-head.sh --num-cpus=8     # extra arguments go to `ray start`
#   ray stop                                     # to shut it down
#
# Environment:
#   RAY_BIN          the ray executable (default: `ray` on PATH, e.g. .venv/bin/ray)
#   DASHBOARD_PORT   dashboard / job-submission port on 127.0.0.1 (default 8265; keep it out of
#                    Ray's worker port range 10002-19999)
#   RAY_TEMP_DIR     Ray's session directory root (default /tmp/ray)
#
# Ray 2.60 enables token authentication: a head started by `ray start --head` turns it on when a
# token exists in ~/.ray/auth_token, and every client (ray job submit, ray.init, the dashboard)
# must then run with RAY_AUTH_MODE=token and the same token (~/.ray/auth_token, or RAY_AUTH_TOKEN
# / RAY_AUTH_TOKEN_PATH). This script creates the token if it is missing and never prints it.
set -euo pipefail

RAY_BIN="${RAY_BIN:-ray}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray}"

if ! command -v "$RAY_BIN" >/dev/null 2>&1; then
    echo "error: '$RAY_BIN' not found; install oodscale (pip install .) or set RAY_BIN" >&2
    exit 1
fi

export RAY_AUTH_MODE=token
# Creates ~/.ray/auth_token only if no token exists yet (stdout, the token, is discarded).
"$RAY_BIN" get-auth-token --generate >/dev/null
chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" 2>/dev/null || true

# --port=0: the GCS picks a free port, so this never clashes with another head on the machine.
"$RAY_BIN" start --head \
    --port=0 \
    --node-ip-address=127.0.0.1 \
    --include-dashboard=true \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD_PORT" \
    --temp-dir="$RAY_TEMP_DIR" \
    "$@"

ADDRESS="$(cat "$RAY_TEMP_DIR/ray_current_cluster" 2>/dev/null || true)"
if [ -z "$ADDRESS" ]; then
    echo "error: Ray started but $RAY_TEMP_DIR/ray_current_cluster has no address" >&2
    exit 1
fi

cat <<MSG

Ray head is up (loopback only).
  GCS address (ray.init / --address / RAY_ADDRESS):  $ADDRESS
  Dashboard and job submission:                      http://127.0.0.1:$DASHBOARD_PORT

Token authentication is ON. Every client shell needs:
  export RAY_AUTH_MODE=token      # the token is read from ~/.ray/auth_token

Then, from the repository root:
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \\
      python jobs/prepare.py --config configs/digits.yaml
  python jobs/prepare.py --config configs/digits.yaml --address $ADDRESS   # driver here

Stop it with: ray stop
MSG
