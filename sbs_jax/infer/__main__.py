"""`python -m sbs_jax.infer`: predictions JSONL (sbs_jax.cli.infer, `sbs-infer`)."""

import sys

from sbs_jax.cli import infer

if __name__ == "__main__":
    sys.exit(infer.main())
