"""Few-shot chain-of-thought prompts from the files under `tasks/prompts/`.

A prompt file holds `#` comment lines at the top, then exemplars separated by blank lines (each a
question, a step-by-step rationale and the dataset's answer sentence, so that
`sbs_jax.data.parse` can read the teacher's continuation), then a `<<query>>` line and the query
template. The template names `{input}`, or `{premise}` and `{hypothesis}` for the NLI datasets.
Fields are substituted verbatim (no `str.format`, so braces in an input are harmless): the prompt
contains each input exactly as given.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

from sbs_jax.data.parse import DATASETS

QUERY_MARKER = "<<query>>"
_FIELD_RE = re.compile(r"\{(input|premise|hypothesis)\}")
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tasks", "prompts")


def _default_prompts_dir() -> str:
    """`tasks/prompts` of the installed `tasks` package (falls back to the source tree).

    Found without importing `tasks`, which would pull in seqio (seconds of start-up).
    """
    spec = importlib.util.find_spec("tasks")
    if spec is not None and spec.submodule_search_locations:
        return os.path.join(next(iter(spec.submodule_search_locations)), "prompts")
    return PROMPTS_DIR


class PromptTemplate:
    """The exemplars and query template of one dataset."""

    def __init__(self, exemplars: list[str], query: str, path: str = "<string>"):
        if not exemplars:
            raise ValueError(f"{path}: a prompt needs at least one exemplar")
        fields = set(_FIELD_RE.findall(query))
        if fields not in ({"input"}, {"premise", "hypothesis"}):
            raise ValueError(
                f"{path}: the query template must name {{input}} or both {{premise}} and "
                f"{{hypothesis}}; it names {sorted(fields) or 'none'}")
        self.exemplars = exemplars
        self.query = query
        self.fields = fields
        self.path = path
        self._prefix = "\n\n".join(exemplars) + "\n\n"

    @classmethod
    def from_text(cls, text: str, path: str = "<string>") -> PromptTemplate:
        lines = text.splitlines()
        while lines and lines[0].startswith("#"):
            lines.pop(0)
        body = "\n".join(lines)
        if QUERY_MARKER not in body:
            raise ValueError(f"{path}: no {QUERY_MARKER} line before the query template")
        examples_text, query = body.split(QUERY_MARKER, 1)
        exemplars = [block.strip() for block in re.split(r"\n\s*\n", examples_text)
                     if block.strip()]
        return cls(exemplars, query.strip("\n"), path)

    def render(self, fields: dict[str, str]) -> str:
        """The full prompt: exemplars, then the query with `fields` put in verbatim."""
        missing = self.fields - set(fields)
        if missing:
            raise ValueError(f"{self.path}: prompt needs field(s) {sorted(missing)}")
        query = _FIELD_RE.sub(lambda match: fields[match.group(1)], self.query)
        return self._prefix + query


@functools.cache
def load_prompt(dataset: str, prompts_dir: str | None = None) -> PromptTemplate:
    """The prompt of `dataset` from `{prompts_dir}/{dataset}.txt`."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    path = os.path.join(prompts_dir or _default_prompts_dir(), f"{dataset}.txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no prompt file for dataset {dataset!r} at {path}") from None
    return PromptTemplate.from_text(text, path)
