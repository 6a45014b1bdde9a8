"""SIGTERM (a preemption notice): checkpoint after a step that every process agrees on, exit.

One process: a Python SIGTERM handler sets a flag that the loop reads once a step.

Several processes (jax.distributed): a per-process flag is not enough. Hosts see the signal at
different steps, or only one host gets it, and orbax's save is collective: processes entering it
at different steps wait for each other until the heartbeat timeout and die without a
checkpoint. JAX's preemption service (started by `jax.distributed.initialize` unless
`jax_enable_preemption_service` is off) catches SIGTERM in the runtime, tells every process
through the coordination service, and `multihost_utils.reached_preemption_sync_point(step)`
then returns True on all of them at the same step (one past the largest step any of them had
reached). No Python handler is installed there (it would replace the runtime's). With the
service off, SIGTERM keeps its default action (the process dies; a restart resumes from the
last periodic checkpoint) and a line on stderr says so.
"""

from __future__ import annotations

import signal
import sys
from typing import Self

import jax


class PreemptionNotice:
    """`reached(step)` is True at the step where every process should save and exit.

    Call it once per step, on every process, with the same step numbers (the sync protocol
    counts calls); use as a context manager around the loop.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._synchronised = False

    def __enter__(self) -> Self:
        if jax.process_count() > 1:
            self._synchronised = bool(jax.config.jax_enable_preemption_service)
            if not self._synchronised:
                print("sbs_jax.train.preemption: JAX's preemption service is off "
                      "(jax_enable_preemption_service): SIGTERM stops this process without a "
                      "checkpoint", file=sys.stderr, flush=True)
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: preemption handling stays off
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def reached(self, step: int) -> bool:
        """Whether to checkpoint after `step` and exit (the same answer on every process)."""
        if self._synchronised:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
