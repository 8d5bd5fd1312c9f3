"""Handing a call to a running event loop, from another thread or a signal handler.

A synchronous ``request_stop()`` may come from another thread, or from a signal handler
that interrupts the event loop's own code between two bytecodes. Neither may touch the
loop's state directly; both may use the loop's thread-safe and signal-safe hand-over
(asyncio's ``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``, both behind
anyio's event loop token), which runs the call at the loop's next turn, where anyio knows
which backend it is on.
"""

from __future__ import annotations

from collections.abc import Callable

from anyio.lowlevel import EventLoopToken, current_token

__all__ = ["EventLoopToken", "call_in_loop", "current_token"]


def call_in_loop(token: EventLoopToken, function: Callable[[], object]) -> bool:
    """Run ``function`` at the next turn of the loop of ``token``; False if it has finished."""
    try:
        token.backend_class.run_sync_soon(function, (), token.native_token)
    except RuntimeError:
        # The loop has finished (anyio's RunFinishedError) or its asyncio loop is closed.
        return False
    return True
