"""The ``anyservice`` command: ``anyservice run package.module:attribute``.

Also ``python -m anyservice ...``. Mistakes in what to run (an import path that does not
import, a missing attribute, an object that is not a service, a factory that raises) are
reported in one line with exit code 2, as argparse reports its own usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Literal, cast

from ._checks import check_host, check_port
from ._core import Service
from ._logging import JsonFormatter
from ._runner import run

__all__ = ["main"]

log = logging.getLogger("anyservice.runner")

#: Exit code of a command line that cannot run: a usage error, or a target that is not one.
EXIT_USAGE = 2

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"

_DESCRIPTION = """\
Run long-running async services built with anyservice.
"""

_RUN_DESCRIPTION = """\
Run a service until it stops; the exit code says how it ended.

TARGET is package.module:attribute, imported with the current directory first on
sys.path. The attribute may be a dotted path (package.module:app.service) and names
  - a Service instance,
  - a Service subclass, created with no arguments, or
  - a zero-argument factory (a function) that returns a Service.

The first SIGINT or SIGTERM stops the service gracefully, within its shutdown timeout; a
second one stops it at once (further ones are ignored). SIGUSR1 logs the service tree and
the stacks of its tasks.

With --status-port, a status server answers on 127.0.0.1 (or --status-host): GET / (a
live page), /healthz, /readyz, /tree (JSON) and /metrics (Prometheus, with
anyservice[metrics]). Under systemd (NOTIFY_SOCKET set), it speaks the notify protocol:
READY=1, STOPPING=1, STATUS= and the watchdog.
"""

_RUN_EPILOG = """\
exit codes:
  0    the service stopped (by itself, or gracefully after a signal)
  1    the service crashed (its traceback is logged once)
  2    usage error: bad arguments, or a TARGET that does not give a service
  n    the service raised SystemExit(n)
  130  stopped at once by a second SIGINT (143 for SIGTERM: 128 + the signal number)

examples:
  anyservice run myapp.services:Poller
  anyservice run myapp.main:build --backend trio --shutdown-timeout 10
  python -m anyservice run myapp.main:app.worker --log-level DEBUG --blocking-threshold 0.5
  anyservice run myapp.main:build --status-port 8000 --log-format json
"""


class TargetError(Exception):
    """The target does not give a service; the message is the one line the user sees."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``anyservice`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit code: the runner's (0, 1, 128 + signal, or a service's
    ``SystemExit(n)``), or 2 for a usage error or a target that does not give a service.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits for --help (0) and for usage errors (2): return it, as documented.
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if hasattr(args, "handler"):  # the task queue's commands: serve, runs
        return int(args.handler(args))
    _configure_logging(args.log_level, args.log_format)
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        return _fail("the trio backend needs trio: pip install 'anyservice[trio]'")
    if args.metrics and args.status_port is None:
        return _fail("--metrics needs a status server: give --status-port too")
    try:
        service = load_service(args.target)
    except TargetError as error:
        log.debug("could not load %s", args.target, exc_info=True)
        return _fail(str(error))
    if args.shutdown_timeout is not None:
        service.shutdown_timeout = args.shutdown_timeout
    log.info("running %s (%s) on %s, pid %d", args.target, service.name, args.backend, os.getpid())
    try:
        return run(
            service,
            backend=cast(Literal["asyncio", "trio"], args.backend),
            blocking_threshold=args.blocking_threshold,
            status_port=args.status_port,
            status_host=args.status_host,
            metrics=args.metrics,
        )
    except ImportError as error:
        # An extra the options need is not installed: the message says which.
        return _fail(str(error))


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


