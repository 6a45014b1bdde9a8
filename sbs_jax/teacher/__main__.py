"""`python -m sbs_jax.teacher`: the teacher batch-inference job (see sbs_jax.teacher.cli)."""

import sys

from sbs_jax.teacher.cli import main

if __name__ == "__main__":
    sys.exit(main())
