"""The ``anyservice`` command: real processes, real signals, exit codes, and its errors."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import IO

import pytest

from anyservice import Service
from anyservice.__main__ import TargetError, load_service, main

from . import cli_targets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["asyncio", "trio"]
# Bounds on waits for a process that works; they only matter when something is broken.
READY_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0


class Command:
    """``python -m anyservice ...`` in a subprocess, its output read as it comes."""

    def __init__(self, *args: str, cwd: Path = PROJECT_ROOT) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "anyservice", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr)),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)
            self._lines.put(line)

    def wait_for_line(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until a line of stdout or stderr contains ``text``."""
        if any(text in line for line in self.stdout + self.stderr):
            return
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line with {text!r} within {timeout}s; output so far:\n{self.output}"
                ) from None
            if text in line:
                return

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the exit code; the output is complete afterwards."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout}s; output so far:\n{self.output}"
            ) from None
        for reader in self._readers:
            reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


@pytest.fixture
def command() -> Iterator[type[Command]]:
    """``command(*args)`` starts the CLI; every process it started is killed at the end."""
    started: list[Command] = []

    class Tracked(Command):
        def __init__(self, *args: str, cwd: Path = PROJECT_ROOT) -> None:
            super().__init__(*args, cwd=cwd)
            started.append(self)

    yield Tracked
    for process in started:
        process.kill()


# ------------------------------------------------------------------ real processes, signals


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_stops_gracefully_and_exits_0(command: type[Command], backend: str) -> None:
    service = command("run", "tests.cli_targets:Graceful", "--backend", backend)
    service.wait_for_line("body started")
    service.send(signal.SIGTERM)
    assert service.finish() == 0
    assert "body finished after the stop request\n" in service.stdout
    stderr = "".join(service.stderr)
    assert "received SIGTERM: stopping Graceful gracefully" in stderr
    assert "[Graceful] stopped\n" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_sigint_during_the_grace_period_stops_at_once_with_130(
    command: type[Command], backend: str
) -> None:
    service = command("run", "tests.cli_targets:Stubborn", "--backend", backend)
    service.wait_for_line("body started")
    service.send(signal.SIGINT)
    # Sent only once the first was handled: trio merges a signal that is already pending.
    service.wait_for_line("received SIGINT: stopping Stubborn gracefully")
    service.send(signal.SIGINT)
    # Stubborn's body and grace period are 60 s: ending within the bound means forced.
    assert service.finish() == 128 + signal.SIGINT == 130
    assert "body finished\n" not in service.stdout
    stderr = "".join(service.stderr)
    assert "received SIGINT again: stopping Stubborn at once" in stderr
    assert "[Stubborn] stopped (cancelled from outside)" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_sigterm_exits_143(command: type[Command], backend: str) -> None:
    service = command("run", "tests.cli_targets:Stubborn", "--backend", backend)
    service.wait_for_line("body started")
    service.send(signal.SIGTERM)
    service.wait_for_line("received SIGTERM: stopping Stubborn gracefully")
    service.send(signal.SIGTERM)
    assert service.finish() == 128 + signal.SIGTERM == 143


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_exits_1_with_exactly_one_traceback(command: type[Command], backend: str) -> None:
    service = command("run", "tests.cli_targets:Crashing", "--backend", backend)
    assert service.finish() == 1
    stderr = "".join(service.stderr)
    assert stderr.count("Traceback") == 1
    assert stderr.count("ConnectionError: upstream closed the connection") == 1
    assert "[Crashing] crashed: ConnectionError('upstream closed the connection')" in stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_system_exit_in_a_service_is_the_exit_code(command: type[Command], backend: str) -> None:
    service = command("run", "tests.cli_targets:Exiting", "--backend", backend)
    assert service.finish() == 3
    assert "Exiting raised SystemExit(3): exit code 3" in "".join(service.stderr)


@pytest.mark.parametrize(
    ("target", "ran"),
    [
        ("tests.cli_targets:Quick", "Quick"),
        ("tests.cli_targets:build", "built"),
        ("tests.cli_targets:instance", "instance"),
        ("tests.cli_targets:app.service", "nested"),
    ],
)
def test_target_forms_run_and_exit_0(command: type[Command], target: str, ran: str) -> None:
    service = command("run", target, "--shutdown-timeout", "2.5")
    assert service.finish() == 0
    assert service.stdout == [f"{ran} ran with shutdown_timeout=2.5\n"]


