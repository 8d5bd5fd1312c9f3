"""Every check of the numbers and options users pass, in one place.

The rules are the same everywhere: a value of the wrong type is a ``TypeError``, a value of
the right type outside its bounds is a ``ValueError``, and every message names the parameter
and the value it got. ``bool`` is never a number here (``True`` seconds is a bug, not a
duration), and an int too large for a float (``10**400``) is a ``ValueError`` naming the
parameter, not a bare ``OverflowError`` from deep inside.

Durations are mode's ``Seconds``: an int or float, a ``datetime.timedelta``, or a numeric
string such as ``"1.5"``. They are finite unless the caller explicitly allows infinity: a
stop, a lease or a timer with an infinite duration would never end.

Nothing here does I/O or touches anyio, so every rule is tested as a pure function.
"""

from __future__ import annotations

import datetime
import enum
import inspect
import math
import numbers
from collections.abc import Iterable
from typing import TypeAlias, TypeGuard, TypeVar, overload

__all__ = [
    "MAX_COUNT",
    "MAX_PORT",
    "MIN_INTERVAL",
    "Seconds",
    "check_choice",
    "check_clock_reading",
    "check_coroutine_function",
    "check_count",
    "check_host",
    "check_number",
    "check_optional_count",
    "check_optional_seconds",
    "check_port",
    "check_seconds",
    "describe",
]

#: A duration as users may give it (mode's ``Seconds``): seconds as an int or float, a
#: ``timedelta``, or a numeric string such as ``"1.5"``.
Seconds: TypeAlias = float | str | datetime.timedelta

#: The largest count accepted (retries, limits, attempts): the largest signed 32-bit integer,
#: so that every count fits the integer columns of every broker's database and never
#: overflows an arithmetic step later on.
MAX_COUNT = 2**31 - 1

#: The largest TCP port number.
MAX_PORT = 65535

#: The shortest timer interval, in seconds (one microsecond). Below it the grid points of a
#: timer fall closer together than a monotonic clock reading can tell apart, and computing
#: the next one would spin or overflow.
MIN_INTERVAL = 1e-6

# Longer reprs are cut in messages: a message names the value, it does not reprint a
# megabyte string or a 400-digit int.
_REPR_LIMIT = 80

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


def describe(value: object) -> str:
    """The value as an error message shows it: its repr, cut when it is long.

    Returns:
        ``repr(value)``, or its first characters followed by ``...`` and the length.
    """
    text = repr(value)
    if len(text) <= _REPR_LIMIT:
        return text
    return f"{text[: _REPR_LIMIT - 20]}... ({len(text)} characters)"


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _to_float(value: numbers.Real, name: str, kind: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must be a finite {kind}, got {describe(value)} (too large for a float)"
        ) from None


def _seconds_of(value: object, name: str) -> float:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(
                f"{name} must be a number of seconds, got the string {describe(value)}"
            ) from None
    if _is_real(value):
        return _to_float(value, name, "number of seconds")
    raise TypeError(
        f"{name} must be a number of seconds (an int, a float, a numeric string or a "
        f"timedelta), got {describe(value)}"
    )


def check_seconds(
    value: object,
    name: str,
    *,
    allow_zero: bool = False,
    allow_infinite: bool = False,
    minimum: float | None = None,
) -> float:
    """Check a duration in seconds, as mode's ``Seconds`` takes it.

    Args:
        value: The duration the user gave: an int, a float, a ``timedelta`` or a numeric
            string.
        name: The parameter's name, for the message (e.g. ``"shutdown_timeout"``).
        allow_zero: Accept 0 (a wait that does not wait); otherwise the value must be > 0.
        allow_infinite: Accept ``inf`` (no bound at all). Never for something that must
            end, such as a stop's grace period.
        minimum: A floor (inclusive) above 0, such as :data:`MIN_INTERVAL` for a timer.
            A value below it that is > 0 gets a message naming the floor.

    Returns:
        The duration as a float.

    Raises:
        TypeError: If ``value`` is none of the accepted types (``bool`` included).
        ValueError: If it is NaN, negative, zero or infinite where those are refused, below
            ``minimum``, a string that is not a number, or too large for a float.
    """
    seconds = _seconds_of(value, name)
    if (
        math.isnan(seconds)
        or (math.isinf(seconds) and not allow_infinite)
        or seconds < 0
        or (seconds == 0 and not allow_zero)
    ):
        finite = "" if allow_infinite else "finite "
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be a {finite}number of seconds {bound}, got {describe(value)}"
        )
    if minimum is not None and seconds < minimum:
        raise ValueError(f"{name} must be at least {minimum!r} seconds, got {describe(value)}")
    return seconds


def check_optional_seconds(
    value: object,
    name: str,
    *,
    allow_zero: bool = False,
    allow_infinite: bool = False,
    minimum: float | None = None,
) -> float | None:
    """Check a duration that may be None (no duration): see :func:`check_seconds`.

    Returns:
        None for None, else the duration as a float.

    Raises:
        TypeError: As :func:`check_seconds`.
        ValueError: As :func:`check_seconds`.
    """
    if value is None:
        return None
    return check_seconds(
        value, name, allow_zero=allow_zero, allow_infinite=allow_infinite, minimum=minimum
    )


