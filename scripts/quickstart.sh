#!/usr/bin/env bash
# The README's first command: set up the environment (idempotent) and run the offline
# end-to-end quickstart. Extra arguments go to `python -m sbs_jax.quickstart`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh" ""
cd "$root"
exec "${SBS_VENV:-$root/.venv}/bin/python" -m sbs_jax.quickstart --output_dir "${SBS_QUICKSTART_DIR:-runs/quickstart}" "$@"
