#!/usr/bin/env bash
# Start a one-node Ray head on this machine, on the loopback interface only, with Ray's token
# authentication on. Jobs are then submitted to it with `ray job submit` (see cluster/README.md).
#
#   cluster/start-local-head.sh                  # all cores and GPUs of this machine
#   cluster/start-local-head.sh --num-cpus=8     # extra arguments go to `ray start`
#   cluster/stop-local-head.sh PIDFILE           # stops this head only (PIDFILE is printed)
#
# Never `ray stop` to end it: that stops every Ray on this host, other users' runs included.
#
# Environment:
#   RAY_BIN          the ray executable (default: `ray` on PATH, e.g. .venv/bin/ray)
#   DASHBOARD_PORT   dashboard / job-submission port on 127.0.0.1 (default 8265; keep it out of
#                    Ray's worker port range 10002-19999)
#   RAY_TEMP_DIR     Ray's session directory root (default /tmp/ray)
#   LOOPBACK         1 (default): GCS, raylet and dashboard listen on 127.0.0.1 only.
#                    0: Ray's normal behaviour, the node announces its routable IP so that
#                    other machines can join with `ray start --address=...` (dashboard stays
#                    on 127.0.0.1).
#
# Loopback: Ray replaces --node-ip-address=127.0.0.1 by the host's routable IP on Linux unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set (the switch Ray uses on laptops). The script sets it
# for the head; a driver started by hand with --address (not through `ray job submit`) must run
# with the same variable, or it looks for the GCS on the routable IP and times out.
#
# Token authentication: Ray 2.60 turns it on for a head started by `ray start --head` when a token
# exists in ~/.ray/auth_token, and every client (ray job submit, ray.init, the dashboard) must
# then run with RAY_AUTH_MODE=token and the same token (~/.ray/auth_token, or RAY_AUTH_TOKEN /
# RAY_AUTH_TOKEN_PATH). This script creates the token if it is missing and never prints it.
set -euo pipefail

RAY_BIN="${RAY_BIN:-ray}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray}"
LOOPBACK="${LOOPBACK:-1}"

if ! command -v "$RAY_BIN" >/dev/null 2>&1; then
    echo "error: '$RAY_BIN' not found; install oodscale (pip install .) or set RAY_BIN" >&2
    exit 1
fi

export RAY_AUTH_MODE=token
# Creates ~/.ray/auth_token only if no token exists yet (stdout, the token, is discarded).
"$RAY_BIN" get-auth-token --generate >/dev/null
chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" 2>/dev/null || true

node_ip_args=()
client_env="export RAY_AUTH_MODE=token"
if [ "$LOOPBACK" = "1" ]; then
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    node_ip_args=(--node-ip-address=127.0.0.1)
    client_env="export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
fi

# --port=0: the GCS picks a free port, so this never clashes with another head on the machine.
"$RAY_BIN" start --head \
    --port=0 \
    "${node_ip_args[@]}" \
    --include-dashboard=true \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD_PORT" \
    --temp-dir="$RAY_TEMP_DIR" \
    "$@"

ADDRESS="$(cat "$RAY_TEMP_DIR/ray_current_cluster" 2>/dev/null || true)"
if [ -z "$ADDRESS" ]; then
    echo "error: Ray started but $RAY_TEMP_DIR/ray_current_cluster holds no address" >&2
    exit 1
fi
# This head's processes, for cluster/stop-local-head.sh: those whose command line names its
# session directory or its GCS address (first line: both, to re-check the pids before a kill).
SESSION="$(basename "$(readlink -f "$RAY_TEMP_DIR/session_latest")")"
PIDFILE="$RAY_TEMP_DIR/oodscale-head-${ADDRESS##*:}.pids"
{
    echo "$SESSION $ADDRESS"
    ps -ww -eo pid=,args= | grep -F -e "$SESSION" -e "$ADDRESS" | grep -v -e grep -e "ps -ww" |
        awk '{print $1}'
} > "$PIDFILE"

cat <<MSG

Ray head is up.
  GCS address (ray.init, --address, RAY_ADDRESS):  $ADDRESS
  Dashboard and job submission:                    http://127.0.0.1:$DASHBOARD_PORT

Token authentication is ON (Ray 2.60). Every client shell needs RAY_AUTH_MODE=token; the
token is read from ~/.ray/auth_token:
  $client_env

Then, from the repository root:
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \\
      python jobs/prepare.py --config configs/digits.yaml
  python jobs/prepare.py --config configs/digits.yaml --address $ADDRESS   # driver here

Stop it (this head only; never a bare "ray stop", which ends every Ray on this host):
  cluster/stop-local-head.sh $PIDFILE
MSG
