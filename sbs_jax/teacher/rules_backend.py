"""The deterministic rule-based teacher of the built-in synthetic dataset (no model, no HTTP).

It answers with exactly the completion format the synthetic prompt teaches,
`<rationale> So the answer is <label>.`, so its output goes through the same parsing and record
writing as a real teacher's: the quickstart exercises the whole teacher job offline, in seconds.
"""

from __future__ import annotations

from typing import Self

from sbs_jax.data import synthetic
from sbs_jax.data.parse import ANSWER_MARKER
from sbs_jax.teacher.http_backend import Generation, TeacherError


class RulesBackend:
    """`generate` solves the input with `sbs_jax.data.synthetic.solve`."""

    name = "rules"
    model = "rules"

    def __init__(self, dataset: str):
        if dataset != "synthetic":
            raise ValueError(f"the rules backend only knows the synthetic dataset, not {dataset!r}")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def generate(self, prompt: str, num_samples: int = 1,
                       input_text: str = "") -> Generation:
        try:
            rationale, label = synthetic.solve(input_text)
        except ValueError as exc:
            raise TeacherError(f"rules teacher cannot solve it: {exc}", final=True) from None
        completion = f" {rationale} {ANSWER_MARKER} {label}."
        return Generation([completion] * num_samples, 0, 0, 0)