# ------------------------------------------------------------------ errors: one line, exit 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["tests.no_such_module:Service"],
            "anyservice: error: cannot import module 'tests.no_such_module': "
            "ModuleNotFoundError: No module named 'tests.no_such_module'",
        ),
        (
            ["tests.cli_targets:Missing"],
            "anyservice: error: 'tests.cli_targets' has no attribute 'Missing' "
            "(in 'tests.cli_targets:Missing')",
        ),
        (
            ["tests.cli_targets:not_a_service"],
            "anyservice: error: tests.cli_targets:not_a_service is int 42, "
            "not a Service, a Service class or a factory of one",
        ),
        (
            ["tests.cli_targets:failing_factory"],
            "anyservice: error: tests.cli_targets:failing_factory() raised "
            "RuntimeError: no database configured",
        ),
        (
            ["tests.cli_targets:Quick", "--backend", "curio"],
            "anyservice run: error: argument --backend: invalid choice: 'curio' "
            "(choose from 'asyncio', 'trio')",
        ),
    ],
    ids=["bad-module", "missing-attribute", "not-a-service", "factory-raises", "bad-backend"],
)
def test_cli_errors_in_a_real_process_are_one_line_and_exit_2(
    command: type[Command], args: list[str], message: str
) -> None:
    failed = command("run", *args)
    assert failed.finish() == 2
    assert failed.stdout == []
    # argparse shows its usage above its own errors; the error itself is one line.
    assert failed.stderr[-1] == message + "\n"
    assert "Traceback" not in failed.output


def test_log_level_sets_what_is_logged(command: type[Command]) -> None:
    quiet = command("run", "tests.cli_targets:Quick", "--log-level", "warning")
    assert quiet.finish() == 0
    assert quiet.stderr == []
    # The blocking detector logs its start and stop at DEBUG.
    verbose = command(
        "run", "tests.cli_targets:Quick", "--log-level", "DEBUG", "--blocking-threshold", "5"
    )
    assert verbose.finish() == 0
    assert "DEBUG   [BlockingDetector] started\n" in "".join(verbose.stderr)


def test_blocking_threshold_turns_the_detector_on(command: type[Command]) -> None:
    service = command("run", "tests.cli_targets:Quick", "--blocking-threshold", "5")
    assert service.finish() == 0
    assert "watching the event loop" in "".join(service.stderr)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.cli_targets", "TARGET must look like package.module:attribute"),
        ("tests.cli_targets:", "TARGET must look like package.module:attribute"),
        ("tests.no_such_module:app", "cannot import module 'tests.no_such_module'"),
        ("tests.cli_targets:missing", "'tests.cli_targets' has no attribute 'missing'"),
        (
            "tests.cli_targets:app.missing",
            "'tests.cli_targets:app' has no attribute 'missing'",
        ),
        ("tests.cli_targets:not_a_service", "is int 42, not a Service, a Service class"),
        ("tests.cli_targets:NotAService", "is the class NotAService, not a Service subclass"),
        ("tests.cli_targets:not_a_factory", "not_a_factory() returned int 42, not a Service"),
        ("tests.cli_targets:build_async", "is an async function"),
        (
            "tests.cli_targets:failing_factory",
            "failing_factory() raised RuntimeError: no database configured",
        ),
    ],
)
def test_a_target_that_gives_no_service_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert main(["run", target]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("anyservice: error: ")
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_an_error_while_importing_the_module_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "broken_app.py").write_text("raise ValueError('DATABASE_URL is not set')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["run", "broken_app:service"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "anyservice: error: cannot import module 'broken_app': "
        "ValueError: DATABASE_URL is not set\n"
    )


def test_modules_in_the_current_directory_can_be_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "my_app.py").write_text(
        "from anyservice import Service\n\nclass Worker(Service):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_app", raising=False)
    try:
        service = load_service("my_app:Worker")
    finally:
        sys.modules.pop("my_app", None)
    assert isinstance(service, Service)
    assert service.name == "Worker"


