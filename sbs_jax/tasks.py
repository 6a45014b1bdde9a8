"""`python -m sbs_jax.tasks --list [REGEX]`: the registered SeqIO tasks and mixtures, as
`python -m tasks --list` prints them (the registrations live in the top-level `tasks` package)."""

import sys

from tasks.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sbs_jax.tasks"))
