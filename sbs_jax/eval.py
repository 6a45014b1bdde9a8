"""`python -m sbs_jax.eval`: evaluate a checkpoint (sbs_jax.cli.eval, `sbs-eval`)."""

if __name__ == "__main__":
    import sys

    from sbs_jax.cli import eval as eval_cli

    sys.exit(eval_cli.main())
