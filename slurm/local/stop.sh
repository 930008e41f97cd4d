#!/usr/bin/env bash
# Stop exactly the daemons slurm/local/start.sh started (by their pid files, never by name), then forget them.
set -uo pipefail
BASE="${UAE_SLURM_DIR:-/tmp/uae-slurm}"
[ -f "$BASE/started" ] || { echo "[slurm] nothing recorded in $BASE/started" >&2; exit 0; }
# Reverse order: slurmd, slurmctld, then munged.
tac "$BASE/started" | while read -r name pidfile; do
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "[slurm] stopped $name ($pid)" >&2
  fi
  rm -f "$pidfile"
done
rm -f "$BASE/started"
