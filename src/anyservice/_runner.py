"""``anyservice.run``: run one service to its end from synchronous code, with signals.

The runner's task group holds the service's run, in a cancel scope of its own, and a task
that receives signals through anyio (so both backends, no backend code): the first SIGINT
or SIGTERM asks the service to stop gracefully, a second one cancels that scope, and SIGUSR1
logs the service tree and its task stacks. What the service's run ends with becomes the exit
code.
"""

from __future__ import annotations

import logging
import signal
from contextlib import AsyncExitStack
from typing import Literal

import anyio
import anyio.abc

from ._blocking import BlockingDetector
from ._core import LOGGED as _LOGGED
from ._core import Service
from ._core import leaves as _leaves

__all__ = ["run"]

log = logging.getLogger("anyservice.runner")

#: Exit code of a service that stopped (by itself, by a stop, or after a signal).
EXIT_OK = 0
#: Exit code of a service that crashed.
EXIT_CRASH = 1

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_BACKENDS = ("asyncio", "trio")


def run(
    service: Service,
    *,
    backend: Literal["asyncio", "trio"] = "asyncio",
    handle_signals: bool = True,
    blocking_threshold: float | None = None,
) -> int:
    """Run ``service`` on ``backend`` until it stops and return the process exit code.

    With ``handle_signals`` (the default), the first SIGINT or SIGTERM stops the service
    gracefully, within its ``shutdown_timeout``; a second one stops it at once (its run is
    cancelled, grace period or not); SIGUSR1 logs the service tree and the stacks of its
    tasks at WARNING on the ``anyservice.runner`` logger. With ``blocking_threshold``, a
    :class:`BlockingDetector` warns whenever the event loop is blocked for longer.

    Exit codes: 0 when the service stopped, also after a signal; 1 when it crashed (the
    service has logged the crash with its traceback); ``n`` for ``SystemExit(n)`` raised in
    the service; 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) for a stop
    forced by a second signal, or for a ``KeyboardInterrupt``, as a shell reports a process
    killed by that signal.

    Raises:
        TypeError: if ``service`` is not a Service.
        ValueError: for an unknown backend or a bad ``blocking_threshold``.
    """
    if not isinstance(service, Service):
        raise TypeError(f"anyservice.run() needs a Service, got {service!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    detector = None if blocking_threshold is None else BlockingDetector(blocking_threshold)
    runner = _Runner(service, handle_signals=handle_signals, detector=detector)
    try:
        anyio.run(runner.serve, backend=backend)
    except BaseException as exc:
        # asyncio lets SystemExit and KeyboardInterrupt out of the loop at once, bare.
        runner.error = runner.error or exc
    return runner.exit_code()


class _Runner:
    def __init__(
        self, service: Service, *, handle_signals: bool, detector: BlockingDetector | None
    ) -> None:
        self.service = service
        # getattr: a subclass whose __init__ forgot super().__init__() has no name, and run()
        # reports that as an error to log.
        self.name: str = getattr(service, "name", type(service).__name__)
        self.handle_signals = handle_signals
        self.detector = detector
        #: The scope of the service's run (made in the loop): a second stop signal cancels it.
        self.scope: anyio.CancelScope | None = None
        self.stop_signal: signal.Signals | None = None
        self.forced_by: signal.Signals | None = None
        self.error: BaseException | None = None
        self.cancelled_class: type[BaseException] = BaseException

    async def serve(self) -> None:
        self.cancelled_class = anyio.get_cancelled_exc_class()
        self.scope = scope = anyio.CancelScope()
        async with AsyncExitStack() as stack:
            if self.detector is not None:
                await stack.enter_async_context(self.detector)
            async with anyio.create_task_group() as task_group:
                if self.handle_signals:
                    await task_group.start(self._receive_signals, name="anyservice signals")
                try:
                    with scope:
                        await self.service.run()
                except BaseException as exc:
                    if all(isinstance(leaf, self.cancelled_class) for leaf in _leaves(exc)):
                        # Cancelled from outside the runner (asyncio's own Ctrl-C handling):
                        # let it through, so that anyio.run() reports the interrupt.
                        raise
                    # Kept, not raised: raised out of the main task, asyncio would log it
                    # with its traceback once more at shutdown.
                    self.error = exc
                task_group.cancel_scope.cancel()

    async def _receive_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        wanted = [*_STOP_SIGNALS]
        if hasattr(signal, "SIGUSR1"):
            wanted.append(signal.SIGUSR1)
        with anyio.open_signal_receiver(*wanted) as received:
            task_status.started()
            async for signum in received:
                which = signal.Signals(signum)
                if which in _STOP_SIGNALS:
                    await self._stop_on(which)
                else:
                    self.log_stacks(which)

    async def _stop_on(self, which: signal.Signals) -> None:
        service = self.service
        if self.stop_signal is None:
            self.stop_signal = which
            log.info(
                "received %s: stopping %s gracefully (shutdown_timeout=%ss); "
                "send SIGINT or SIGTERM again to stop it at once",
                which.name,
                service.name,
                service.shutdown_timeout,
            )
            await service.stop(block=False)
        elif self.forced_by is None:
            self.forced_by = which
            log.warning("received %s again: stopping %s at once", which.name, service.name)
            assert self.scope is not None
            self.scope.cancel()

    def log_stacks(self, which: signal.Signals) -> None:
        stacks = self.service.tracebacks()
        log.warning(
            "received %s: the service tree and the stacks of its tasks\n%s\n%s",
            which.name,
            self.service.dump_tree(),
            "\n".join(f"--- {task}\n{stack.rstrip()}" for task, stack in stacks.items())
            or "(no tasks running)",
        )

    def exit_code(self) -> int:
        error = self.error
        name = self.name
        if error is not None:
            leaves = _leaves(error)
            for leaf in leaves:
                if isinstance(leaf, SystemExit):
                    code = _system_exit_code(leaf)
                    log.info("%s raised SystemExit(%r): exit code %d", name, leaf.code, code)
                    return code
            if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
                code = 128 + signal.SIGINT
                log.info("%s interrupted (KeyboardInterrupt): exit code %d", name, code)
                return code
            real = [leaf for leaf in leaves if not isinstance(leaf, self.cancelled_class)]
            if real and all(getattr(leaf, _LOGGED, False) for leaf in real):
                shown = real[0] if len(real) == 1 else error
                log.info("%s crashed (%r): exit code %d", name, shown, EXIT_CRASH)
            else:
                # Not a crash of the service (it was not even started, say): nobody has
                # logged it yet.
                log.error("%s failed: exit code %d", name, EXIT_CRASH, exc_info=error)
            return EXIT_CRASH
        if self.forced_by is not None and self.scope is not None and self.scope.cancelled_caught:
            code = 128 + self.forced_by
            log.info("%s stopped at once: exit code %d", name, code)
            return code
        log.info("%s stopped: exit code %d", name, EXIT_OK)
        return EXIT_OK


def _system_exit_code(exc: SystemExit) -> int:
    """What the interpreter would exit with for ``exc``."""
    code = exc.code
    if code is None:
        return EXIT_OK
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    # sys.exit("message"): the interpreter prints the message and exits with 1.
    log.error("%s", code)
    return 1
