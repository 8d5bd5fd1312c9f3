"""The validators of every number and option users pass, as pure functions."""

from __future__ import annotations

import datetime as dt
import enum
import functools
import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anyservice._checks import (
    MAX_COUNT,
    MAX_PORT,
    MIN_INTERVAL,
    check_choice,
    check_clock_reading,
    check_coroutine_function,
    check_count,
    check_host,
    check_number,
    check_optional_count,
    check_optional_seconds,
    check_port,
    check_seconds,
    describe,
)


def exactly(message: str) -> str:
    """A ``match=`` pattern for the whole message and nothing else."""
    return f"^{re.escape(message)}$"


# ---------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------


def test_describe_shows_a_short_repr_whole() -> None:
    assert describe("x" * 78) == repr("x" * 78)
    assert len(describe("x" * 78)) == 80


def test_describe_cuts_a_long_repr_and_says_how_long_it_was() -> None:
    text = "x" * 79
    assert describe(text) == repr(text)[:60] + "... (81 characters)"
    assert describe(10**400) == "1" + "0" * 59 + "... (401 characters)"


# ---------------------------------------------------------------------------------------
# check_seconds
# ---------------------------------------------------------------------------------------


@given(st.floats(min_value=0, exclude_min=True, allow_infinity=False))
def test_any_positive_finite_float_is_a_duration(seconds: float) -> None:
    assert check_seconds(seconds, "timeout") == seconds


@given(st.floats(min_value=0, exclude_min=True, allow_infinity=False))
def test_a_numeric_string_is_the_number_it_spells(seconds: float) -> None:
    assert check_seconds(repr(seconds), "timeout") == seconds


@given(st.timedeltas(min_value=dt.timedelta(microseconds=1)))
def test_a_timedelta_is_its_total_seconds(delta: dt.timedelta) -> None:
    assert check_seconds(delta, "timeout") == delta.total_seconds()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3, 3.0), (Fraction(1, 4), 0.25), (" 1.5\n", 1.5), ("1_000", 1000.0), ("2e-3", 0.002)],
)
def test_durations_come_back_as_floats(value: object, seconds: float) -> None:
    result = check_seconds(value, "timeout")
    assert result == seconds
    assert type(result) is float


