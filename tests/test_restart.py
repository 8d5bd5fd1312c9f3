"""Restart intensity and backoff, tested as pure functions of time."""

from __future__ import annotations

import datetime as dt
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyservice._restart import Backoff, RestartIntensity

# ---------------------------------------------------------------------------------------
# RestartIntensity
# ---------------------------------------------------------------------------------------


def test_restarts_up_to_the_limit_are_allowed_then_refused() -> None:
    intensity = RestartIntensity(3, within=10.0)
    assert [intensity.allow(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]


def test_a_restart_is_allowed_again_once_the_oldest_leaves_the_window() -> None:
    intensity = RestartIntensity(2, within=10.0)
    assert intensity.allow(0.0)
    assert intensity.allow(5.0)
    assert not intensity.allow(9.999)
    # At exactly `within` seconds old a restart no longer counts.
    assert intensity.allow(10.0)
    assert not intensity.allow(14.0)
    assert intensity.allow(15.0)


def test_a_refused_restart_is_not_recorded() -> None:
    intensity = RestartIntensity(1, within=10.0)
    assert intensity.allow(0.0)
    assert not intensity.allow(9.0)
    # Had the refusal at 9.0 counted, 12.0 would be refused too.
    assert intensity.allow(12.0)


def test_zero_max_restarts_never_allows_a_restart() -> None:
    intensity = RestartIntensity(0, within=1.0)
    assert not intensity.allow(0.0)
    assert not intensity.allow(1e9)


def test_reset_forgets_recorded_restarts() -> None:
    intensity = RestartIntensity(1, within=10.0)
    assert intensity.allow(0.0)
    intensity.reset()
    assert intensity.allow(1.0)


def test_time_going_backwards_is_refused_loudly() -> None:
    intensity = RestartIntensity(2, within=10.0)
    intensity.allow(5.0)
    with pytest.raises(ValueError, match="before the last restart"):
        intensity.allow(4.0)


@pytest.mark.parametrize("now", [math.nan, math.inf])
def test_now_must_be_finite(now: float) -> None:
    with pytest.raises(ValueError, match=f"^now must be a finite clock reading, got {now!r}$"):
        RestartIntensity(2, within=10.0).allow(now)


def test_now_must_be_a_number() -> None:
    with pytest.raises(TypeError, match=r"^now must be a clock reading in seconds, got '5'$"):
        RestartIntensity(2, within=10.0).allow("5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_restarts", "within", "error", "message"),
    [
        (-1, 1.0, ValueError, "max_restarts must be an int >= 0, got -1"),
        (2**31, 1.0, ValueError, "max_restarts must be an int <= 2147483647, got 2147483648"),
        (1.5, 1.0, TypeError, "max_restarts must be an int, got 1.5"),
        (True, 1.0, TypeError, "max_restarts must be an int"),
        (1, 0, ValueError, "within must be a finite number of seconds > 0, got 0"),
        (1, -5.0, ValueError, "within .* got -5.0"),
        (1, math.inf, ValueError, "within .* got inf"),
        (1, "five", ValueError, "within must be a number of seconds, got the string 'five'"),
        (1, [5], TypeError, "within must be a number of seconds"),
        (1, 1e-7, ValueError, "within must be at least 1e-06 seconds, got 1e-07"),
    ],
)
def test_bad_intensity_parameters_are_refused(
    max_restarts: int, within: float, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RestartIntensity(max_restarts, within)


def test_intensity_repr_shows_its_limits() -> None:
    assert repr(RestartIntensity(3, 5)) == "RestartIntensity(max_restarts=3, within=5.0)"


restart_times = st.lists(
    st.one_of(
        st.floats(0, 100),
        # Whole and half seconds land exactly on window edges and repeat each other.
        st.integers(0, 200).map(lambda half_seconds: half_seconds / 2),
    ),
    max_size=60,
).map(sorted)
windows = st.one_of(st.floats(1e-3, 50), st.integers(1, 20).map(float))


def in_window(accepted: list[float], now: float, within: float) -> int:
    """Brute force: how many accepted restarts are younger than `within` at `now`."""
    return sum(1 for t in accepted if t <= now and now - t < within)


@settings(max_examples=300)
@given(st.integers(0, 6), windows, restart_times)
def test_a_restart_is_refused_exactly_when_it_would_exceed_the_limit(
    max_restarts: int, within: float, times: list[float]
) -> None:
    intensity = RestartIntensity(max_restarts, within)
    accepted: list[float] = []
    for now in times:
        fits = in_window(accepted, now, within) + 1 <= max_restarts
        assert intensity.allow(now) == fits
        if fits:
            accepted.append(now)


@settings(max_examples=300)
@given(st.integers(0, 6), windows, restart_times)
def test_accepted_restarts_never_exceed_the_limit_in_any_window(
    max_restarts: int, within: float, times: list[float]
) -> None:
    intensity = RestartIntensity(max_restarts, within)
    accepted = [now for now in times if intensity.allow(now)]
    # The fullest window of length `within` ends at an accepted restart.
    for end in accepted:
        assert in_window(accepted, end, within) <= max_restarts


# ---------------------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------------------


def test_backoff_doubles_from_initial_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, maximum=3.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_defaults() -> None:
    assert Backoff() == Backoff(initial=0.1, factor=2.0, maximum=30.0, jitter=0.0)
    assert Backoff().delay(1) == 0.1


def test_zero_initial_means_no_backoff() -> None:
    backoff = Backoff(initial=0)
    assert backoff.delay(1) == 0.0
    assert backoff.delay(10**6) == 0.0


def test_factor_one_gives_a_constant_delay() -> None:
    backoff = Backoff(initial=2.0, factor=1.0, maximum=5.0)
    assert {backoff.delay(n) for n in (1, 2, 10**9)} == {2.0}


@pytest.mark.parametrize("attempt", [10**4, 10**9, 10**400])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    assert Backoff(initial=1.0, factor=3.0, maximum=60.0).delay(attempt) == 60.0


def test_jitter_takes_up_to_its_fraction_off_the_delay() -> None:
    backoff = Backoff(initial=4.0, factor=2.0, maximum=100.0, jitter=0.5)
    assert backoff.delay(1, rng=0.0) == 4.0
    assert backoff.delay(1, rng=0.5) == 3.0
    assert backoff.delay(2, rng=0.25) == 7.0


def test_jitter_from_a_seeded_random_is_reproducible() -> None:
    backoff = Backoff(initial=1.0, jitter=1.0)
    first = [backoff.delay(n, rng=random.Random(7)) for n in range(1, 8)]
    second = [backoff.delay(n, rng=random.Random(7)) for n in range(1, 8)]
    assert first == second


def test_jitter_defaults_to_the_random_module() -> None:
    random.seed(3)
    expected = 8.0 * (1 - 0.25 * random.random())
    random.seed(3)
    assert Backoff(initial=8.0, maximum=8.0, jitter=0.25).delay(1) == expected


@pytest.mark.parametrize("sample", [1.0, -0.1, math.nan])
def test_a_fixed_jitter_sample_must_be_in_the_unit_interval(sample: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Backoff(jitter=0.5).delay(1, rng=sample)


@pytest.mark.parametrize(
    ("attempt", "error", "message"),
    [
        (0, ValueError, "attempt must be an int >= 1, got 0"),
        (-1, ValueError, "attempt must be an int >= 1, got -1"),
        (1.0, TypeError, "attempt must be an int, got 1.0"),
    ],
)
def test_attempts_count_from_one(attempt: int, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        Backoff().delay(attempt)


def test_attempts_have_no_upper_bound() -> None:
    assert Backoff(initial=1.0, maximum=5.0).delay(2**40) == 5.0


def test_full_jitter_can_take_the_whole_delay_off() -> None:
    backoff = Backoff(initial=1.0, jitter=1.0)
    assert backoff.delay(1, rng=0.5) == 0.5
    assert backoff.delay(1, rng=0.0) == 1.0


def test_no_jitter_draws_no_random_number() -> None:
    random.seed(5)
    expected = random.random()
    random.seed(5)
    assert Backoff(initial=1.0).delay(1) == 1.0
    assert random.random() == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -1.0}, "initial must be a finite number of seconds >= 0, got -1.0"),
        ({"initial": math.nan}, "initial .* got nan"),
        ({"factor": 0.5}, "factor must be >= 1, got 0.5"),
        ({"factor": math.inf}, "factor .* got inf"),
        ({"initial": 10.0, "maximum": 5.0}, r"maximum \(5.0\) must be >= initial \(10.0\)"),
        ({"maximum": -1.0}, r"^maximum must be a finite number of seconds >= 0, got -1.0$"),
        ({"jitter": 1.5}, "jitter must be <= 1, got 1.5"),
        ({"jitter": -0.1}, "jitter .* got -0.1"),
    ],
)
def test_bad_backoff_parameters_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


