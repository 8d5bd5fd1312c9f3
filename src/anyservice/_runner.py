"""``anyservice.run``: run one service to its end from synchronous code, with signals.

The runner's task group holds the service's run, in a cancel scope of its own, and a task
that receives signals through anyio (so both backends, no backend code): the first SIGINT
or SIGTERM asks the service to stop gracefully, a second one cancels that scope, and SIGUSR1
logs the service tree and its task stacks. Once that forced stop has begun, SIGINT and
SIGTERM are ignored until ``run()`` returns: a receiver that closes puts back a handler
(the default action on asyncio, the one it found on trio, which then delivers again what it
had not handed out), and a third signal must not kill the process before it reports how it
ended. What the service's run ends with becomes the exit code.

Around the run, and outliving it, an optional status server (so ``/readyz`` says the tree
is stopping while it drains) and, under systemd, the notify protocol.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from types import FrameType
from typing import Any, Literal

import anyio
import anyio.abc

from ._blocking import BlockingDetector
from ._checks import check_choice
from ._core import LOGGED as _LOGGED
from ._core import Service
from ._core import leaves as _leaves
from ._status import StatusServer
from ._status._systemd import SystemdNotifier

__all__ = ["run", "run_here"]

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
    status_port: int | None = None,
    status_host: str = "127.0.0.1",
    metrics: bool | None = None,
) -> int:
    """Run ``service`` on ``backend`` until it stops and return the process exit code.

    With ``handle_signals`` (the default), the first SIGINT or SIGTERM stops the service
    gracefully, within its ``shutdown_timeout``; a second one stops it at once (its run is
    cancelled, grace period or not); SIGUSR1 logs the service tree and the stacks of its
    tasks at WARNING on the ``anyservice.runner`` logger. With ``blocking_threshold``, a
    :class:`BlockingDetector` warns whenever the event loop is blocked for longer.

    With ``status_port``, a :class:`StatusServer` for the tree serves ``/``, ``/healthz``,
    ``/readyz``, ``/tree`` and ``/metrics`` on ``status_host`` (loopback by default) from
    before the start until the service's run has ended; port 0 picks a free port, logged
    as ``status on http://HOST:PORT/``. ``metrics`` is the server's (``None``: on when
    prometheus_client is installed). When ``NOTIFY_SOCKET`` is set (systemd's
    ``Type=notify``), the runner sends ``READY=1`` once the service is RUNNING,
    ``STOPPING=1`` when it stops, a one-line ``STATUS=``, and ``WATCHDOG=1`` every half
    ``WATCHDOG_USEC`` while the event loop answers.

    Exit codes: 0 when the service stopped, also after a signal; 1 when it crashed (the
    service has logged the crash with its traceback); ``n`` for ``SystemExit(n)`` raised in
    the service; 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) for a stop
    forced by a second signal, or for a ``KeyboardInterrupt``, as a shell reports a process
    killed by that signal.

    Raises:
        TypeError: if ``service`` is not a Service.
        ValueError: for an unknown backend, a bad ``blocking_threshold`` or status port,
            or ``metrics=True`` without a status port.
        ImportError: a status server was asked for and hypercorn (or, with
            ``metrics=True``, prometheus_client) is not installed.
    """
    if not isinstance(service, Service):
        raise TypeError(f"anyservice.run() needs a Service, got {service!r}")
    check_choice(backend, "backend", _BACKENDS)
    detector = None if blocking_threshold is None else BlockingDetector(blocking_threshold)
    status = _status_server(service, status_port, status_host, metrics)
    runner = _Runner(service, handle_signals=handle_signals, detector=detector, status=status)
    with _unreceived_signals_to(runner, handle_signals):
        try:
            anyio.run(runner.serve, backend=backend)
        except BaseException as exc:
            # asyncio lets SystemExit and KeyboardInterrupt out of the loop at once, bare.
            runner.error = runner.error or exc
        return runner.exit_code()


def _status_server(
    service: Service, port: int | None, host: str, metrics: bool | None
) -> StatusServer | None:
    """The status server that :func:`run` was asked for, if any (checked before the loop)."""
    if port is None:
        if metrics:
            raise ValueError("metrics=True needs a status server: give status_port too")
        return None
    return StatusServer(service, port=port, host=host, metrics=metrics)


@contextmanager
def _unreceived_signals_to(runner: _Runner, handle_signals: bool) -> Iterator[None]:
    """While the block runs, a stop signal that no receiver takes goes to ``runner``.

    The handlers found before are put back when the block ends, however it ends.
    """
    previous = {which: signal.getsignal(which) for which in _STOP_SIGNALS} if handle_signals else {}
    runner.previous_handlers = previous
    for which in previous:
        # What a stop signal does while no receiver is open. trio's receiver restores this
        # handler when it closes and then delivers again the signals it had not handed out.
        signal.signal(which, runner.unreceived_signal)
    try:
        yield
    finally:
        runner.previous_handlers = {}
        for which, handler in previous.items():
            signal.signal(which, handler)


async def run_here(service: Service, *, handle_signals: bool = True) -> int:
    """:func:`run` inside the running event loop: run ``service`` to its end there.

    The same signals, logs and exit codes as :func:`run`, for code that already has an
    event loop (``await serve(...)``).

    Raises:
        TypeError: if ``service`` is not a Service.
    """
    if not isinstance(service, Service):
        raise TypeError(f"anyservice.run_here() needs a Service, got {service!r}")
    runner = _Runner(service, handle_signals=handle_signals, detector=None)
    await runner.serve()
    return runner.exit_code()


class _Runner:
    def __init__(
        self,
        service: Service,
        *,
        handle_signals: bool,
        detector: BlockingDetector | None,
        status: StatusServer | None = None,
    ) -> None:
        self.service = service
        # getattr: a subclass whose __init__ forgot super().__init__() has no name, and run()
        # reports that as an error to log.
        self.name: str = getattr(service, "name", type(service).__name__)
        self.handle_signals = handle_signals
        self.detector = detector
        self.status = status
        #: The stop signals' handlers before run(), for a signal no receiver takes.
        self.previous_handlers: dict[signal.Signals, Any] = {}
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
            if self.status is not None:
                await stack.enter_async_context(self.status)
                log.info("%s: status on %s", self.name, self.status.url)
            async with anyio.create_task_group() as task_group:
                if self.handle_signals:
                    await task_group.start(self._receive_signals, name="anyservice signals")
                notifier = SystemdNotifier.from_environment()
                if notifier is not None:
                    task_group.start_soon(notifier.run, self.service, name="systemd notify")
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
        try:
            with anyio.open_signal_receiver(*wanted) as received:
                task_status.started()
                async for signum in received:
                    which = signal.Signals(signum)
                    if which in _STOP_SIGNALS:
                        await self._stop_on(which)
                    else:
                        self.log_stacks(which)
        finally:
            if self.forced_by is not None:
                # asyncio's receiver restores the default actions when it closes: right
                # after it, not one checkpoint later, ignore them until run() returns.
                for stop_signal in _STOP_SIGNALS:
                    signal.signal(stop_signal, signal.SIG_IGN)

    def unreceived_signal(self, signum: int, frame: FrameType | None) -> None:
        """A stop signal while no receiver is open: ignored once the forced stop has begun,
        otherwise what the handler before ``run()`` would have done."""
        if self.forced_by is not None:
            return
        handler = self.previous_handlers.get(signal.Signals(signum), signal.SIG_DFL)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

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
