"""Evaluation metrics (seqio metric_fn convention: `fn(targets, predictions) -> {name: value}`).

Accuracy is exact match of decoded strings (targets after a tokenizer round trip, done by the
task's postprocessor). SVAMP labels are arithmetic expressions, so its metric compares their
values with the reference's semantics (distilling-step-by-step's `compute_equation_acc`: the
value Python gives the expression, no value when Python raises, then exact `==`): `a and b` is
`b` unless `a` is zero, `//` floors, `**` raises to a power, `5 == 5.0`, `0.1 + 0.2 != 0.3`.
Expressions are evaluated by walking a parsed AST, never with `eval`: numbers and
+ - * / // % **, unary + - `not`, `and` / `or` (short-circuit), comparisons and parentheses.
Anything else (names, calls, strings, tuples such as `(175, 5)`) has no value and matches
nothing, as the reference's NaN; so do powers whose result would exceed MAX_POWER_BITS (Python
would compute them, and no label is that large) and text over MAX_EXPRESSION_CHARS.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Sequence

Number = int | float | bool

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
            ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
MAX_EXPRESSION_CHARS = 512
MAX_POWER_BITS = 4096


class _NoValue(Exception):
    """Where Python's eval would raise, or give something that is not a real number."""


def _power(base: Number, exponent: Number) -> Number:
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * math.log2(abs(base)) > MAX_POWER_BITS):
        raise _NoValue("power too large")
    value = operator.pow(base, exponent)
    if isinstance(value, complex):  # a negative base to a fractional power
        raise _NoValue("complex power")
    return value


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) is ast.Pow:
        return _power(_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BoolOp):  # Python's: the first deciding operand, later ones unread
        value = _evaluate(node.values[0])
        for operand in node.values[1:]:
            if bool(value) == isinstance(node.op, ast.Or):
                return value
            value = _evaluate(operand)
        return value
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _evaluate(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise _NoValue(f"unsupported expression element {type(node).__name__}")


def safe_arithmetic(expression: str) -> Number | None:
    """The value Python gives an arithmetic expression (see the module docstring), else None.

    Leading spaces and tabs are ignored, as `eval` ignores them.
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        return _evaluate(ast.parse(expression.lstrip(" \t"), mode="eval"))
    except (_NoValue, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


def arithmetic_equal(prediction: str, target: str) -> bool:
    """The reference's SVAMP rule: both expressions have a value and the values are ==."""
    left, right = safe_arithmetic(prediction), safe_arithmetic(target)
    return left is not None and right is not None and left == right


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy in percent."""
    _check_lengths(targets, predictions)
    hits = sum(str(t) == str(p) for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * hits / max(len(targets), 1)}


def arithmetic_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percent of predictions whose value equals the target expression's value (SVAMP)."""
    _check_lengths(targets, predictions)
    hits = sum(arithmetic_equal(p, t) for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * hits / max(len(targets), 1)}


def _check_lengths(targets: Sequence, predictions: Sequence) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
