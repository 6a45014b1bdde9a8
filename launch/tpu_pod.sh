#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4 / v5e / v5p / v6e): create the slice, ship this checkout to
# every worker, install the pinned environment there, run `python -m sbs_jax.train` on all
# workers at once (their output streams here), and delete the slice on request.
#
#   launch/tpu_pod.sh --name sbs-v4 --project my-proj --zone us-central2-b \
#     --accelerator_type v4-32 --gin_file gin/sbs_large.gin --model_dir gs://my-bucket/sbs/run1 --dry_run
#
# Every process finds the others from the slice's metadata (sbs_jax.runtime.distributed); the model
# directory must be on gs:// because every worker writes checkpoints and TensorBoard there.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --project PROJECT --zone ZONE --accelerator_type TYPE
                         --gin_file FILE --model_dir gs://BUCKET/DIR [options] [--gin.X=V ...]

required:
  --name NAME               TPU VM name (lowercase letters, digits, hyphens)
  --project PROJECT         Google Cloud project
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --accelerator_type TYPE   v4-N, v5e-N (= v5litepod-N), v5p-N or v6e-N, e.g. v4-32
  --gin_file FILE           training config inside this checkout; repeatable
  --model_dir gs://...      checkpoints + TensorBoard summaries (bound to MODEL_DIR)
options:
  --runtime_version V       TPU VM image (default: the one for the accelerator generation)
  --data_dir gs://...       SBS_DATA_DIR on the workers (the built TFRecords)
  --compilation_cache_dir gs://...
                            XLA's persistent compilation cache, shared by the workers
                            (JAX_COMPILATION_CACHE_DIR; default MODEL_DIR/jax_compilation_cache)
  --spot                    create a Spot slice
  --python P                Python on the workers (default python3.11, installed with apt)
  --skip_create             reuse an existing slice
  --skip_install            reuse the environment already installed on the workers
  --remote_dir DIR          the code folder on the workers, under ~ (default sbs-jax); the
                            launcher only ever replaces or removes the files it shipped there
  --teardown                delete the slice when training ends (success or failure), if this
                            command created it (a slice that existed before is left alone)
  --teardown_only           only delete the slice
  --dry_run                 print every command, run nothing (no gcloud needed)
  --gin.NAME=VALUE, --gin_bindings=B, --gin_search_paths=P
                            passed to sbs_jax.train unchanged
  -h, --help                this help
EOF
}

die() { echo "tpu_pod.sh: error: $*" >&2; echo "(see --help)" >&2; exit 2; }

NAME="" PROJECT="" ZONE="" ACCELERATOR_TYPE="" MODEL_DIR="" DATA_DIR="" RUNTIME_VERSION="" REMOTE_DIR="sbs-jax"
CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-}"
WORKER_PYTHON="python3.11" SPOT=0 SKIP_CREATE=0 SKIP_INSTALL=0 TEARDOWN=0 TEARDOWN_ONLY=0
DRY_RUN="${SBS_DRY_RUN:-0}"
GIN_FILES=() TRAIN_EXTRA=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  if [[ "$arg" == --*=* && "$arg" != --gin.* && "$arg" != --gin_bindings=* && "$arg" != --gin_search_paths=* ]]; then
    set -- "${arg%%=*}" "${arg#*=}" "${@:2}"   # --flag=value -> --flag value
    continue
  fi
  case "$arg" in
    --name|--project|--zone|--accelerator_type|--gin_file|--model_dir|--data_dir|--runtime_version|--python|--remote_dir|--compilation_cache_dir)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$arg needs a value"
      case "$arg" in
        --name) NAME="$2" ;; --project) PROJECT="$2" ;; --zone) ZONE="$2" ;;
        --accelerator_type) ACCELERATOR_TYPE="$2" ;; --gin_file) GIN_FILES+=("$2") ;;
        --model_dir) MODEL_DIR="$2" ;; --data_dir) DATA_DIR="$2" ;;
        --runtime_version) RUNTIME_VERSION="$2" ;; --python) WORKER_PYTHON="$2" ;;
        --remote_dir) REMOTE_DIR="$2" ;; --compilation_cache_dir) CACHE_DIR="$2" ;;
      esac
      shift 2 ;;
    --gin.*|--gin_bindings=*|--gin_search_paths=*) TRAIN_EXTRA+=("$arg"); shift ;;
    --spot) SPOT=1; shift ;;
    --skip_create) SKIP_CREATE=1; shift ;;
    --skip_install) SKIP_INSTALL=1; shift ;;
    --teardown) TEARDOWN=1; shift ;;
    --teardown_only) TEARDOWN_ONLY=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$arg'" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
  || die "--name '$NAME' must be lowercase letters, digits and hyphens, starting with a letter"
