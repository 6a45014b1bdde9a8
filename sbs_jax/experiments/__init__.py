"""The paper's experiment grid and the quickstart: what each cell runs (grid), running the cells
through the public commands (runner), tables and plots of their results (report), and the
offline end-to-end demo (quickstart).

`python -m sbs_jax.experiments` runs the grid (`sbs_jax.cli.experiments`, `sbs-experiments`).
"""
