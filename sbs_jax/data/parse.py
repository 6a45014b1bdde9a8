"""Teacher completion -> (rationale, label), per dataset: the only place these rules live.

Few-shot chain-of-thought completions run on past the answer into an invented next exemplar
("Q: ...", "Premise: ..."), so each rule first cuts the completion there, then splits the
rationale from the label on the dataset's answer marker. The rules follow the reference method
(see ../shared/dss_data/README.md) so that teacher-label accuracy matches its published figures:

- cqa:   text before the first "Q:"; split on "So the answer is"; the label is the text after the
         "(x)" choice marker, without a final ".".
- svamp: text before the first "Q:"; split on "The answer is"; the label is the parenthesised
         expression (outermost parentheses, greedy).
- esnli: the rationale is the text before "Answer:"; the label lies between "Answer: " and the
         next "Premise".
- anli1: text before the first "Premise:", trailing whitespace stripped; split on
         "So the answer is"; the label is the rest without leading space and final ".".
- synthetic: our own prompts' format, `<rationale> So the answer is <label>.`, cut before the
         next exemplar (a blank line or "Q:").

Labels are returned as parsed (no normalisation into the label space: the reference does none).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

DATASETS = ("esnli", "anli1", "cqa", "svamp", "synthetic")


@dataclass(frozen=True)
class ParsedCompletion:
    """A teacher completion split into its rationale and label (None when no label parses)."""

    rationale: str
    label: str | None

    @property
    def ok(self) -> bool:
        """True when both a label and a non-empty rationale were found."""
        return self.label is not None and bool(self.rationale.strip())


# Where the answer marker is missing (or repeated) nothing can be attributed to either part: the
# reference then records an empty rationale, and so do we.
_NO_PARSE = ParsedCompletion("", None)
# The answer sentence of the cqa/anli1 teacher completions and of our own (synthetic) format.
ANSWER_MARKER = "So the answer is"


def _strip_final_period(text: str) -> str:
    return text.removesuffix(".")


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
    """Splits on `marker` when it occurs exactly once (the reference unpacks two parts)."""
    parts = text.split(marker)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _parse_cqa(completion: str) -> ParsedCompletion:
    body = completion.split("Q:")[0].rstrip()
    split = _split_once(body, ANSWER_MARKER)
    if split is None:
        return _NO_PARSE
    rationale, rest = split
    after_marker = re.split(r"\(.\)", rest)
    if len(after_marker) < 2:
        return ParsedCompletion(rationale.rstrip(), None)
    label = _strip_final_period(after_marker[1].strip())
    return ParsedCompletion(rationale.rstrip(), label or None)


def _parse_svamp(completion: str) -> ParsedCompletion:
    body = completion.split("Q:")[0].rstrip()
    split = _split_once(body, "The answer is")
    if split is None:
        return _NO_PARSE
    rationale, rest = split
    match = re.search(r"\(.*\)", rest)
    return ParsedCompletion(rationale.rstrip(), match.group(0) if match else None)


def _parse_esnli(completion: str) -> ParsedCompletion:
    rationale = completion.split("Answer:")[0].rstrip()
    parts = completion.split("Answer: ")
    if len(parts) < 2:
        return ParsedCompletion(rationale, None)
    label = parts[1].split("Premise")[0].strip()
    return ParsedCompletion(rationale, label or None)


def _parse_anli1(completion: str) -> ParsedCompletion:
    body = completion.split("Premise:")[0].rstrip()
    split = _split_once(body, ANSWER_MARKER)
    if split is None:
        return _NO_PARSE
    rationale, rest = split
    label = _strip_final_period(rest.lstrip())
    return ParsedCompletion(rationale.rstrip(), label or None)


def _parse_synthetic(completion: str) -> ParsedCompletion:
    body = re.split(r"\n\s*\n|Q:", completion, maxsplit=1)[0].strip()
    head, marker, rest = body.rpartition(ANSWER_MARKER)
    if not marker:
        return _NO_PARSE
    label = _strip_final_period(rest.strip()).strip()
    return ParsedCompletion(head.strip(), label or None)


_PARSERS: dict[str, Callable[[str], ParsedCompletion]] = {
    "esnli": _parse_esnli,
    "anli1": _parse_anli1,
    "cqa": _parse_cqa,
    "svamp": _parse_svamp,
    "synthetic": _parse_synthetic,
}


def parse_completion(dataset: str, completion: str) -> ParsedCompletion:
    """Cuts `completion` before the invented next exemplar and splits rationale from label."""
    try:
        parser = _PARSERS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}") from None
    return parser(completion)
