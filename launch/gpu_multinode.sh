#!/usr/bin/env bash
# Train on GPU machines without a scheduler: run this script once on every node (by ssh, pdsh,
# a Kubernetes indexed job, ...) with the same arguments except --node_rank. Each node runs one
# JAX process that sees all of its GPUs; node 0 serves the coordinator.
#
#   # on node 0 (10.0.0.1) and node 1:
#   launch/gpu_multinode.sh --coordinator 10.0.0.1:7777 --num_nodes 2 --node_rank 0 -- \
#       --gin_file=gin/sbs_large.gin --gin.MODEL_DIR="'/shared/runs/r1'"
#   launch/gpu_multinode.sh --coordinator 10.0.0.1:7777 --num_nodes 2 --node_rank 1 -- ...
#
# MODEL_DIR must be on a filesystem every node sees. Install once per node (or on shared
# storage): scripts/setup_env.sh cuda
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_multinode.sh --coordinator HOST:PORT --num_nodes N --node_rank I [options] -- ARGS...

  --coordinator HOST:PORT  address of node 0, reachable from every node (JAX_COORDINATOR_ADDRESS)
  --num_nodes N            nodes in the job (JAX_NUM_PROCESSES)
  --node_rank I            this node, 0 .. N-1 (JAX_PROCESS_ID)
  --python P               interpreter (default: .venv/bin/python of this checkout)
  --dry_run                print the command, run nothing (same as SBS_DRY_RUN=1)
  -h, --help               this help
Everything after `--` goes to `python -m sbs_jax.train` (or to $SBS_ENTRY_MODULE, e.g.
sbs_jax.cli.cluster_check for a cluster check). XLA's persistent compilation cache is
$JAX_COMPILATION_CACHE_DIR (default ~/.cache/sbs_jax/jax_compilation_cache).
EOF
}

die() { echo "gpu_multinode.sh: error: $*" >&2; echo "(see --help)" >&2; exit 2; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COORDINATOR="" NUM_NODES="" NODE_RANK="" PYTHON="$REPO_DIR/.venv/bin/python"
DRY_RUN="${SBS_DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) COORDINATOR="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --num_nodes) NUM_NODES="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --node_rank) NODE_RANK="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --python) PYTHON="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (training arguments go after --)" ;;
  esac
done

[[ "$COORDINATOR" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '${COORDINATOR}'"
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die "--num_nodes must be a positive integer, got '${NUM_NODES}'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NUM_NODES )) \
  || die "--node_rank must be in 0..$(( NUM_NODES - 1 )), got '${NODE_RANK}'"
[[ -n "${SBS_ENTRY_MODULE:-}" ]] || (( $# > 0 )) \
  || die "pass the training arguments after --, e.g. -- --gin_file=gin/sbs_large.gin"

# A persistent compilation cache: a resumed or repeated run loads its compiled programs.
CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sbs_jax/jax_compilation_cache}"
cmd=(env "JAX_COORDINATOR_ADDRESS=$COORDINATOR" "JAX_NUM_PROCESSES=$NUM_NODES"
     "JAX_PROCESS_ID=$NODE_RANK" "JAX_COMPILATION_CACHE_DIR=$CACHE_DIR" "$PYTHON" -m "${SBS_ENTRY_MODULE:-sbs_jax.train}" "$@")
if [[ "$DRY_RUN" == "1" ]]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
[[ -x "$PYTHON" ]] || die "$PYTHON not found; run scripts/setup_env.sh cuda (or pass --python)"
cd "$REPO_DIR"
exec "${cmd[@]}"