def _fail(message: str) -> int:
    print(f"anyservice: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def load_service(target: str) -> Service:
    """The service ``target`` (``package.module:attribute``) names, created if need be.

    Raises:
        TargetError: naming what went wrong, in one line, for a malformed target, a module
            that does not import, a missing attribute, a factory that raises, or an object
            that is not a service.
    """
    return _as_service(load_object(target), target)


def load_object(target: str) -> object:
    """The object ``target`` (``package.module:attribute``) names.

    Raises:
        TargetError: for a malformed target, a module that does not import, or a missing
            attribute, in one line.
    """
    module_name, colon, attribute_path = target.partition(":")
    if not colon or not module_name or not attribute_path:
        raise TargetError(f"TARGET must look like package.module:attribute, got {target!r}")
    # As uvicorn does: a module of the project in the current directory can be named.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise TargetError(
            f"cannot import module {module_name!r}: {type(error).__name__}: {error}"
        ) from error
    found: object = module
    walked = module_name
    for part in attribute_path.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise TargetError(f"{walked!r} has no attribute {part!r} (in {target!r})") from None
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    return found


def _as_service(found: object, target: str) -> Service:
    if isinstance(found, Service):
        return found
    if isinstance(found, type) and not issubclass(found, Service):
        raise TargetError(f"{target} is the class {found.__qualname__}, not a Service subclass")
    if not callable(found):
        raise TargetError(
            f"{target} is {_describe(found)}, not a Service, a Service class or a factory of one"
        )
    if inspect.iscoroutinefunction(found):
        raise TargetError(f"{target} is an async function: a factory must return the service")
    try:
        made = found()
    except SystemExit as error:
        # sys:exit and the like: a callable, but what it does is end the process.
        raise TargetError(
            f"{target} is not a service: calling it raised SystemExit({error.code!r})"
        ) from error
    except Exception as error:
        raise TargetError(f"{target}() raised {type(error).__name__}: {error}") from error
    if not isinstance(made, Service):
        raise TargetError(f"{target}() returned {_describe(made)}, not a Service")
    return made


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _seconds(at_least_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        # Finite either way: a stop must be bounded, and so must a threshold.
        if not math.isfinite(value) or value < 0 or (not at_least_zero and value == 0):
            bound = ">= 0 and finite" if at_least_zero else "> 0 and finite"
            raise argparse.ArgumentTypeError(f"must be {bound} seconds, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        return check_port(int(text), "the status port")
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"must be a port number within 0..65535, got {text!r}"
        ) from error


def _host(text: str) -> str:
    try:
        return check_host(text, "the status host")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anyservice",
        description=_DESCRIPTION,
        epilog="Run 'anyservice run --help' for the TARGET forms, signals and exit codes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run_command = commands.add_parser(
        "run",
        help="run a service (TARGET: package.module:attribute) until it stops",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(run_command)
    _add_status_arguments(run_command)
    from .taskqueue._cli import add_commands

    add_commands(commands, load_object, TargetError)
    return parser


def _add_run_arguments(run_command: argparse.ArgumentParser) -> None:
    """``anyservice run``'s target, backend, logging and stop options."""
    run_command.add_argument(
        "target",
        metavar="TARGET",
        help="package.module:attribute naming a Service, a Service class or a factory",
    )
    run_command.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop to run on (default: asyncio)",
    )
    run_command.add_argument(
        "--log-level",
        type=str.upper,
        choices=_LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: INFO)",
    )
    run_command.add_argument(
        "--shutdown-timeout",
        type=_seconds(at_least_zero=True),
        default=None,
        metavar="S",
        help="grace period of a stop, in seconds (default: the service's shutdown_timeout)",
    )
    run_command.add_argument(
        "--blocking-threshold",
        type=_seconds(at_least_zero=False),
        default=None,
        metavar="S",
        help="warn, with its stack, when the event loop is blocked for longer than S seconds",
    )
    run_command.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line with the service and task-run "
        "fields (default: text)",
    )


def _add_status_arguments(run_command: argparse.ArgumentParser) -> None:
    """``anyservice run``'s status server options."""
    run_command.add_argument(
        "--status-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve /, /healthz, /readyz, /tree and /metrics on PORT (0: a free port, "
        "logged); needs anyservice[http]",
    )
    run_command.add_argument(
        "--status-host",
        type=_host,
        default="127.0.0.1",
        metavar="HOST",
        help="the address the status server binds to (default: 127.0.0.1)",
    )
    run_command.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve /metrics on the status server (default: when prometheus_client is installed)",
    )


if __name__ == "__main__":
    sys.exit(main())
