#!/usr/bin/env bash
# Creates (or reuses) .venv with the pinned stack. Idempotent: a stamp of the pinned inputs
# makes a second run a no-op. Usage: scripts/setup_env.sh [EXTRAS]   (e.g. "beam,torch,dev")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="${SBS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

stamp_input="$(cat "$root/pyproject.toml" "$root/requirements.lock"; echo "extras=$extras")"
stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)"
stamp_file="$venv/.sbs_stamp"

if [[ -f "$stamp_file" ]] && grep -qx "$stamp" "$stamp_file"; then
  exit 0
fi
if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >&2
target="$root"
[[ -n "$extras" ]] && target="$root[$extras]"
echo "[setup] installing sbs-jax${extras:+ [$extras]} with pinned dependencies (a few minutes the first time)" >&2
"$venv/bin/python" -m pip install -q -c "$root/requirements.lock" -e "$target" >&2
"$venv/bin/python" -m pip check >&2
# Keep stamps of every extras set installed so far: switching between the two README commands
# does not reinstall.
printf '%s\n' "$stamp" >> "$stamp_file"
