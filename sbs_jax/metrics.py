"""Evaluation metrics (seqio metric_fn convention: `fn(targets, predictions) -> {name: value}`).

Accuracy is exact match of decoded strings (targets after a tokenizer round trip, done by the
task's postprocessor). SVAMP labels are arithmetic expressions, so its metric compares their
values; expressions are evaluated by walking a parsed AST of numbers and + - * / only, never
with `eval`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Sequence

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 512


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def safe_arithmetic(expression: str) -> float | None:
    """The value of an arithmetic expression of numbers, + - * / and parentheses, else None.

    None for anything else (names, calls, powers, tuples such as `(175, 5)`), division by zero,
    or text over MAX_EXPRESSION_CHARS.
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def arithmetic_equal(prediction: str, target: str) -> bool:
    """True when both expressions evaluate to the same number (up to float rounding)."""
    left, right = safe_arithmetic(prediction), safe_arithmetic(target)
    if left is None or right is None:
        return False
    return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9)


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
