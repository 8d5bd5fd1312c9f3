"""A supervisor's restart decisions, as pure functions of time: how often, and how soon.

Nothing here sleeps or reads a clock: the supervisor passes monotonic clock readings in.
"""

from __future__ import annotations

import math
import numbers
import random
from collections import deque
from dataclasses import dataclass

from ._schedule import check_interval

__all__ = ["Backoff", "RestartIntensity"]


class RestartIntensity:
    """At most ``max_restarts`` restarts within any sliding window of ``within`` seconds.

    This is Erlang/OTP's restart intensity (``intensity`` and ``period``): a supervisor asks
    :meth:`allow` before each restart and gives up once it says no. A restart counts
    against the window while its age (``now - when``) is less than ``within``.
    """

    __slots__ = ("_max_restarts", "_recent", "_within")

    def __init__(self, max_restarts: int, within: float) -> None:
        """Create an empty restart history.

        Args:
            max_restarts: Restarts allowed per window; 0 means never restart.
            within: The window length in seconds.

        Raises:
            TypeError: If ``max_restarts`` is not an int or ``within`` is not a number.
            ValueError: If ``max_restarts`` is negative or ``within`` is not finite and > 0.
        """
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
            raise TypeError(f"max_restarts must be an int, got {max_restarts!r}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts!r}")
        self._max_restarts = max_restarts
        self._within = check_interval(within, "within")
        # Only the newest max_restarts restarts can ever decide a refusal.
        self._recent: deque[float] = deque(maxlen=max_restarts)

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
            ValueError: If ``now`` is not finite or is earlier than a recorded restart.
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite clock reading, got {now!r}")
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


def _check_non_negative(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between consecutive restarts, capped, with optional jitter.

    Restart ``n`` (1 for the first in a row) waits ``min(maximum, initial * factor**(n-1))``
    seconds, minus up to ``jitter`` of that at random, so jitter never exceeds the cap and
    spreads restarts of many services that failed together. ``initial=0`` means no backoff.

    Raises:
        TypeError: If a parameter is not a number.
        ValueError: Unless ``initial >= 0``, ``factor >= 1``, ``maximum >= initial`` (all
            finite) and ``0 <= jitter <= 1``.
    """

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("initial", "factor", "maximum", "jitter"):
            object.__setattr__(self, name, _check_non_negative(getattr(self, name), name))
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum!r}) must be >= initial ({self.initial!r})")
        if self.jitter > 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")

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
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise TypeError(f"attempt must be an int, got {attempt!r}")
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt!r}")
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
