"""`python -m sbs_jax.train`: the trainer (sbs_jax.cli.train, `sbs-train`)."""

import sys

from sbs_jax.cli import train

if __name__ == "__main__":
    sys.exit(train.main())
