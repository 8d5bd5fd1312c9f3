"""The per-test CPU limit mutation testing runs with: an endless test ends the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ENDLESS = """
def test_endless():
    index = 0
    while index >= 0:
        index += 1
"""

FINITE = """
def test_finite():
    assert sum(range(10**5)) == 4999950000
"""


def run_pytest(tmp_path: Path, source: str, *options: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # No plugin but the one under test: a quicker start.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.cpu_limit", "-p", "no:cacheprovider",
         "-q", *options, "test_case.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_an_endless_test_dies_of_sigxcpu_once_it_used_its_cpu_seconds(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, ENDLESS, "--cpu-limit-per-test=1")
    assert result.returncode == -signal.SIGXCPU, result.stdout + result.stderr


def test_a_test_within_its_cpu_seconds_passes_with_the_limit_in_force(tmp_path: Path) -> None:
    in_force = FINITE + (
        "\n\ndef test_limit_in_force():\n"
        "    import resource, time\n"
        "    soft, _ = resource.getrlimit(resource.RLIMIT_CPU)\n"
        "    assert time.process_time() < soft <= time.process_time() + 32\n"
    )
    result = run_pytest(tmp_path, in_force, "--cpu-limit-per-test=30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_without_the_option_no_limit_is_set(tmp_path: Path) -> None:
    source = (
        "import resource\n\ndef test_no_limit():\n"
        "    assert resource.getrlimit(resource.RLIMIT_CPU)[0] == resource.RLIM_INFINITY\n"
    )
    result = run_pytest(tmp_path, source)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_limit_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, FINITE, "--cpu-limit-per-test=0")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--cpu-limit-per-test must be > 0, got 0.0" in result.stderr
