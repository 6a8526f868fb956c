#!/usr/bin/env bash
# Stop the Ray head that cluster/start-local-head.sh started, and nothing else.
#
#   cluster/stop-local-head.sh /tmp/ray/oodscale-head-<port>.pids   # the file the start printed
#
# `ray stop` would end every Ray on this host, other users' runs and tests included. This kills
# only the processes recorded when the head started (its GCS, raylet, dashboard, monitors),
# each checked to still belong to that head (its session or GCS address on the command line),
# and the workers and agents under them: SIGTERM, then SIGKILL after a grace period.
set -euo pipefail

PIDFILE="${1:?usage: $0 PIDFILE (printed by cluster/start-local-head.sh)}"
GRACE_S="${GRACE_S:-10}"
if [ ! -f "$PIDFILE" ]; then
    echo "error: $PIDFILE not found; it is printed by cluster/start-local-head.sh" >&2
    exit 1
fi
read -r SESSION ADDRESS < "$PIDFILE"

roots=()
while read -r pid; do
    # a recorded pid that now runs something else (reused) is left alone
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" |
            grep -qF -e "$SESSION" -e "$ADDRESS"; then
        roots+=("$pid")
    fi
done < <(tail -n +2 "$PIDFILE")

all=("${roots[@]}")
frontier=("${roots[@]}")
while [ "${#frontier[@]}" -gt 0 ]; do  # descendants, found before anything is killed
    next=()
    for pid in "${frontier[@]}"; do
        while read -r child; do next+=("$child"); done < <(pgrep -P "$pid" || true)
    done
    all+=("${next[@]}")
    frontier=("${next[@]}")
done

if [ "${#all[@]}" -eq 0 ]; then
    echo "the Ray head of $PIDFILE ($ADDRESS) is not running"
    rm -f "$PIDFILE"
    exit 0
fi
kill -TERM "${all[@]}" 2>/dev/null || true
for _ in $(seq 1 $((GRACE_S * 2))); do
    alive=()
    for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ "${#alive[@]}" -eq 0 ] && break
    sleep 0.5
done
if [ "${#alive[@]}" -gt 0 ]; then
    kill -KILL "${alive[@]}" 2>/dev/null || true
fi
rm -f "$PIDFILE"
echo "stopped the Ray head at $ADDRESS (${#all[@]} processes)"
