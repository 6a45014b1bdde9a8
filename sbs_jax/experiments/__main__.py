"""`python -m sbs_jax.experiments`: the experiment grid (sbs_jax.cli.experiments,
`sbs-experiments`)."""

import sys

from sbs_jax.cli import experiments

if __name__ == "__main__":
    sys.exit(experiments.main())
