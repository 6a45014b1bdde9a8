"""`python -m sbs_jax.convert`: HF T5 directory <-> MODEL_DIR (sbs_jax.cli.convert,
`sbs-convert`)."""

if __name__ == "__main__":
    import sys

    from sbs_jax.cli import convert

    sys.exit(convert.main())
