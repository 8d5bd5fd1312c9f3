#!/usr/bin/env python3
"""The project's two commands, on a fresh machine with only Python and pip.

    python3 dev.py demo     run the demo
    python3 dev.py test     run the test suite (what CI runs)

Both create ``.venv`` beside this file on first use and install the project into it (again
whenever ``pyproject.toml`` changes). Arguments after ``test`` go to pytest; after ``demo``,
to ``anyservice run examples.demo:build`` (e.g. ``--backend trio``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".anyservice-installed"


def ensure_environment() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except Exception as exc:
            sys.exit(
                f"dev.py: could not create a virtual environment ({exc}); "
                "install your distribution's python3-venv package and retry"
            )
    print("dev.py: installing anyservice and its test dependencies", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "test":
        return subprocess.run([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT).returncode
    demo = [str(PYTHON), "-m", "anyservice", "run", "examples.demo:build", *rest]
    return subprocess.run(demo, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