@pytest.mark.parametrize("value", [True, False, None, [1], 1j, b"1", object()])
def test_a_value_that_is_no_duration_is_a_type_error_naming_it(value: object) -> None:
    message = (
        "lease_seconds must be a number of seconds (an int, a float, a numeric string or a "
        f"timedelta), got {value!r}"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        check_seconds(value, "lease_seconds")


def test_a_string_that_is_no_number_is_a_value_error() -> None:
    with pytest.raises(
        ValueError, match=exactly("timeout must be a number of seconds, got the string '1.5s'")
    ):
        check_seconds("1.5s", "timeout")


@pytest.mark.parametrize(
    "value", [0, 0.0, -0.0, -1, -1e-300, math.nan, math.inf, -math.inf, "nan", "inf", "-2"]
)
def test_positive_finite_is_the_default(value: object) -> None:
    message = f"timeout must be a finite number of seconds > 0, got {value!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_seconds(value, "timeout")


def test_zero_is_accepted_when_asked_for() -> None:
    assert check_seconds(0, "grace", allow_zero=True) == 0.0
    assert check_seconds(dt.timedelta(0), "grace", allow_zero=True) == 0.0


@pytest.mark.parametrize("value", [-1, -1e-9, math.nan, math.inf])
def test_zero_allowed_still_refuses_negatives_and_non_finite(value: float) -> None:
    message = f"grace must be a finite number of seconds >= 0, got {value!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_seconds(value, "grace", allow_zero=True)


def test_infinity_is_accepted_only_when_asked_for() -> None:
    assert check_seconds(math.inf, "timeout", allow_infinite=True) == math.inf
    assert check_seconds("inf", "timeout", allow_infinite=True) == math.inf


@pytest.mark.parametrize("value", [math.nan, -math.inf, 0, -1])
def test_infinity_allowed_still_refuses_nan_zero_and_negatives(value: float) -> None:
    message = f"timeout must be a number of seconds > 0, got {value!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_seconds(value, "timeout", allow_infinite=True)


def test_a_stop_deadline_is_never_infinite() -> None:
    message = "shutdown_timeout must be a finite number of seconds >= 0, got inf"
    with pytest.raises(ValueError, match=exactly(message)):
        check_seconds(math.inf, "shutdown_timeout", allow_zero=True)


def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_parameter() -> None:
    huge = describe(10**400)
    message = f"timeout must be a finite number of seconds, got {huge} (too large for a float)"
    with pytest.raises(ValueError, match=exactly(message)):
        check_seconds(10**400, "timeout")


def test_the_floor_is_inclusive_and_named_in_the_message() -> None:
    assert check_seconds(MIN_INTERVAL, "interval", minimum=MIN_INTERVAL) == MIN_INTERVAL
    message = "interval must be at least 1e-06 seconds, got 9.99e-07"
    with pytest.raises(ValueError, match=exactly(message)):
        check_seconds(9.99e-7, "interval", minimum=MIN_INTERVAL)


def test_below_zero_the_message_says_positive_even_with_a_floor() -> None:
    with pytest.raises(
        ValueError, match=exactly("interval must be a finite number of seconds > 0, got 0")
    ):
        check_seconds(0, "interval", minimum=MIN_INTERVAL)


@given(st.floats(allow_nan=False, max_value=0))
def test_the_message_names_the_parameter_and_the_value(value: float) -> None:
    with pytest.raises(ValueError, match=r"^loop_seconds must be ") as info:
        check_seconds(value, "loop_seconds")
    assert str(info.value).startswith("loop_seconds ")
    assert str(info.value).endswith(f"got {value!r}")


def test_optional_seconds_passes_none_through_and_checks_the_rest() -> None:
    assert check_optional_seconds(None, "timeout") is None
    assert check_optional_seconds("2", "timeout") == 2.0
    assert check_optional_seconds(0, "timeout", allow_zero=True) == 0.0
    assert check_optional_seconds(math.inf, "timeout", allow_infinite=True) == math.inf
    with pytest.raises(ValueError, match=exactly("timeout must be at least 1.0 seconds, got 0.5")):
        check_optional_seconds(0.5, "timeout", minimum=1.0)
    with pytest.raises(
        ValueError, match=exactly("timeout must be a finite number of seconds > 0, got 0")
    ):
        check_optional_seconds(0, "timeout")


# ---------------------------------------------------------------------------------------
# check_number and check_clock_reading
# ---------------------------------------------------------------------------------------


def test_a_number_within_inclusive_bounds_comes_back_as_a_float() -> None:
    assert check_number(1, "factor", minimum=1) == 1.0
    assert type(check_number(1, "factor", minimum=1)) is float
    assert check_number(0.5, "jitter", minimum=0, maximum=1) == 0.5
    assert check_number(1, "jitter", minimum=0, maximum=1) == 1.0
    assert check_number(-1e300, "anything") == -1e300


@pytest.mark.parametrize(
    ("value", "minimum", "maximum", "message"),
    [
        (0.99, 1, None, "factor must be >= 1, got 0.99"),
        (1.01, None, 1, "factor must be <= 1, got 1.01"),
        (-0.5, 0, 1, "factor must be >= 0, got -0.5"),
        (math.nan, None, None, "factor must be a finite number, got nan"),
        (math.inf, 1, None, "factor must be a finite number, got inf"),
        (
            10**400,
            None,
            None,
            f"factor must be a finite number, got {describe(10**400)} (too large for a float)",
        ),
    ],
)
def test_a_number_outside_its_bounds_is_a_value_error(
    value: float, minimum: float | None, maximum: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        check_number(value, "factor", minimum=minimum, maximum=maximum)


@pytest.mark.parametrize("value", [True, "2", None])
def test_a_number_must_be_a_real_number(value: object) -> None:
    with pytest.raises(TypeError, match=exactly(f"factor must be a number, got {value!r}")):
        check_number(value, "factor")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_float_is_a_clock_reading(reading: float) -> None:
    assert check_clock_reading(reading, "now") == reading


def test_a_clock_reading_given_as_an_int_comes_back_as_a_float() -> None:
    assert type(check_clock_reading(-3, "now")) is float
    assert check_clock_reading(Fraction(1, 2), "now") == 0.5


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, Fraction(10**400)])
def test_a_clock_reading_must_be_finite(value: object) -> None:
    message = f"now must be a finite clock reading, got {describe(value)}"
    if isinstance(value, Fraction):
        message += " (too large for a float)"
    with pytest.raises(ValueError, match=exactly(message)):
        check_clock_reading(value, "now")


@pytest.mark.parametrize("value", [True, "1", None])
def test_a_clock_reading_must_be_a_number(value: object) -> None:
    message = f"now must be a clock reading in seconds, got {value!r}"
    with pytest.raises(TypeError, match=exactly(message)):
        check_clock_reading(value, "now")


def test_a_huge_int_clock_reading_names_the_parameter() -> None:
    message = f"now must be a finite clock reading, got {describe(10**400)} (too large for a float)"
    with pytest.raises(ValueError, match=exactly(message)):
        check_clock_reading(10**400, "now")


# ---------------------------------------------------------------------------------------
# counts and ports
# ---------------------------------------------------------------------------------------


class Retries(int):
    """An int subclass, as some libraries hand out."""


@given(st.integers(0, MAX_COUNT))
def test_any_count_up_to_the_maximum_is_accepted(count: int) -> None:
    assert check_count(count, "retries") == count


def test_a_count_comes_back_as_a_plain_int() -> None:
    assert type(check_count(Retries(3), "retries")) is int


@pytest.mark.parametrize("value", [True, False, 3.0, "3", None, Fraction(3)])
def test_a_count_that_is_not_an_int_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=exactly(f"retries must be an int, got {value!r}")):
        check_count(value, "retries")


