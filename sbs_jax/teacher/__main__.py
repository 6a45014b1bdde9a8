"""`python -m sbs_jax.teacher`: the teacher batch-inference job (sbs_jax.cli.teacher,
`sbs-teacher`)."""

import sys

from sbs_jax.cli import teacher

if __name__ == "__main__":
    sys.exit(teacher.main())
