"""`python -m sbs_jax.quickstart`: the offline end-to-end demo (sbs_jax.cli.quickstart,
`sbs-quickstart`)."""

if __name__ == "__main__":
    import sys

    from sbs_jax.cli import quickstart

    sys.exit(quickstart.main())