def test_load_service_creates_classes_and_calls_factories() -> None:
    assert isinstance(load_service("tests.cli_targets:Graceful"), cli_targets.Graceful)
    assert load_service("tests.cli_targets:build").name == "built"
    assert load_service("tests.cli_targets:instance") is cli_targets.instance
    assert load_service("tests.cli_targets:app.service") is cli_targets.app.service
    with pytest.raises(TargetError, match="not a Service"):
        load_service("tests.cli_targets:not_a_service")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "tests.cli_targets:Quick", "--backend", "curio"], "invalid choice: 'curio'"),
        (["run", "tests.cli_targets:Quick", "--shutdown-timeout", "-1"], "must be >= 0 and finite"),
        (
            ["run", "tests.cli_targets:Quick", "--shutdown-timeout", "inf"],
            "must be >= 0 and finite",
        ),
        (
            ["run", "tests.cli_targets:Quick", "--shutdown-timeout", "nan"],
            "must be >= 0 and finite",
        ),
        (["run", "tests.cli_targets:Quick", "--status-port", "70000"], "within 0..65535"),
        (["run", "tests.cli_targets:Quick", "--status-port", "web"], "within 0..65535"),
        (["run", "tests.cli_targets:Quick", "--status-host", ""], "must be a non-empty host"),
        (["run", "tests.cli_targets:Quick", "--log-format", "xml"], "invalid choice: 'xml'"),
        (["run", "tests.cli_targets:Quick", "--metrics"], "--metrics needs a status server"),
        (["run", "sys:exit"], "sys:exit is not a service"),
        (["run", "tests.cli_targets:Quick", "--shutdown-timeout", "soon"], "not a number"),
        (["run", "tests.cli_targets:Quick", "--blocking-threshold", "0"], "must be > 0"),
        (["run", "tests.cli_targets:Quick", "--log-level", "LOUD"], "invalid choice: 'LOUD'"),
        (["run"], "the following arguments are required: TARGET"),
        (["launch", "x:y"], "invalid choice: 'launch'"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().err


# ------------------------------------------------------------------ help


def test_help_documents_the_run_command(command: type[Command]) -> None:
    help_command = command("--help")
    assert help_command.finish() == 0
    text = "".join(help_command.stdout)
    assert "usage: anyservice" in text
    assert "package.module:attribute" in text


def test_run_help_documents_the_target_forms_signals_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for documented in (
        "package.module:attribute",
        "package.module:app.service",
        "a Service instance",
        "a Service subclass, created with no arguments",
        "a zero-argument factory",
        "--backend {asyncio,trio}",
        "--log-level LEVEL",
        "--shutdown-timeout S",
        "--blocking-threshold S",
        "SIGUSR1",
        "130",
    ):
        assert documented in text


def test_the_anyservice_script_is_the_main_of_python_dash_m() -> None:
    (script,) = entry_points(group="console_scripts", name="anyservice")
    assert script.load() is main


@pytest.mark.parametrize("backend", BACKENDS)
def test_signals_after_the_second_are_ignored_until_run_returns(backend: str) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "tests.signal_burst", backend],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("run() returned 143 after "), finished.stderr
    # The burst really came (the forced stop takes a few milliseconds at least).
    assert not finished.stdout.startswith("run() returned 143 after 0 ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_status_port_0_serves_the_tree_on_a_port_it_logs(
    command: type[Command], backend: str
) -> None:
    service = command(
        "run", "tests.cli_targets:Graceful", "--backend", backend, "--status-port", "0"
    )
    service.wait_for_line("status on http://127.0.0.1:")
    service.wait_for_line("body started")
    (line,) = [line for line in service.stderr if "status on http://127.0.0.1:" in line]
    port = int(re.search(r"status on http://127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
    tree = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/tree", timeout=10).read())
    assert (tree["name"], tree["state"]) == ("Graceful", "RUNNING")
    ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
    assert json.loads(ready.read()) == {"ready": True}
    service.send(signal.SIGTERM)
    assert service.finish() == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)


def test_log_format_json_writes_one_object_per_line(command: type[Command]) -> None:
    service = command("run", "tests.cli_targets:Quick", "--log-format", "json")
    assert service.finish() == 0
    objects = [json.loads(line) for line in service.stderr]
    assert objects
    assert all({"time", "level", "logger", "message"} <= set(item) for item in objects)
    assert objects[-1]["message"] == "Quick stopped: exit code 0"
