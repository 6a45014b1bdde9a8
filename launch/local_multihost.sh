#!/usr/bin/env bash
# Run N JAX processes on this machine (127.0.0.1), each with D virtual CPU devices: the
# multi-host code path (jax.distributed, per-process data shards, orbax multi-process
# checkpoints) exercised on a laptop or CI box.
#
#   launch/local_multihost.sh -n 2 -d 4 -- --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'/tmp/m'"
#
# Every process runs the same entry point (default `python -m sbs_jax.train`) with the same
# arguments; sbs_jax.runtime.distributed.initialize_from_env() reads JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment set here. Each process logs to
# LOG_DIR/process_<i>.log (process 0 is also echoed to the terminal). When any process fails,
# the others are stopped and the script exits with that process's status.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_multihost.sh -n NUM_PROCESSES -d DEVICES_PER_PROCESS [options] -- ARGS...

  -n, --num_processes N   JAX processes to start on 127.0.0.1 (>= 1)
  -d, --devices D         virtual CPU devices per process (XLA_FLAGS host platform count)
  --port P                coordinator port (default: a free port)
  --log_dir DIR           per-process logs (default: a new folder under ${TMPDIR:-/tmp})
  --module M              Python module each process runs (default: sbs_jax.train;
                          sbs_jax.cli.cluster_check runs the cluster smoke test)
  --dry_run               print the commands, run nothing (same as SBS_DRY_RUN=1)
  -h, --help              this help
Everything after `--` is passed to every process unchanged. XLA's persistent compilation cache
is $JAX_COMPILATION_CACHE_DIR (default ~/.cache/sbs_jax/jax_compilation_cache).
EOF
}

die() { echo "local_multihost.sh: error: $*" >&2; echo "(see --help)" >&2; exit 2; }

NUM_PROCESSES="" DEVICES="" PORT="" LOG_DIR="" MODULE="${SBS_ENTRY_MODULE:-sbs_jax.train}"
DRY_RUN="${SBS_DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num_processes) NUM_PROCESSES="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -d|--devices) DEVICES="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --port) PORT="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --log_dir) LOG_DIR="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --module) MODULE="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (arguments for the processes go after --)" ;;
  esac
done

is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_positive_int "$NUM_PROCESSES" || die "-n NUM_PROCESSES must be a positive integer, got '${NUM_PROCESSES}'"
is_positive_int "$DEVICES" || die "-d DEVICES_PER_PROCESS must be a positive integer, got '${DEVICES}'"
[[ -z "$PORT" ]] || { is_positive_int "$PORT" && (( PORT < 65536 )); } || die "--port must be 1-65535, got '${PORT}'"
[[ -n "$MODULE" ]] || die "--module must not be empty"

PYTHON="${PYTHON:-python}"
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$LOG_DIR" ]]; then
  if [[ "$DRY_RUN" == "1" ]]; then
    LOG_DIR="${TMPDIR:-/tmp}/sbs_multihost.XXXXXX"
  else
    LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sbs_multihost.XXXXXX")"
  fi
fi

# A persistent compilation cache: a resumed or repeated run loads its compiled programs.
CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sbs_jax/jax_compilation_cache}"
process_env() {  # sets ENV_VARS to the environment of process $1
  ENV_VARS=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES}"
            "JAX_COORDINATOR_ADDRESS=127.0.0.1:${PORT}" "JAX_NUM_PROCESSES=${NUM_PROCESSES}"
            "JAX_PROCESS_ID=$1" "JAX_COMPILATION_CACHE_DIR=${CACHE_DIR}" PYTHONUNBUFFERED=1)
}

if [[ "$DRY_RUN" == "1" ]]; then
  for (( i = 0; i < NUM_PROCESSES; i++ )); do
    process_env "$i"
    printf '%q ' env "${ENV_VARS[@]}" "$PYTHON" -m "$MODULE" "$@"
    printf '> %q 2>&1 &\n' "${LOG_DIR}/process_${i}.log"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
echo "local_multihost: ${NUM_PROCESSES} processes x ${DEVICES} CPU devices, coordinator 127.0.0.1:${PORT}, logs in ${LOG_DIR}" >&2

declare -A PROCESS_OF_PID=()
PIDS=()
stop_all() {  # stop every process still running: TERM, then KILL after a grace period
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 12); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.25
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "local_multihost: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for (( i = 0; i < NUM_PROCESSES; i++ )); do
  log="${LOG_DIR}/process_${i}.log"
  process_env "$i"
  env "${ENV_VARS[@]}" "$PYTHON" -m "$MODULE" "$@" >"$log" 2>&1 &
  PIDS+=("$!")
  PROCESS_OF_PID[$!]=$i
  echo "$!" >"${LOG_DIR}/process_${i}.pid"
done

TAIL_PID=""
if [[ -t 2 ]]; then
  tail -n +1 -f "${LOG_DIR}/process_0.log" >&2 &
  TAIL_PID=$!
fi

status=0
RUNNING=("${PIDS[@]}")
while (( ${#RUNNING[@]} > 0 )); do
  finished_pid=""
  rc=0
  wait -n -p finished_pid "${RUNNING[@]}" || rc=$?
  [[ -n "$finished_pid" ]] || break
  still=()
  for pid in "${RUNNING[@]}"; do [[ "$pid" == "$finished_pid" ]] || still+=("$pid"); done
  RUNNING=("${still[@]}")
  if (( rc != 0 )); then
    i=${PROCESS_OF_PID[$finished_pid]}
    echo "local_multihost: process ${i} exited with status ${rc}; stopping the others." \
         "Its log: ${LOG_DIR}/process_${i}.log" >&2
    tail -n 20 "${LOG_DIR}/process_${i}.log" | sed "s/^/[process ${i}] /" >&2
    status=$rc
    stop_all
    wait || true
    break
  fi
done
[[ -z "$TAIL_PID" ]] || kill "$TAIL_PID" 2>/dev/null || true
if (( status == 0 )); then
  echo "local_multihost: all ${NUM_PROCESSES} processes finished; logs in ${LOG_DIR}" >&2
fi
exit "$status"
