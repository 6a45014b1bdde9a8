"""Teacher-completion parsing: cut before the invented next exemplar, per-dataset markers."""

import pytest

from sbs_jax.data.parse import ParsedCompletion, parse_completion


@pytest.mark.parametrize("dataset, completion, expected", [
    ("cqa", ("Beavers build dams in woods. So the answer is (c) wooded area.\n\nQ: What is x?\n"
             "Answer Choices:\n(a) y\nA: So the answer is (a) y."),
     ParsedCompletion("Beavers build dams in woods.", "wooded area")),
    ("cqa", "No marker at all.\n\nQ: next", ParsedCompletion("", None)),
    ("cqa", "Reason. So the answer is wooded area.", ParsedCompletion("Reason.", None)),
    ("svamp", ("10 * 45 is 450. The answer is (10 * 45).\n\nQ: There are 15 trees. A: The "
               "answer is (21 - 15)."), ParsedCompletion("10 * 45 is 450.", "(10 * 45)")),
    ("svamp", "So 11 / 3 = 3.333", ParsedCompletion("", None)),
    ("svamp", "Reason. The answer is ((491 - 21", ParsedCompletion("Reason.", None)),
    ("svamp", "Two numbers. The answer is (175, 5).", ParsedCompletion("Two numbers.",
                                                                        "(175, 5)")),
    ("esnli", ("Packages are not lunch.\nAnswer: neutral\n\nPremise: Two women.\nHypothesis: x\n"
               "Reasonings: y\nAnswer: entailment"),
     ParsedCompletion("Packages are not lunch.", "neutral")),
    ("esnli", "Only a rationale", ParsedCompletion("Only a rationale", None)),
    ("anli1", ("The premise says so. So the answer is entailment.\n\nPremise: A.\nHypothesis: B."
               "\nAnswer: So the answer is neutral."),
     ParsedCompletion("The premise says so.", "entailment")),
    ("anli1", "Rambling without an answer\n\nPremise: x", ParsedCompletion("", None)),
    ("synthetic", ("7 + 9 + 0 = 16 , write 6 carry 1 . So the answer is 1 6.\n\nQ: 1 + 2\nA: "
                   "So the answer is 3."),
     ParsedCompletion("7 + 9 + 0 = 16 , write 6 carry 1 .", "1 6")),
    ("synthetic", "I do not know.", ParsedCompletion("", None)),
])
def test_each_dataset_parses_its_completions(dataset, completion, expected):
    assert parse_completion(dataset, completion) == expected


def test_ok_requires_label_and_rationale():
    assert ParsedCompletion("why", "a").ok
    assert not ParsedCompletion("", "a").ok
    assert not ParsedCompletion("why", None).ok


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'mnli'"):
        parse_completion("mnli", "x")