[[ -n "$PROJECT" ]] || die "--project is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-central2-b)"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

# One argument as the shell would need it typed: bare when safe, else in single quotes.
shell_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints the command (dry run) or runs it.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    local word sep=""
    for word in "$@"; do printf '%s' "$sep"; shell_word "$word"; sep=" "; done
    echo
  else
    echo "+ $*" >&2
    "$@"
  fi
}

delete_slice() { run "${GCLOUD_TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

if (( TEARDOWN_ONLY )); then
  delete_slice
  exit 0
fi

[[ -n "$ACCELERATOR_TYPE" ]] || die "--accelerator_type is required (e.g. v4-32)"
[[ "$ACCELERATOR_TYPE" =~ ^(v4|v5e|v5litepod|v5p|v6e)-([0-9]+)$ ]] \
  || die "--accelerator_type '$ACCELERATOR_TYPE' must be v4-N, v5e-N, v5litepod-N, v5p-N or v6e-N"
GENERATION="${BASH_REMATCH[1]}"
[[ "$GENERATION" == "v5e" ]] && ACCELERATOR_TYPE="v5litepod-${BASH_REMATCH[2]}" && GENERATION="v5litepod"
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$GENERATION" in
    v4) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
  esac
fi
(( ${#GIN_FILES[@]} > 0 )) || die "--gin_file is required (e.g. gin/sbs_large.gin)"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for gin_file in "${GIN_FILES[@]}"; do
  [[ "$gin_file" != /* ]] || die "--gin_file '$gin_file' must be relative to the checkout (it is shipped with the code)"
  [[ -f "$REPO_ROOT/$gin_file" ]] || die "--gin_file '$gin_file' not found in $REPO_ROOT"
  git -C "$REPO_ROOT" ls-files --error-unmatch -- "$gin_file" >/dev/null 2>&1 \
    || die "--gin_file '$gin_file' is not tracked by git, so it would not be shipped (git add it)"
done
[[ -n "$MODEL_DIR" ]] || die "--model_dir gs://... is required"
[[ "$MODEL_DIR" =~ ^gs://[^[:space:]\'\"\\]+$ ]] \
  || die "--model_dir '$MODEL_DIR' must be a gs:// path (every worker writes there), without quotes or spaces"
[[ -z "$DATA_DIR" || "$DATA_DIR" == gs://?* ]] || die "--data_dir '$DATA_DIR' must be on gs:// (every worker reads it)"
CACHE_DIR="${CACHE_DIR:-$MODEL_DIR/jax_compilation_cache}"
[[ "$CACHE_DIR" =~ ^gs://[^[:space:]\'\"\\]+$ ]] \
  || die "--compilation_cache_dir '$CACHE_DIR' must be a gs:// path (every worker shares it)"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ && "$REMOTE_DIR" != *..* ]] \
  || die "--remote_dir '$REMOTE_DIR' must be a plain relative path under the home folder (e.g. sbs-jax)"
for extra in "${TRAIN_EXTRA[@]}"; do
  [[ "$extra" != --gin.MODEL_DIR=* ]] || die "give the model directory as --model_dir, not $extra"
done

# --teardown deletes only a slice this command created: OWN_SLICE is set just before creating one
# that did not exist (a failed create may still leave it behind, and it is ours).
OWN_SLICE=0
teardown() {
  if (( OWN_SLICE )); then
    echo "tpu_pod.sh: deleting slice $NAME (--teardown; this command created it)" >&2
    delete_slice
  else
    echo "tpu_pod.sh: not deleting slice $NAME: this command did not create it" \
         "(--teardown_only deletes it)" >&2
  fi
}
if (( TEARDOWN )) && [[ "$DRY_RUN" != "1" ]]; then
  trap 'status=$?; teardown || true; exit $status' EXIT
fi

# 1. the slice
if (( ! SKIP_CREATE )); then
  create=("${GCLOUD_TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  (( SPOT )) && create+=(--spot)
  if [[ "$DRY_RUN" != "1" ]] && "${GCLOUD_TPU[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: slice $NAME already exists; reusing it" >&2
  else
    OWN_SLICE=1
    run "${create[@]}"
  fi
fi

ssh_all() { run "${GCLOUD_TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

# 2. the code: exactly the tracked files of this checkout, into ~/$REMOTE_DIR on every worker.
# The folder's .sbs-shipped lists what the last sync shipped: only those files are replaced or
# removed; anything else there (.venv, outputs, your files) stays. A non-empty folder without
# that list was not made by this launcher: the sync stops without touching it.
TARBALL="${TMPDIR:-/tmp}/sbs_jax_${NAME}.tar.gz"
run bash -c "cd $(printf '%q' "$REPO_ROOT") && git ls-files -z | tar --null -T - -czf $(printf '%q' "$TARBALL")"
run "${GCLOUD_TPU[@]}" scp "$TARBALL" "$NAME:sbs_jax_code.tar.gz" "${WHERE[@]}" --worker=all
sync='set -e; d=~/'"$REMOTE_DIR"'; m=$d/.sbs-shipped; new=$(mktemp); mkdir -p "$d"; '\
'if [ ! -f "$m" ] && [ -n "$(ls -A "$d")" ]; then echo "tpu_pod.sh: $d was not made by tpu_pod.sh'\
' (no .sbs-shipped): not touching it; move it away or pass --remote_dir" >&2; exit 3; fi; '\
'tar -tzf ~/sbs_jax_code.tar.gz | grep -v "/$" | sort > "$new"; gone=0; '\
'if [ -f "$m" ]; then while IFS= read -r f; do rm -f -- "$d/$f"; gone=$((gone + 1)); '\
'done < <(sort "$m" | comm -23 - "$new"); fi; '\
'tar -xzf ~/sbs_jax_code.tar.gz -C "$d"; mv "$new" "$m"; '\
'echo "tpu_pod.sh: $d: $(wc -l < "$m") tracked files written over those of the last sync,'\
' $gone it had shipped and git no longer tracks removed, nothing else touched" >&2'
ssh_all "$sync"

# 3. the pinned environment on every worker (scripts/setup_env.sh: pip install -c requirements.lock -e '.[tpu]')
if (( ! SKIP_INSTALL )); then
  # Ubuntu's Python needs its -venv package for `python -m venv` (ensurepip).
  install="set -e; $WORKER_PYTHON -c 'import ensurepip' 2>/dev/null"
  install+=" || (sudo apt-get update -qq && sudo apt-get install -y -qq $WORKER_PYTHON ${WORKER_PYTHON}-venv)"
  install+="; cd ~/$REMOTE_DIR && PYTHON=$WORKER_PYTHON scripts/setup_env.sh tpu"
  ssh_all "$install"
fi

# 4. training on all workers at once; every worker's output streams here and into ~/train.log
train=(.venv/bin/python -m sbs_jax.train)
for gin_file in "${GIN_FILES[@]}"; do train+=("--gin_file=$gin_file"); done
train+=("--gin.MODEL_DIR=\"$MODEL_DIR\"" "${TRAIN_EXTRA[@]}")
# A persistent compilation cache: a resumed or repeated run loads its compiled programs.
env_prefix="JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$CACHE_DIR") "
[[ -z "$DATA_DIR" ]] || env_prefix+="SBS_DATA_DIR=$(printf '%q' "$DATA_DIR") "
ssh_all "cd ~/$REMOTE_DIR && ${env_prefix}$(printf '%q ' "${train[@]}")2>&1 | tee -a ~/train.log; exit \${PIPESTATUS[0]}"

echo "tpu_pod.sh: TensorBoard: tensorboard --logdir $MODEL_DIR" >&2
if (( TEARDOWN )) && [[ "$DRY_RUN" == "1" ]]; then
  teardown
fi
