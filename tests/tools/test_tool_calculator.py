"""The `calculator` built-in: correct arithmetic, and refusal of everything else."""

import math

import pytest

from treadle.tools import BUILTINS, ToolArgumentError, ToolError, calculator
from treadle.tools.calc import MAX_INT_BITS, CalculatorError, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 * (3 + 4) ** 2", 98),
        ("2 ** 3 ** 2", 512),  # right-associative, as in Python
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("+5 - -3", 8),
        ("1e3 + 0.5", 1000.5),
        ("10 ** -2", 0.01),
        ("2 ** 0.5", math.sqrt(2)),
        ("sqrt(16)", 4.0),
        ("log(e)", 1.0),
        ("log(8, 2)", 3.0),
        ("log10(1000)", 3.0),
        ("log2(1024)", 10.0),
        ("exp(0)", 1.0),
        ("sin(0) + cos(0)", 1.0),
        ("sin(pi / 2)", 1.0),
        ("tan(0)", 0.0),
        ("atan(1) * 4", math.pi),
        ("abs(-3.5)", 3.5),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("floor(-1.5) + ceil(1.2)", 0),
        ("min(4, 2, 8)", 2),
        ("max(4, 2.5, 8)", 8),
        ("tau / 2", math.pi),
        ("2 ** 4000 // 2 ** 3999", 2),
        ("  3  ", 3),
    ],
)
def test_evaluates_arithmetic(expression: str, expected: float) -> None:
    result = evaluate(expression)
    assert result == pytest.approx(expected)
    assert type(result) is type(expected) or isinstance(expected, float)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "unknown name 'x'"),
        ("__builtins__", "unknown name '__builtins__'"),
        ("math.pi", "attribute access"),
        ("(1).__class__", "attribute access"),
        ("__import__('os').system('echo hi')", "unknown function"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("eval('1+1')", "unknown function 'eval'"),
        ("math.sqrt(4)", "unknown function 'math.sqrt'"),
        ("sqrt(x=4)", "takes no keyword arguments"),
        ("sqrt(*[4])", "takes no *arguments"),
        ("sqrt(1, 2)", "takes 1 argument(s), got 2"),
        ("(lambda: 1)()", "unknown function"),
        ("lambda: 1", "Lambda is not allowed"),
        ("[1, 2][0]", "Subscript is not allowed"),
        ("[i for i in range(3)]", "ListComp is not allowed"),
        ("'ab' * 3", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("1j * 2", "only numbers are allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("1 if 2 else 3", "not allowed"),
        ("(x := 2)", "not allowed"),
        ("2 ^ 3", "use '**' for powers"),
        ("1 << 4", "not supported"),
        ("~1", "not supported"),
        ("1 +", "not a valid expression"),
        ("import os", "not a valid expression"),
        ("", "empty"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("log(0)", "math domain error"),
        ("(-8) ** (1 / 3)", "complex"),
        ("round(1.5, 1000)", "between -100 and 100"),
    ],
)
def test_refuses_everything_else(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError) as info:
        evaluate(expression)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "expression",
    [
        "9 ** 9 ** 9",
        "10 ** 10 ** 10",
        "2 ** 100000",
        "2 ** 4096",  # one bit over the cap
        "(10 ** 1000) ** 5",
        "3 ** 9000",
        "(2 ** 3000) * (2 ** 3000)",
        "1e308 * 10",
        "10.0 ** 400",
        "exp(1000)",
        "9" * 1500,  # a literal beyond the integer cap
        "-" * 200 + "1",  # nesting deeper than the walk allows
        "1+" * 1500 + "1",  # longer than the expression limit
    ],
)
def test_refuses_huge_results_before_computing_them(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_largest_allowed_integer() -> None:
    assert evaluate("2 ** 4095") == 2**4095
    assert (2**4095).bit_length() == MAX_INT_BITS


def test_is_the_calculator_builtin() -> None:
    assert BUILTINS["calculator"] is calculator
    assert calculator.name == "calculator"
    assert calculator.idempotent is True
    assert calculator.expected_duration_s is not None and calculator.expected_duration_s < 0.1
    assert calculator.timeout_s is not None
    params = calculator.openai_schema()["function"]["parameters"]
    assert params["required"] == ["expression"]
    assert params["properties"]["expression"]["type"] == "string"


@pytest.mark.anyio
async def test_tool_call_returns_the_number_and_wraps_errors() -> None:
    assert await calculator.invoke('{"expression": "6 * 7"}') == 42
    with pytest.raises(ToolError) as info:
        await calculator.invoke({"expression": "__import__('os')"})
    assert info.value.tool == "calculator"
    assert "unknown function '__import__'" in info.value.reason
    with pytest.raises(ToolArgumentError):
        await calculator.invoke({"expr": "1"})


@pytest.mark.anyio
async def test_an_integer_too_large_for_a_float_is_a_clear_error() -> None:
    """9**999 is a valid integer (3,170 bits) but the tool answers a float: say so, instead
    of failing with an internal error while converting it."""
    with pytest.raises(ToolError) as info:
        await calculator.invoke({"expression": "9**999"})
    assert "too large" in info.value.reason and "float" in info.value.reason
    assert await calculator.invoke({"expression": "2**1000"}) == 2**1000
