"""The built-in synthetic addition dataset."""

import pytest

from sbs_jax.data import synthetic
from sbs_jax.data.parse import parse_completion


def test_solve_matches_integer_addition_and_explains_every_column():
    for a, b in [(347, 259), (999, 999), (100, 100), (505, 495)]:
        rationale, label = synthetic.solve(synthetic.format_input(a, b))
        assert int(label.replace(" ", "")) == a + b
        assert label == " ".join(str(a + b))
        assert rationale.count("carry") == 3
    assert synthetic.solve("3 4 7 + 2 5 9") == (
        ("7 + 9 + 0 = 16 , write 6 carry 1 . 4 + 5 + 1 = 10 , write 0 carry 1 . "
         "3 + 2 + 1 = 6 , write 6 carry 0 ."), "6 0 6")
    assert synthetic.solve("9 9 9 + 9 9 9")[0].endswith("write 9 carry 1 . write 1 .")


def test_solve_rejects_non_problems_with_the_input_in_the_message():
    with pytest.raises(ValueError, match="'347 \\+ 259'"):
        synthetic.solve("347 + 259")


def test_generate_is_deterministic_distinct_and_split_disjoint():
    train = synthetic.generate(300, seed=0, split="train")
    assert train == synthetic.generate(300, seed=0, split="train")
    assert train != synthetic.generate(300, seed=1, split="train")
    test = synthetic.generate(100, seed=0, split="test")
    assert len({r.input for r in train}) == 300
    assert not {r.input for r in train} & {r.input for r in test}
    assert len({r.id for r in train + test}) == 400
    for record in train[:20]:
        assert (record.rationale, record.label) == synthetic.solve(record.input)
        assert record.llm_label == record.label and record.source == "synthetic/train"


def test_teacher_format_round_trips_through_the_parser():
    record = synthetic.generate(1, seed=3, split="valid")[0]
    completion = f"{record.rationale} So the answer is {record.label}.\n\nQ: 1 2 3 + 4 5 6\nA:"
    parsed = parse_completion("synthetic", completion)
    assert (parsed.rationale, parsed.label) == (record.rationale, record.label)


def test_generate_rejects_unknown_split_and_impossible_sizes():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        synthetic.generate(1, 0, "dev")
    with pytest.raises(ValueError, match="num_examples"):
        synthetic.generate(10**9, 0, "test")
