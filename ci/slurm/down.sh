#!/usr/bin/env bash
# Stop what ci/slurm/up.sh started, by the PIDs it recorded (never by process name).
# WIPE=1 also removes $SLURM_ROOT (config, state, logs).
R=${SLURM_ROOT:-/tmp/safe-slurm}
export SLURM_CONF=$R/etc/slurm.conf
if [ -f "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  [ -n "$jobs" ] && scancel --full $jobs 2>/dev/null
  for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
# Alive and not a zombie (state field of /proc/PID/stat; no procps needed).
alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
for d in slurmd slurmctld munged; do
  f=$R/run/$d.fg.pid; [ -f "$f" ] || continue
  p=$(cat "$f")
  kill -TERM "$p" 2>/dev/null
  for _ in $(seq 100); do alive "$p" || break; sleep 0.1; done
  alive "$p" && kill -KILL "$p" 2>/dev/null
  rm -f "$f"
done
[ "${WIPE:-0}" = 1 ] && rm -rf "$R"
exit 0
