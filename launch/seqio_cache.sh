#!/usr/bin/env bash
# Cache (pre-tokenise) sbs SeqIO tasks with seqio's cache_tasks_main on Apache Beam.
#
# Usage: launch/seqio_cache.sh --tasks REGEX[,REGEX...] --output_cache_dir DIR
#                              [--data_dir DIR] [--vocab PATH] [--min_shards N] [--dry_run]
#                              [-- extra cache_tasks_main flags]
#   --tasks             task-name regexes, e.g. 'cqa_.*' or 'synthetic_label_gt,synthetic_rationale'
#   --output_cache_dir  where cached tasks go (local path or gs://...)
#   --data_dir / --vocab  exported as SBS_DATA_DIR / SBS_VOCAB (see tasks/config.py)
#   --min_shards        output shards per split (default 1 locally; cache_tasks_main's own
#                       default is 64, better for shuffling large training splits)
# Runs locally with Beam's DirectRunner. On Google Cloud Dataflow pass Beam options instead:
#   PIPELINE_OPTIONS=--runner=DataflowRunner,--project=P,--region=R,--temp_location=gs://B/tmp,\
#   --setup_file=./setup.py,--experiments=use_runner_v2 launch/seqio_cache.sh ...
#   (data dir, vocabulary and cache dir must then be gs:// paths the workers can read).
# Training reads the cache with `PairedBatches(..., use_cached=True)` after
# `seqio.add_global_cache_dirs([DIR])`.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

TASKS="" CACHE_DIR="" MIN_SHARDS=1 DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tasks) TASKS="$2"; shift 2 ;;
    --output_cache_dir) CACHE_DIR="$2"; shift 2 ;;
    --data_dir) export SBS_DATA_DIR="$2"; shift 2 ;;
    --vocab) export SBS_VOCAB="$2"; shift 2 ;;
    --min_shards) MIN_SHARDS="$2"; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "seqio_cache.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$TASKS" || -z "$CACHE_DIR" ]]; then
  echo "seqio_cache.sh: --tasks and --output_cache_dir are required (see --help)" >&2
  exit 2
fi

CMD=("${PYTHON:-python}" -m seqio.scripts.cache_tasks_main
     --module_import=tasks
     --tasks="$TASKS"
     --output_cache_dir="$CACHE_DIR"
     --min_shards="$MIN_SHARDS"
     --pipeline_options="${PIPELINE_OPTIONS:---runner=DirectRunner}"
     "${EXTRA[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
