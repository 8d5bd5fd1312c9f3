"""Diagnostics: mode's ``Diag`` flags, task stacks on both backends, and tree dumps."""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, ParamSpec, TypeVar

from ._host import Host

__all__ = ["Diag", "coroutine_stack", "format_tree", "transitions_to"]

P = ParamSpec("P")
R = TypeVar("R")


class Diag:
    """What a service is doing right now, as named flags (mode's ``Diag``).

    ``flags`` holds the flags set; ``last_transition`` when each was last set or unset
    (wall-clock seconds), so a service stuck in ``"FLUSHING"`` shows since when.
    """

    __slots__ = ("_flags", "_last_transition", "service_name")

    def __init__(self, service: str | Host) -> None:
        # mode's Diag takes the service; a name does as well.
        self.service_name = service if isinstance(service, str) else service.name
        # Made at the first use: most services never set a flag, and thousands add up.
        self._flags: set[str] | None = None
        self._last_transition: dict[str, float] | None = None

    @property
    def flags(self) -> set[str]:
        """The flags set now."""
        if self._flags is None:
            self._flags = set()
        return self._flags

    @flags.setter
    def flags(self, flags: set[str]) -> None:
        self._flags = flags

    @property
    def last_transition(self) -> dict[str, float]:
        """When each flag was last set or unset (wall-clock seconds)."""
        if self._last_transition is None:
            self._last_transition = {}
        return self._last_transition

    @last_transition.setter
    def last_transition(self, transitions: dict[str, float]) -> None:
        self._last_transition = transitions

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)
        self.last_transition[flag] = time.time()

    def unset_flag(self, flag: str) -> None:
        self.flags.discard(flag)
        self.last_transition[flag] = time.time()

    def __repr__(self) -> str:
        return f"<Diag {self.service_name} {sorted(self.flags)}>"


def transitions_to(flag: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Set ``flag`` on ``self.diag`` while the decorated coroutine method runs (mode's)."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            diag: Diag = args[0].diag  # type: ignore[attr-defined]
            diag.set_flag(flag)
            try:
                return await method(*args, **kwargs)
            finally:
                diag.unset_flag(flag)

        return wrapper

    return decorate


def coroutine_stack(coro: object) -> traceback.StackSummary:
    """The stack of a suspended task, outermost frame first, from its coroutine object.

    Follows ``cr_await`` / ``gi_yieldfrom`` / ``ag_await`` down to where the task waits, so
    it works for any task on asyncio and on trio without backend code.
    """
    frames: list[tuple[FrameType, int]] = []
    current: Any = coro
    seen = 0
    while current is not None and seen < 1000:
        seen += 1
        frame = (
            getattr(current, "cr_frame", None)
            or getattr(current, "gi_frame", None)
            or getattr(current, "ag_frame", None)
        )
        if frame is not None:
            frames.append((frame, frame.f_lineno))
        current = (
            getattr(current, "cr_await", None)
            or getattr(current, "gi_yieldfrom", None)
            or getattr(current, "ag_await", None)
        )
    return traceback.StackSummary.extract(iter(frames), capture_locals=False)


def format_tree(root: Host) -> str:
    """A readable dump of a service tree: one line per service, children indented."""
    lines: list[str] = []

    def visit(service: Host, prefix: str, connector: str, child_prefix: str) -> None:
        lines.append(f"{prefix}{connector}{service.describe()}")
        children = service.children()
        for index, child in enumerate(children):
            last = index == len(children) - 1
            visit(
                child,
                prefix + child_prefix,
                "└── " if last else "├── ",
                "    " if last else "│   ",
            )

    visit(root, "", "", "")
    return "\n".join(lines)
