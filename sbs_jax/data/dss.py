"""Readers and input templates for the data released with the paper (esnli, anli1, cqa, svamp).

Input formatting follows the reference method:
- NLI (esnli, anli1): premise, the EOS token, hypothesis. A record's `input` holds
  `premise</s>hypothesis`; the SeqIO tasks turn the separator into the EOS *token id* (never the
  text "</s>"), as the reference joins the two with the tokenizer's EOS.
- cqa: the question, a newline, "Answer Choices:", then one line per choice "(a) ..." .. "(e) ...".
- svamp: the `input` field (Body + "\\n" + Question) as released.
Labels: NLI label names; cqa the answer text; svamp the equation string such as `( 84.0 / 2.0 )`.
"""

from __future__ import annotations

NLI_SEPARATOR = "</s>"
NLI_LABELS = ("entailment", "neutral", "contradiction")


def join_nli_input(premise: str, hypothesis: str) -> str:
    """The record input of an NLI example."""
    return f"{premise}{NLI_SEPARATOR}{hypothesis}"


def split_nli_input(text: str) -> tuple[str, str]:
    """(premise, hypothesis) of an NLI record input (for prompts and display)."""
    premise, separator, hypothesis = text.partition(NLI_SEPARATOR)
    if not separator:
        raise ValueError(f"NLI input lacks the {NLI_SEPARATOR!r} separator: {text[:80]!r}")
    return premise, hypothesis


def format_cqa_input(question: str, choices: list[str]) -> str:
    """Question, newline, "Answer Choices:", then "(a) choice" lines."""
    lines = [question, "Answer Choices:"]
    lines += [f"({chr(ord('a') + i)}) {choice}" for i, choice in enumerate(choices)]
    return "\n".join(lines)
