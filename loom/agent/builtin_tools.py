"""Built-in tools: `calculator` (arithmetic parsed with `ast`, never `eval`) and `read_file` (inside a
sandbox directory only)."""

from __future__ import annotations

import ast
import operator
from pathlib import Path

from loom.agent.errors import ToolError
from loom.agent.tools import Tool, ToolRegistry, tool

MAX_EXPRESSION_CHARS = 1000
# Bounds a power's size before computing it: `9**9**9` would otherwise take the process down.
MAX_RESULT_BITS = 100_000
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
        if max(base.bit_length(), 1) * exponent > MAX_RESULT_BITS:
            raise CalculatorError("the result would be too large")
    elif abs(exponent) > 10_000:
        raise CalculatorError("the exponent is too large")
    result = base**exponent
    if isinstance(result, complex):  # a negative base to a fractional power
        raise CalculatorError("the result is not a real number")
    return result


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _BINARY[type(node.op)](left, right)
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


def resolve_in_sandbox(sandbox: str | Path, path: str) -> Path:
    """The real path of `path` (relative to sandbox) if it lies inside sandbox, else raise ToolError.

    Resolving follows symlinks and `..` first, so a link or a `../` that leads outside is refused;
    absolute paths are allowed only if they resolve inside too.
    """
    root = Path(sandbox).resolve(strict=True)
    if "\x00" in path:
        raise ToolError("the path contains a NUL character")
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ToolError(f"{path!r} is outside the sandbox directory; only files inside it can be read")
    return target


def make_read_file(sandbox: str | Path, max_bytes: int = MAX_READ_BYTES) -> Tool:
    """A `read_file` tool that reads text files inside `sandbox` and refuses everything else."""
    root = Path(sandbox).resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(f"sandbox {root} is not a directory")

    def read_file(path: str) -> str:
        """Read a text file from the working directory.

        Args:
            path: the file's path, relative to the working directory.
        """
        target = resolve_in_sandbox(root, path)
        if not target.is_file():
            raise ToolError(f"{path!r} is not a file in the sandbox")
        with target.open("rb") as f:
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
