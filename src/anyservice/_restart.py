"""A supervisor's restart decisions, as pure functions of time: how often, and how soon.

Nothing here sleeps or reads a clock: the supervisor passes monotonic clock readings in.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from ._checks import Seconds, check_clock_reading, check_count, check_number, check_seconds
from ._schedule import check_interval

__all__ = ["Backoff", "RestartIntensity"]


class RestartIntensity:
    """At most ``max_restarts`` restarts within any sliding window of ``within`` seconds.

    This is Erlang/OTP's restart intensity (``intensity`` and ``period``): a supervisor asks
    :meth:`allow` before each restart and gives up once it says no. A restart counts
    against the window while its age (``now - when``) is less than ``within``.
    """

    __slots__ = ("_max_restarts", "_recent", "_within")

    def __init__(self, max_restarts: int, within: Seconds) -> None:
        """Create an empty restart history.

        Args:
            max_restarts: Restarts allowed per window; 0 means never restart.
            within: The window length in seconds (or a ``timedelta``, or a numeric string).

        Raises:
            TypeError: If ``max_restarts`` is not an int or ``within`` is not a duration.
            ValueError: If ``max_restarts`` is negative or above ``MAX_COUNT``, or ``within``
                is not finite and at least one microsecond.
        """
        self._max_restarts = check_count(max_restarts, "max_restarts")
        self._within = check_interval(within, "within")
        # Only the newest max_restarts restarts can ever decide a refusal. (The bound only
        # saves memory: an unbounded history would give the same answers.)
        self._recent: deque[float] = deque(maxlen=self._max_restarts)  # pragma: no mutate

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_restarts={self._max_restarts!r}, within={self._within!r})"
        )

    @property
    def max_restarts(self) -> int:
        """Restarts allowed within one window."""
        return self._max_restarts

    @property
    def within(self) -> float:
        """The window length in seconds."""
        return self._within

    def allow(self, now: float) -> bool:
        """Ask for a restart at clock reading ``now``, and record it if it is allowed.

        Returns:
            True if, counting this restart, at most ``max_restarts`` restarts fall within the
            last ``within`` seconds (the restart is then recorded); False otherwise, and
            nothing is recorded.

        Raises:
            TypeError: If ``now`` is not a number.
            ValueError: If ``now`` is not finite or is earlier than a recorded restart.
        """
        now = check_clock_reading(now, "now")
        recent = self._recent
        if recent and now < recent[-1]:
            raise ValueError(f"now ({now!r}) is before the last restart ({recent[-1]!r})")
        while recent and now - recent[0] >= self._within:
            recent.popleft()
        if len(recent) >= self._max_restarts:
            return False
        recent.append(now)
        return True

    def reset(self) -> None:
        """Forget every recorded restart."""
        self._recent.clear()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between consecutive restarts, capped, with optional jitter.

    Restart ``n`` (1 for the first in a row) waits ``min(maximum, initial * factor**(n-1))``
    seconds, minus up to ``jitter`` of that at random, so jitter never exceeds the cap and
    spreads restarts of many services that failed together. ``initial=0`` means no backoff.

    ``initial`` and ``maximum`` are durations: seconds, a ``timedelta`` or a numeric string.

    Raises:
        TypeError: If a parameter is not a number (or, for the durations, a duration).
        ValueError: Unless ``initial >= 0``, ``factor >= 1``, ``maximum >= initial`` (all
            finite) and ``0 <= jitter <= 1``.
    """

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        checked = {
            "initial": check_seconds(self.initial, "initial", allow_zero=True),
            "factor": check_number(self.factor, "factor", minimum=1),
            "maximum": check_seconds(self.maximum, "maximum", allow_zero=True),
            "jitter": check_number(self.jitter, "jitter", minimum=0, maximum=1),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum!r}) must be >= initial ({self.initial!r})")

    def delay(self, attempt: int, *, rng: random.Random | float | None = None) -> float:
        """Seconds to wait before the ``attempt``-th consecutive restart.

        Args:
            attempt: 1 for the first restart after a success, 2 for the next, and so on.
            rng: Where jitter comes from: a ``random.Random``, a fixed sample in [0, 1), or
                None for the ``random`` module's generator. Unused when ``jitter`` is 0.

        Returns:
            A delay between 0 and ``maximum``, not decreasing with ``attempt`` for a given
            jitter sample.

        Raises:
            TypeError: If ``attempt`` is not an int.
            ValueError: If ``attempt`` < 1 or a fixed sample is outside [0, 1).
        """
        attempt = check_count(attempt, "attempt", minimum=1, maximum=None)
        if self.initial == 0:
            return 0.0
        try:
            delay = min(self.maximum, self.initial * self.factor ** (attempt - 1))
        except OverflowError:
            # factor ** n overflows only far beyond the point where it reaches the cap.
            delay = self.maximum
        if self.jitter == 0:
            return delay
        if rng is None:
            sample = random.random()
        elif isinstance(rng, random.Random):
            sample = rng.random()
        else:
            sample = float(rng)
            if not 0 <= sample < 1:
                raise ValueError(f"a fixed jitter sample must be in [0, 1), got {rng!r}")
        return delay * (1 - self.jitter * sample)
