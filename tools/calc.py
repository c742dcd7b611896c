"""The `calculator` built-in: arithmetic evaluated by walking a whitelisted `ast`, never `eval`.

Only numbers, `+ - * / // % **`, unary `+ -`, parentheses, a few `math` functions and the
constants `pi`, `e`, `tau` are understood. Anything else (names, attributes, subscripts,
keyword arguments, strings, comparisons, lambdas...) is refused with a message saying what
was found. Results are bounded: integers may not grow past `MAX_INT_BITS` bits (checked
*before* an expensive power or product is computed), powers past `MAX_EXPONENT`, and
non-finite float results are errors, so a model cannot make the process spin or run out of
memory with `9**9**9` or `10**10**10`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from treadle.tools.base import ToolError, tool

Number = int | float

#: longest expression accepted, in characters
MAX_EXPRESSION_CHARS = 2000
#: deepest expression tree accepted (also keeps the walk far from the recursion limit)
MAX_DEPTH = 64
#: largest integer result, in bits (about 1,200 decimal digits)
MAX_INT_BITS = 4096
#: largest absolute exponent in `a ** b`
MAX_EXPONENT = 10_000


class CalculatorError(ToolError, ValueError):
    """The expression is not something the calculator evaluates, or its result is too big."""

    def __init__(self, message: str) -> None:
        super().__init__("calculator", message)


def _check_int(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    return value


def _check_float(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number (overflow)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is too large (limit {MAX_EXPONENT})")
    # |base| ** exponent has at least (bit_length(base) - 1) * exponent bits; refuse before
    # computing rather than after the CPU has been spent.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (0 raised to a negative power)")
    result = base**exponent
    if isinstance(result, complex):
        raise CalculatorError("result is a complex number (negative base, fractional power)")
    return result


def _multiply(a: Number, b: Number) -> Number:
    if (
        isinstance(a, int)
        and isinstance(b, int)
        and a.bit_length() + b.bit_length() > (MAX_INT_BITS + 1)
    ):
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    return a * b


def _divide(op: Callable[[Number, Number], Number]) -> Callable[[Number, Number], Number]:
    def checked(a: Number, b: Number) -> Number:
        if b == 0:
            raise CalculatorError("division by zero")
        return op(a, b)

    return checked


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: _divide(operator.truediv),
    ast.FloorDiv: _divide(operator.floordiv),
    ast.Mod: _divide(operator.mod),
    ast.Pow: _power,
}

_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _log(x: Number, base: Number | None = None) -> Number:
    return math.log(x) if base is None else math.log(x, base)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > 100:
        raise CalculatorError("round(x, n): n must be an integer between -100 and 100")
    return round(x, ndigits)


def _min(*args: Number) -> Number:
    return min(args)


def _max(*args: Number) -> Number:
    return max(args)


#: name -> (function, smallest and largest number of arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (math.sqrt, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (_min, 1, 64),
    "max": (_max, 1, 64),
}

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

_OPERATOR_HINTS: dict[type[ast.AST], str] = {
    ast.BitXor: "'^' is bitwise XOR in Python and is not supported; use '**' for powers",
    ast.BitAnd: "'&' (bitwise and) is not supported",
    ast.BitOr: "'|' (bitwise or) is not supported",
    ast.LShift: "'<<' is not supported",
    ast.RShift: "'>>' is not supported",
    ast.MatMult: "'@' is not supported",
    ast.Invert: "'~' is not supported",
    ast.Not: "'not' is not supported",
}


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression; raises `CalculatorError` with a clear reason."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("not a valid expression (too deeply nested?)") from None
    return _eval(tree.body, 0)


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {MAX_DEPTH} levels")
    try:
        if isinstance(node, ast.Constant):
            value = node.value
            # bool is an int subclass; True + 1 is not arithmetic a user meant
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CalculatorError(f"only numbers are allowed, not {value!r}")
            return _check_int(value)
        if isinstance(node, ast.BinOp):
            op = _BINARY.get(type(node.op))
            if op is None:
                raise CalculatorError(_OPERATOR_HINTS.get(type(node.op), "unsupported operator"))
            left = _eval(node.left, depth + 1)
            right = _eval(node.right, depth + 1)
            return _check_float(_check_int(op(left, right)))
        if isinstance(node, ast.UnaryOp):
            uop = _UNARY.get(type(node.op))
            if uop is None:
                raise CalculatorError(_OPERATOR_HINTS.get(type(node.op), "unsupported operator"))
            return uop(_eval(node.operand, depth + 1))
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise CalculatorError(
                f"unknown name {node.id!r}; known constants: {', '.join(sorted(_CONSTANTS))}"
            )
        if isinstance(node, ast.Call):
            return _call(node, depth)
        if isinstance(node, ast.Attribute):
            raise CalculatorError("attribute access (a.b) is not allowed")
    except (OverflowError, MemoryError):
        raise CalculatorError("result too large") from None
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _call(node: ast.Call, depth: int) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        known = ", ".join(sorted(_FUNCTIONS))
        what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise CalculatorError(f"unknown function {what!r}; known functions: {known}")
    name = node.func.id
    fn, least, most = _FUNCTIONS[name]
    if node.keywords:
        raise CalculatorError(f"{name}() takes no keyword arguments")
    if any(isinstance(a, ast.Starred) for a in node.args):
        raise CalculatorError(f"{name}() takes no *arguments")
    if not least <= len(node.args) <= most:
        expected = str(least) if least == most else f"{least} to {most}"
        raise CalculatorError(f"{name}() takes {expected} argument(s), got {len(node.args)}")
    args = [_eval(a, depth + 1) for a in node.args]
    try:
        result = fn(*args)
    except ValueError as exc:  # math domain errors: sqrt(-1), log(0), ...
        raise CalculatorError(f"{name}({', '.join(map(str, args))}): {exc}") from None
    return _check_float(_check_int(result))


@tool(name="calculator", timeout_s=5.0, expected_duration_s=0.001, idempotent=True)
def calculator(expression: str) -> float:
    """Evaluate an arithmetic expression and return the number.

    Supports + - * / // % ** (powers), parentheses, unary minus, the functions sqrt, log
    (log(x) or log(x, base)), log10, log2, exp, sin, cos, tan, asin, acos, atan, floor,
    ceil, abs, round, min, max, and the constants pi, e and tau. Angles are in radians.

    Args:
        expression: The expression, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) / 2".
    """
    try:
        value = evaluate(expression)
    except CalculatorError as exc:
        raise ToolError("calculator", str(exc)) from None
    try:
        # the tool's declared type is float, which an exact integer must fit in (it stays
        # exact when it does): 9**999 does not, and that is an error to report here, not
        # one to fail on where the answer is converted
        float(value)
    except OverflowError:
        raise ToolError(
            "calculator",
            f"the result is too large for a float ({int(value).bit_length()} bits; a float "
            "holds at most about 1.8e308)",
        ) from None
    return value


__all__ = ["MAX_EXPONENT", "MAX_INT_BITS", "CalculatorError", "calculator", "evaluate"]
