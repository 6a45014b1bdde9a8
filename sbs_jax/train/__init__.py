"""Training: the sharded train step (step), the loop around it (loop), mesh and shardings
(partitioning), the objective (losses), optimizers (optim), MODEL_DIR's checkpoints
(checkpoints, checksums), settings (run_config), run records (run_files), the trainer lock
(run_lock), preemption, the initial checkpoint and HF conversion (convert).

`python -m sbs_jax.train` runs the trainer (`sbs_jax.cli.train`, the `sbs-train` script).
"""