@pytest.mark.parametrize(("value", "minimum"), [(-1, 0), (0, 1), (4, 5)])
def test_a_count_below_its_minimum_is_a_value_error(value: int, minimum: int) -> None:
    message = f"limit must be an int >= {minimum}, got {value}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_count(value, "limit", minimum=minimum)
    assert check_count(minimum, "limit", minimum=minimum) == minimum


@pytest.mark.parametrize("value", [MAX_COUNT + 1, 2**63, 10**400])
def test_an_absurd_count_is_refused_before_it_can_overflow(value: int) -> None:
    message = f"retries must be an int <= 2147483647, got {describe(value)}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_count(value, "retries")


def test_a_count_may_have_a_tighter_maximum_or_none() -> None:
    assert check_count(10, "workers", maximum=10) == 10
    with pytest.raises(ValueError, match=exactly("workers must be an int <= 10, got 11")):
        check_count(11, "workers", maximum=10)
    assert check_count(2**80, "attempt", maximum=None) == 2**80


def test_an_optional_count_passes_none_through_and_checks_the_rest() -> None:
    assert check_optional_count(None, "limit") is None
    assert check_optional_count(0, "limit") == 0
    assert check_optional_count(MAX_COUNT, "limit") == MAX_COUNT
    with pytest.raises(
        ValueError, match=exactly("limit must be an int <= 2147483647, got 2147483648")
    ):
        check_optional_count(MAX_COUNT + 1, "limit")
    assert check_optional_count(5, "limit", minimum=5, maximum=5) == 5
    with pytest.raises(ValueError, match=exactly("limit must be an int >= 1, got 0")):
        check_optional_count(0, "limit", minimum=1)
    with pytest.raises(ValueError, match=exactly("limit must be an int <= 4, got 5")):
        check_optional_count(5, "limit", maximum=4)
    assert check_optional_count(2**40, "limit", maximum=None) == 2**40


@pytest.mark.parametrize("port", [0, 1, 8080, MAX_PORT])
def test_ports_zero_to_65535_are_accepted(port: int) -> None:
    assert check_port(port, "status_server_port") == port


@pytest.mark.parametrize(
    ("port", "error", "message"),
    [
        (-1, ValueError, "status_server_port must be an int >= 0, got -1"),
        (65536, ValueError, "status_server_port must be an int <= 65535, got 65536"),
        ("8080", TypeError, "status_server_port must be an int, got '8080'"),
        (True, TypeError, "status_server_port must be an int, got True"),
    ],
)
def test_a_bad_port_is_refused(port: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=exactly(message)):
        check_port(port, "status_server_port")


# ---------------------------------------------------------------------------------------
# hosts, coroutine functions, choices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", " localhost"])
def test_a_host_is_a_non_empty_string(host: str) -> None:
    assert check_host(host, "status_server_host") is host


@pytest.mark.parametrize("host", [123, None, b"127.0.0.1"])
def test_a_host_that_is_not_a_string_is_a_type_error(host: object) -> None:
    message = f"status_server_host must be a host name or address (a str), got {host!r}"
    with pytest.raises(TypeError, match=exactly(message)):
        check_host(host, "status_server_host")


@pytest.mark.parametrize("host", ["", "  ", "\t"])
def test_an_empty_host_is_a_value_error(host: str) -> None:
    message = f"status_server_host must be a non-empty host name or address, got {host!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_host(host, "status_server_host")


async def job(x: int) -> int:
    return x


def test_an_async_def_function_or_a_partial_of_one_passes_through() -> None:
    assert check_coroutine_function(job, "function") is job
    partial = functools.partial(job, 1)
    assert check_coroutine_function(partial, "function") is partial


def test_anything_else_is_not_a_coroutine_function() -> None:
    coroutine = job(1)
    try:
        for value in (lambda: None, coroutine, None, print):
            message = f"@queue.task must be an 'async def' function, got {describe(value)}"
            with pytest.raises(TypeError, match=exactly(message)):
                check_coroutine_function(value, "@queue.task")
    finally:
        coroutine.close()


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


def test_an_enum_choice_takes_a_member_or_its_value() -> None:
    assert check_choice(Color.RED, "color", Color) is Color.RED
    assert check_choice("green", "color", Color) is Color.GREEN


@pytest.mark.parametrize("value", ["RED", "blue", None, 1, ["red"]])
def test_an_unknown_enum_choice_lists_the_valid_values(value: object) -> None:
    message = f"color must be one of 'red', 'green', got {value!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_choice(value, "color", Color)


def test_a_string_choice_takes_one_of_the_strings() -> None:
    assert check_choice("trio", "backend", ("asyncio", "trio")) == "trio"
    assert check_choice("asyncio", "backend", iter(["asyncio", "trio"])) == "asyncio"


@pytest.mark.parametrize("value", ["Trio", "", None, 1])
def test_an_unknown_string_choice_lists_the_valid_values(value: object) -> None:
    message = f"backend must be one of 'asyncio', 'trio', got {value!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        check_choice(value, "backend", iter(["asyncio", "trio"]))
