"""Exception groups as a service tree sees them: leaves, cancellation, the error to show."""

from __future__ import annotations

import anyio

__all__ = [
    "LOGGED",
    "first_real_error",
    "is_logged",
    "leaves",
    "mark_logged",
    "only_cancellation",
    "real_leaves",
]

# Marks an exception already logged as a crash: a crash travels up through every service
# above the one that crashed, and is logged with its traceback only once, where it happened.
LOGGED = "__anyservice_logged__"


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, groups flattened, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def real_leaves(exc: BaseException) -> list[BaseException]:
    """The leaves of ``exc`` that are not the backend's cancellation."""
    cancelled = anyio.get_cancelled_exc_class()
    return [leaf for leaf in leaves(exc) if not isinstance(leaf, cancelled)]


def only_cancellation(exc: BaseException) -> bool:
    """True if every leaf of ``exc`` is the backend's cancellation."""
    cancelled = anyio.get_cancelled_exc_class()
    return all(isinstance(leaf, cancelled) for leaf in leaves(exc))


def first_real_error(exc: BaseException) -> BaseException:
    """The error a user wants to see: the single non-cancellation leaf, or the group."""
    real = real_leaves(exc)
    return real[0] if len(real) == 1 else exc


def is_logged(exc: BaseException) -> bool:
    """True if ``exc`` was already logged as a crash."""
    return bool(getattr(exc, LOGGED, False))


def mark_logged(exc: BaseException) -> None:
    setattr(exc, LOGGED, True)
