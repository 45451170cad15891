#!/usr/bin/env bash
# Starts N CPU processes of `bitune-jax train` on this machine, joined by
# jax.distributed (coordinator 127.0.0.1:PORT, gloo collectives), to test
# multi-process training without a cluster. Each process gets its own CPU
# devices, its own log file, and its share of every global batch.
#
# Usage:
#   launch/local_cpu.sh [options] N CONFIG [key=value ...]
#
# Options:
#   --dry-run                 print the commands, run nothing (or DRY_RUN=1)
#   --port PORT               coordinator port (default: a free port)
#   --devices-per-process D   CPU devices per process (default 2)
#   --log-dir DIR             per-process logs (default: runs/local_cpu_logs)
#   --timeout SECONDS         kill every process after this long (default: none)
#
# Environment: PYTHON (default: python) runs `-m bitune_jax.cli`; extra
# XLA_FLAGS are kept (the device-count flag is appended, so it wins).
#
# Process 0's output is shown here as well as in its log. If any process
# fails, the others are stopped and the script exits with the first failure's
# status.
#
# Example:
#   launch/local_cpu.sh 2 configs/smollm2_demo.yaml train.steps=20
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=${DRY_RUN:-0}
port=""
devices=2
log_dir=runs/local_cpu_logs
timeout=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --port) port=$2; shift 2 ;;
    --devices-per-process) devices=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  usage >&2
  exit 2
fi
num=$1
config=$2
shift 2
case "$num" in ''|*[!0-9]*|0) echo "error: N must be a positive integer, got '$num'" >&2; exit 2 ;; esac
case "$devices" in ''|*[!0-9]*|0) echo "error: --devices-per-process must be >= 1, got '$devices'" >&2; exit 2 ;; esac
python=${PYTHON:-python}

if [ -z "$port" ]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

# Sets `cmd` to the exact command of process $1; the overrides follow it.
command_of() {
  local id=$1
  shift
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags"
       "BITUNE_COORDINATOR=127.0.0.1:$port" "BITUNE_NUM_PROCESSES=$num" "BITUNE_PROCESS_ID=$id"
       "$python" -m bitune_jax.cli train "$config" "$@")
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < num; i++)); do
    command_of "$i" "$@"
    printf '%q ' "${cmd[@]}"
    printf '> %q 2>&1 &\n' "$log_dir/process_$i.log"
  done
  echo "wait  # for all $num processes; stop the rest when one fails"
  exit 0
fi

mkdir -p "$log_dir"
rm -f "$log_dir"/process_*.log  # logs of an earlier run with more processes would mislead
# Job control puts each process in its own process group, so stopping one
# stops everything it started too.
set -m
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    if [ -n "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ((i = 0; i < num; i++)); do
  command_of "$i" "$@"
  log="$log_dir/process_$i.log"
  if [ "$i" -eq 0 ]; then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" >"$log" 2>&1 &
  fi
  pids+=("$!")
done
echo "started $num processes (coordinator 127.0.0.1:$port, $devices CPU devices each), logs in $log_dir/" >&2

status=0
start=$SECONDS
left=$num
while [ "$left" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    left=$((left - 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "error: process $i exited with status $rc; stopping the others. Last lines of $log_dir/process_$i.log:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2 || true
      cleanup
    fi
  done
  if [ "$timeout" -gt 0 ] && [ $((SECONDS - start)) -ge "$timeout" ] && [ "$left" -gt 0 ]; then
    echo "error: timeout after ${timeout}s; stopping every process" >&2
    cleanup
    [ "$status" -eq 0 ] && status=124
  fi
  [ "$left" -gt 0 ] && sleep 0.5
done
trap - EXIT
exit "$status"
