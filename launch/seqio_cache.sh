#!/usr/bin/env bash
# Cache (pre-tokenise) sbs SeqIO tasks with seqio's cache_tasks_main on Apache Beam.
# `launch/seqio_cache.sh --help` for the flags.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/seqio_cache.sh --tasks REGEX[,REGEX...] --output_cache_dir DIR
                             [--data_dir DIR] [--vocab PATH] [--min_shards N] [--dry_run]
                             [-- extra cache_tasks_main flags]

Caches (pre-tokenises) SeqIO tasks with seqio's cache_tasks_main on Apache Beam (install the
`beam` extra: scripts/setup_env.sh beam).

  --tasks REGEX,...      task-name regexes, e.g. 'cqa_.*' or 'synthetic_label_gt,synthetic_rationale'
  --output_cache_dir DIR where cached tasks go (local path or gs://...)
  --data_dir DIR         exported as SBS_DATA_DIR (the built record folders)
  --vocab PATH           exported as SBS_VOCAB (default: DATA_DIR/spiece.model)
  --min_shards N         output shards per split (default 1 locally; cache_tasks_main's own
                         default is 64, better for shuffling large training splits)
  --dry_run              print the command, run nothing (same as SBS_DRY_RUN=1)
  -h, --help             this help

Runs locally with Beam's DirectRunner. On Google Cloud Dataflow pass Beam options instead:
  PIPELINE_OPTIONS=--runner=DataflowRunner,--project=P,--region=R,--temp_location=gs://B/tmp,\
--setup_file=./setup.py,--experiments=use_runner_v2 launch/seqio_cache.sh ...
(data dir, vocabulary and cache dir must then be gs:// paths the workers can read).
Train, eval and infer read the cache with --gin.USE_CACHED_TASKS=True
--seqio_additional_cache_dirs=DIR (T5X's flags).
EOF
}

die() { echo "seqio_cache.sh: error: $*" >&2; echo "(see --help)" >&2; exit 2; }

TASKS="" CACHE_DIR="" MIN_SHARDS=1 DRY_RUN="${SBS_DRY_RUN:-0}" EXTRA=()
while [[ $# -gt 0 ]]; do
  arg="$1"
  if [[ "$arg" == --*=* ]]; then
    set -- "${arg%%=*}" "${arg#*=}" "${@:2}"   # --flag=value -> --flag value
    continue
  fi
  case "$arg" in
    --tasks|--output_cache_dir|--data_dir|--vocab|--min_shards)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$arg needs a value"
      case "$arg" in
        --tasks) TASKS="$2" ;; --output_cache_dir) CACHE_DIR="$2" ;;
        --data_dir) export SBS_DATA_DIR="$2" ;; --vocab) export SBS_VOCAB="$2" ;;
        --min_shards) MIN_SHARDS="$2" ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$arg'" ;;
  esac
done
[[ -n "$TASKS" ]] || die "--tasks is required"
[[ -n "$CACHE_DIR" ]] || die "--output_cache_dir is required"
[[ "$MIN_SHARDS" =~ ^[1-9][0-9]*$ ]] || die "--min_shards must be a positive integer, got '$MIN_SHARDS'"

CMD=("${PYTHON:-python}" -m seqio.scripts.cache_tasks_main
     --module_import=tasks
     --tasks="$TASKS"
     --output_cache_dir="$CACHE_DIR"
     --min_shards="$MIN_SHARDS"
     --pipeline_options="${PIPELINE_OPTIONS:---runner=DirectRunner}"
     "${EXTRA[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  env_words=()
  [[ -z "${SBS_DATA_DIR:-}" ]] || env_words+=("SBS_DATA_DIR=$SBS_DATA_DIR")
  [[ -z "${SBS_VOCAB:-}" ]] || env_words+=("SBS_VOCAB=$SBS_VOCAB")
  (( ${#env_words[@]} == 0 )) || printf '%q ' env "${env_words[@]}"
  printf '%q ' "${CMD[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${CMD[@]}"
