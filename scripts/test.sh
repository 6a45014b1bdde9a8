#!/usr/bin/env bash
# The README's second command: set up the environment (idempotent) and run the test suite.
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh" "beam,torch,dev"
cd "$root"
# pytest exits 5 when it collected no test: that is a failure too.
exec "${SBS_VENV:-$root/.venv}/bin/python" -m pytest "$@"
