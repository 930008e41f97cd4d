#!/usr/bin/env bash
# Start a real single-node SLURM (Debian's slurm-wlm + munge) on this machine, for trying the SLURM launcher on a
# laptop and for CI. Everything it starts is recorded in $UAE_SLURM_DIR/started; slurm/local/stop.sh stops exactly
# that. Needs root (apt, munge). Prints the line to source: the cluster's config is $UAE_SLURM_DIR/slurm.conf,
# found by the SLURM commands through SLURM_CONF (nothing under /etc/slurm is touched).
#
#   bash slurm/local/start.sh && source /tmp/uae-slurm/env && sinfo
set -euo pipefail
BASE="${UAE_SLURM_DIR:-/tmp/uae-slurm}"
HERE="$(cd "$(dirname "$0")" && pwd)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "[slurm] installing slurm-wlm and munge (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

mkdir -p "$BASE"/{state,spool,run,log}
: > "$BASE/started.tmp"
[ -f "$BASE/started" ] && cat "$BASE/started" >> "$BASE/started.tmp"
mv "$BASE/started.tmp" "$BASE/started"

# munge: reuse a running daemon (we did not start it, so we never stop it); otherwise start one as the munge user.
if ! munge -n </dev/null >/dev/null 2>&1; then
  if [ ! -f /etc/munge/munge.key ]; then
    mungekey --create >/dev/null 2>&1 || create-munge-key -f >/dev/null
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  mkdir -p "$BASE/munge" && chown munge:munge "$BASE/munge"   # munged runs as munge: it writes its pid file here
  runuser -u munge -- /usr/sbin/munged --pid-file="$BASE/munge/munged.pid"
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
  [ -f "$BASE/munge/munged.pid" ] || { echo "[slurm] munged did not start" >&2; exit 1; }
  echo "munged $BASE/munge/munged.pid" >> "$BASE/started"
fi

CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
sed -e "s|@BASE@|$BASE|g" -e "s|@USER@|$(id -un)|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
    -e "s|@CTLD_PORT@|${UAE_SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${UAE_SLURMD_PORT:-6818}|g" \
    "$HERE/slurm.conf.in" > "$BASE/slurm.conf"
export SLURM_CONF="$BASE/slurm.conf"
echo "export SLURM_CONF=$BASE/slurm.conf" > "$BASE/env"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running "$BASE/run/slurmctld.pid"; then
  /usr/sbin/slurmctld -f "$SLURM_CONF"
  for _ in $(seq 100); do running "$BASE/run/slurmctld.pid" && break; sleep 0.1; done
  echo "slurmctld $BASE/run/slurmctld.pid" >> "$BASE/started"
fi
if ! running "$BASE/run/slurmd.pid"; then
  /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost
  for _ in $(seq 100); do running "$BASE/run/slurmd.pid" && break; sleep 0.1; done
  echo "slurmd $BASE/run/slurmd.pid" >> "$BASE/started"
fi

for _ in $(seq 120); do
  state="$(sinfo -h -n localhost -o %T 2>/dev/null || true)"
  case "$state" in
    idle|mixed|allocated) echo "[slurm] node localhost is $state; source $BASE/env" >&2; exit 0 ;;
    down*|drain*|drained*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
echo "[slurm] the node did not become idle in 60 s; logs: $BASE/log/" >&2
tail -20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 || true
exit 1
