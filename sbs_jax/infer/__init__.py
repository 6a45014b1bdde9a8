"""Using a trained model: KV-cache decoding (decoding), validation by decoding a task's metric
(evaluation, metrics), and what inference reads (inputs).

`python -m sbs_jax.infer` writes predictions (`sbs_jax.cli.infer`, the `sbs-infer` script).
"""