def check_number(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """Check a finite real number that is not a duration, such as a backoff factor.

    Args:
        value: The number the user gave.
        name: The parameter's name, for the message.
        minimum: The smallest value accepted (inclusive), if any.
        maximum: The largest value accepted (inclusive), if any.

    Returns:
        The number as a float.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` is refused).
        ValueError: If it is NaN, infinite, outside the bounds or too large for a float.
    """
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    number = _to_float(value, name, "number")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {describe(value)}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum!r}, got {describe(value)}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum!r}, got {describe(value)}")
    return number


def check_clock_reading(value: object, name: str) -> float:
    """Check a reading of a clock in seconds: any finite real number, negative included.

    Returns:
        The reading as a float.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` is refused).
        ValueError: If it is NaN or infinite.
    """
    # Timers check a reading on every tick: spare plain finite floats the slower ABC check.
    # (A shortcut only: without it the checks below give the same answer, more slowly.)
    if type(value) is float and math.isfinite(value):  # pragma: no mutate
        return value
    if not _is_real(value):
        raise TypeError(f"{name} must be a clock reading in seconds, got {describe(value)}")
    reading = _to_float(value, name, "clock reading")
    if not math.isfinite(reading):
        raise ValueError(f"{name} must be a finite clock reading, got {describe(value)}")
    return reading


def check_count(
    value: object, name: str, *, minimum: int = 0, maximum: int | None = MAX_COUNT
) -> int:
    """Check a count, such as retries, a concurrency limit or a number of workers.

    Args:
        value: The count the user gave.
        name: The parameter's name, for the message.
        minimum: The smallest count accepted.
        maximum: The largest count accepted: :data:`MAX_COUNT` unless the caller has a
            tighter bound, or None for a count that only the library increments (an
            attempt number) and that no user sets.

    Returns:
        The count as an int.

    Raises:
        TypeError: If ``value`` is not an integer (``bool``, floats and strings are refused).
        ValueError: If it is below ``minimum`` or above ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    count = int(value)
    if count < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {describe(value)}")
    if maximum is not None and count > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {describe(value)}")
    return count


def check_optional_count(
    value: object, name: str, *, minimum: int = 0, maximum: int | None = MAX_COUNT
) -> int | None:
    """Check a count that may be None (no limit): see :func:`check_count`.

    Returns:
        None for None, else the count as an int.

    Raises:
        TypeError: As :func:`check_count`.
        ValueError: As :func:`check_count`.
    """
    if value is None:
        return None
    return check_count(value, name, minimum=minimum, maximum=maximum)


def check_port(value: object, name: str) -> int:
    """Check a TCP port number: 0 (any free port) to :data:`MAX_PORT`.

    Returns:
        The port as an int.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If it is outside 0..65535.
    """
    return check_count(value, name, maximum=MAX_PORT)


def check_host(value: object, name: str) -> str:
    """Check a host name or address to listen on or connect to.

    Returns:
        ``value``, a non-empty string.

    Raises:
        TypeError: If ``value`` is not a string.
        ValueError: If it is empty or only spaces.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a host name or address (a str), got {describe(value)}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty host name or address, got {value!r}")
    return value


def check_coroutine_function(value: T, name: str) -> T:
    """Check that ``value`` is an ``async def`` function (or a partial of one).

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: If it is anything else, such as a plain function or a coroutine object.
    """
    # Kept in a variable so that mypy keeps the caller's own type for the result.
    is_async = inspect.iscoroutinefunction(value)
    if not is_async:
        raise TypeError(f"{name} must be an 'async def' function, got {describe(value)}")
    return value


# An enum class is itself an iterable (of its members), hence the overlap mypy reports; the
# enum branch is tested first, so the first signature is the one that holds.
@overload
def check_choice(  # type: ignore[overload-overlap]
    value: object, name: str, choices: type[E]
) -> E: ...


@overload
def check_choice(value: object, name: str, choices: Iterable[str]) -> str: ...


def check_choice(value: object, name: str, choices: type[E] | Iterable[str]) -> E | str:
    """Check an option that takes one of a few values: an enum's members or some strings.

    Args:
        value: What the user gave: for an enum, a member or a member's value.
        name: The parameter's name, for the message.
        choices: An ``enum.Enum`` subclass, or the accepted strings.

    Returns:
        The enum member, or the string, that ``value`` names.

    Raises:
        ValueError: If ``value`` is none of them, whatever its type; the message lists the
            valid values.
    """
    if isinstance(choices, type) and issubclass(choices, enum.Enum):
        if isinstance(value, choices):
            return value
        for member in choices:
            if value == member.value:
                return member
        valid = ", ".join(repr(member.value) for member in choices)
    else:
        options = tuple(choices)
        for option in options:
            if isinstance(value, str) and value == option:
                return option
        valid = ", ".join(repr(option) for option in options)
    raise ValueError(f"{name} must be one of {valid}, got {describe(value)}")
