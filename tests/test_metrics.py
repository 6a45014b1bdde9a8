"""The SVAMP metric against a table of cases whose values are what the reference's
`eval_equation` (Python's eval, NaN on an error) gives them, and its exact `==`."""

import math

import pytest

from sbs_jax.infer import metrics
from sbs_jax.infer.metrics import arithmetic_equal, safe_arithmetic

# (expression, the value Python's eval gives it; None where it raises or is not a number)
VALUES = [
    ("( ( 17.0 + 15.0 ) + 2.0 )", 34.0),
    ("-(3 - 5) / 4", 0.5),
    ("7 // 2", 3),
    ("-7 // 2", -4),
    ("7.5 // 2", 3.0),
    ("2 ** 10", 1024),
    ("2 ** -1", 0.5),
    ("-2 ** 2", -4),
    ("(-2) ** 2", 4),
    ("2 ** 3 ** 2", 512),
    ("7 % 3", 1),
    ("-3", -3),
    ("+-+3", -3),
    ("(34 + 40) and (62 - 17)", 45),
    ("((29/2) and (30/2))", 15.0),
    ("(5 - 5) and (1 / 0)", 0),
    ("0 or 4", 4),
    ("3 or (1 / 0)", 3),
    ("not 0", True),
    ("3 < 4 < 5", True),
    ("3 < 2 < (1 / 0)", False),
    ("1e999", math.inf),
    ("  \t12", 12),
    ("\n12", 12),
    ("12\n", 12),
    ("1_000", 1000),
    ("0x10", 16),
    ("1 / 0", None),
    ("5 % 0", None),
    ("(175, 5)", None),
    ("x + 1", None),
    ("'5'", None),
    ("3j", None),
    ("(-8) ** 0.5", None),
    ("2.0 ** 10000", None),
    ("[5]", None),
    ("", None),
    ("(1 +", None),
    ("\n 12", None),
]


@pytest.mark.parametrize("expression, value", VALUES)
def test_values_are_pythons(expression, value):
    got = safe_arithmetic(expression)
    assert got == value and type(got) is type(value)


# Python would run these (a call, a shift, a power of ~10**8 digits, a long text); the safe
# evaluator gives them no value, so they match nothing.
OUTSIDE_THE_GRAMMAR = ["__import__('os').system('true')", "1 << 3", "9 ** 9 ** 9", "1" * 600]


@pytest.mark.parametrize("expression", OUTSIDE_THE_GRAMMAR)
def test_what_the_safe_evaluator_refuses(expression):
    assert safe_arithmetic(expression) is None
    assert not arithmetic_equal(expression, expression)


# (prediction, gold, equal under the reference's rule)
EQUAL = [
    ("(30 / 2)", "( 30.0 / 2.0 )", True),
    ("5", "5.0", True),
    ("((29/2) and (30/2))", "( 30.0 / 2.0 )", True),  # released svamp train teacher labels
    ("(34 + 40) and (62 - 17)", "( 62.0 - 17.0 )", True),
    ("(34 + 40) and (62 - 17)", "( 34.0 + 40.0 )", False),
    ("0.1 + 0.2", "0.3", False),  # exact ==, no tolerance
    ("1 / 3 * 3", "1.0", True),
    ("3 < 4", "1.0", True),
    ("1e999", "1e999", True),
    ("1e999 - 1e999", "1e999 - 1e999", False),  # NaN is never equal
    ("(175, 5)", "(175, 5)", False),
    ("1 / 0", "1 / 0", False),
    ("2 ** 2", "( 2.0 * 2.0 )", True),
    ("7 // 2", "3.5", False),
]


@pytest.mark.parametrize("prediction, gold, equal", EQUAL)
def test_equality_is_the_references(prediction, gold, equal):
    assert arithmetic_equal(prediction, gold) is equal


def test_accuracy_counts_equal_values_in_percent():
    golds = [gold for _, gold, _ in EQUAL]
    predictions = [prediction for prediction, _, _ in EQUAL]
    expected = 100.0 * sum(equal for _, _, equal in EQUAL) / len(EQUAL)
    assert metrics.arithmetic_accuracy(golds, predictions) == {"accuracy": expected}
    with pytest.raises(ValueError, match="1 targets but 2 predictions"):
        metrics.arithmetic_accuracy(["1"], ["1", "2"])