def test_backoff_parameters_must_be_numbers() -> None:
    with pytest.raises(TypeError, match="initial must be a number"):
        Backoff(initial=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factor must be a number, got '2'"):
        Backoff(factor="2")  # type: ignore[arg-type]


def test_backoff_durations_may_be_timedeltas_or_numeric_strings() -> None:
    backoff = Backoff(initial=dt.timedelta(milliseconds=250), maximum="4")  # type: ignore[arg-type]
    assert (backoff.initial, backoff.maximum) == (0.25, 4.0)
    assert backoff.delay(3) == 1.0


def test_a_restart_window_may_be_a_timedelta_or_a_numeric_string() -> None:
    assert RestartIntensity(1, dt.timedelta(minutes=1)).within == 60.0
    assert RestartIntensity(1, "2.5").within == 2.5


backoffs = st.builds(
    lambda initial, factor, headroom, jitter: Backoff(initial, factor, initial + headroom, jitter),
    initial=st.one_of(st.just(0.0), st.floats(0, 100)),
    factor=st.one_of(st.just(1.0), st.floats(1, 10)),
    headroom=st.floats(0, 1e4),
    jitter=st.one_of(st.just(0.0), st.floats(0, 1)),
)
attempts = st.one_of(st.integers(1, 100), st.integers(1, 10**30))


@settings(max_examples=300)
@given(backoffs, attempts, attempts, st.floats(0, 1, exclude_max=True))
def test_backoff_never_decreases_for_a_given_jitter_sample(
    backoff: Backoff, first: int, second: int, sample: float
) -> None:
    low, high = sorted((first, second))
    assert backoff.delay(low, rng=sample) <= backoff.delay(high, rng=sample)


@settings(max_examples=300)
@given(backoffs, attempts, st.floats(0, 1, exclude_max=True))
def test_backoff_stays_between_zero_and_the_maximum(
    backoff: Backoff, attempt: int, sample: float
) -> None:
    delay = backoff.delay(attempt, rng=sample)
    assert math.isfinite(delay)
    assert 0 <= delay <= backoff.maximum
    undisturbed = backoff.delay(attempt, rng=0.0)
    assert undisturbed * (1 - backoff.jitter) <= delay * (1 + 1e-12)
