"""Built-in tools: `calculator` (arithmetic parsed with `ast`, never `eval`) and `read_file` (inside a
sandbox directory only)."""

from __future__ import annotations

import ast
import math
import operator
import os
from pathlib import Path

from loom.agent.errors import ToolError
from loom.agent.sandbox import open_beneath
from loom.agent.tools import Tool, ToolRegistry, tool

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 100
MAX_INT_DIGITS = 4000
"""Largest integer (in decimal digits) the calculator computes: below Python's int-to-str limit (4300),
so every result can be written as JSON and read by a model."""
_INT_LIMIT = 10**MAX_INT_DIGITS
# A power is bounded before it is computed: `9**9**9` would otherwise take the process down.
_MAX_POWER_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10)) + 1
MAX_READ_BYTES = 1 << 20

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ToolError, ValueError):
    """The expression is not plain arithmetic, or cannot be computed (division by zero, too large)."""


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (abs(base).bit_length() - 1) * exponent > _MAX_POWER_BITS:
            raise CalculatorError(f"the result would have more than {MAX_INT_DIGITS} digits")
    elif abs(exponent) > 10_000:
        raise CalculatorError("the exponent is too large")
    result = base**exponent
    if isinstance(result, complex):  # a negative base to a fractional power
        raise CalculatorError("the result is not a real number")
    return result


def _bounded(value: int | float) -> int | float:
    """Every intermediate result is a finite float or an int of at most MAX_INT_DIGITS digits: inf and
    nan are not numbers JSON can carry (json.dumps would write `Infinity`)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result overflows a 64-bit float (the largest is about 1.8e308)")
    if isinstance(value, int) and abs(value) >= _INT_LIMIT:
        raise CalculatorError(f"the result has more than {MAX_INT_DIGITS} digits")
    return value


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise CalculatorError(
        f"not arithmetic: {ast.dump(node)[:60]}; only numbers, + - * / ** and parentheses are allowed"
    )


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression of numbers, + - * / ** and parentheses."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {expression!r}: {e.msg}") from e
    stack = [(tree, 0)]
    while stack:  # bounded depth first: evaluating recurses, and `-----...1` nests as deep as it is long
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CalculatorError(f"the expression nests deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    try:
        return _evaluate(tree)
    except ZeroDivisionError as e:
        raise CalculatorError("division by zero") from e
    except OverflowError as e:
        raise CalculatorError("the result is too large") from e


@tool(name="calculator")
def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression (numbers, + - * / ** and parentheses), e.g. "(2 + 3) * 4".

    Args:
        expression: the arithmetic expression to compute.
    """
    return calculate(expression)


def make_read_file(sandbox: str | Path, max_bytes: int = MAX_READ_BYTES) -> Tool:
    """A `read_file` tool that reads text files inside `sandbox` and refuses everything else (symlinks
    are followed only while they stay inside; see loom/agent/sandbox.py)."""
    root = Path(sandbox).resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(f"sandbox {root} is not a directory")

    def read_file(path: str) -> str:
        """Read a text file from the working directory.

        Args:
            path: the file's path, relative to the working directory.
        """
        with os.fdopen(open_beneath(root, path), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ToolError(f"{path!r} is larger than {max_bytes} bytes")
        return data.decode("utf-8", errors="replace")

    return tool(read_file)


def builtin_tools(sandbox: str | Path | None = None) -> ToolRegistry:
    """A registry with `calculator`, plus `read_file` when a sandbox directory is given."""
    registry = ToolRegistry([calculator])
    if sandbox is not None:
        registry.register(make_read_file(sandbox))
    return registry
