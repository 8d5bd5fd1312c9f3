"""Every ```python block of README.md and docs/*.md runs, as written, in a process of its own.

Each block becomes one test, its id the file and the line of its opening fence
(``README.md:28``). The block is written to a fresh temporary directory, which is the
current directory of the process, and run with this interpreter; it must exit 0 within a
bounded time, and a failure shows its stdout and stderr. Nothing is skipped: a block that
cannot be run is a failing test saying why.

How a block is run follows from what it is, or from a marker: an HTML comment on the
lines just before its fence (blank lines may stand between), which a reader of the
rendered page does not see::

    <!-- docs-test: continues -->
    ```python

Keys of a marker (several may stand in one, separated by spaces, and markers on
consecutive lines are one marker):

``continues``
    The block goes on from the previous Python block of the same file: the blocks are
    joined into one program, a single test named by every line (``README.md:28+64``).
``serve``
    The program serves until a signal (``serve(...)``, ``anyservice.run(...)``). It is
    started, waited for until ready (``ready=`` or ``port=``), sent SIGTERM, and must then
    exit 0.
``ready="text"``
    With ``serve``: ready once ``text`` appears in its stdout or stderr.
``port=N``
    With ``serve``: ready once 127.0.0.1:N accepts a connection. The port must be free
    before the program starts, or the test fails saying so.
``command="anyservice run myapp.main:build"``
    Run this command line instead of ``python <file>`` (``anyservice`` is this
    environment's console script).
``prints="text"``
    The program's stdout must contain ``text`` (the key may be given more than once): for a
    block whose comments say what it prints.
``signature=module.name``
    The block is a ``def`` line without a body: it must match the real signature of that
    callable (names, kinds, defaults and annotations as written). Checked in-process.

Files: a line ``# path/name.py`` alone in a block starts a file of that name; the lines
before the first such line go to ``snippet.py``. The program run is the last file. When
one of the files is a pytest file (``test_*.py`` or ``conftest.py``), ``python -m pytest``
runs in the directory instead, and must pass (at least one test, none failing).

Backends: a program that names a backend (``anyio.run(main)`` is asyncio,
``backend="trio"``, ``--backend trio``) runs as written, and once more with that one word
changed to the other backend (test id ``README.md:28-trio``), since the docs say the same
code runs on both. A pytest program runs on both through its own plugin.

Other blocks (``console``, ``text``, ``json``) are not Python and are not run; the
``anyservice`` commands of ``console`` blocks, which hold placeholders, are checked for
options the command does not have.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_LANGUAGES = {"python", "py", "python3"}

#: How long a program may run; the machine is shared and slow, and the docs' snippets are
#: meant to end in about a second.
RUN_TIMEOUT = 90.0
#: How long a serving program may take to be ready, then to exit after SIGTERM.
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
FILE_HEADER = re.compile(r"^# (?P<path>[\w./-]+\.py)$")
KNOWN_KEYS = {"continues", "serve", "ready", "port", "command", "signature", "prints"}
FLAG_KEYS = {"continues", "serve"}


@dataclass
class Block:
    document: Path
    line: int  # of the opening fence, from 1
    lang: str
    code: str
    marker: dict[str, str] = field(default_factory=dict)
    prints: list[str] = field(default_factory=list)
    marker_error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


@dataclass
class Program:
    blocks: list[Block]
    options: dict[str, str] = field(default_factory=dict)
    prints: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def test_id(self) -> str:
        first = self.blocks[0]
        lines = "+".join(str(block.line) for block in self.blocks)
        return f"{first.document.relative_to(ROOT)}:{lines}"

    def files(self) -> dict[str, str]:
        """The program's files, in the order they were started, with their text."""
        files: dict[str, list[str]] = {}
        current = "snippet.py"
        for block in self.blocks:
            for text in block.code.splitlines():
                header = FILE_HEADER.match(text)
                if header:
                    current = header["path"]
                    files.setdefault(current, [])
                    continue
                files.setdefault(current, []).append(text)
        return {
            path: "\n".join(lines).strip("\n") + "\n"
            for path, lines in files.items()
            if path != "snippet.py" or any(line.strip() for line in lines)
        }


def parse_marker(body: str) -> tuple[dict[str, str], list[str]]:
    """The keys of a marker's body, and its ``prints`` texts; ``ValueError`` if not understood."""
    options: dict[str, str] = {}
    prints: list[str] = []
    for word in shlex.split(body):
        key, sep, value = word.partition("=")
        if key not in KNOWN_KEYS:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(sorted(KNOWN_KEYS))})")
        if (key in FLAG_KEYS) == bool(sep):
            raise ValueError(
                f"{key!r} takes no value" if key in FLAG_KEYS else f"{key!r} needs a value"
            )
        if key == "prints":
            prints.append(value)
        else:
            options[key] = value
    return options, prints


def read_blocks(document: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``document``, and the problems with its markers."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # a marker waiting for its block
    index = 0
    while index < len(lines):
        text = lines[index]
        marker = MARKER.match(text)
        fence = FENCE.match(text)
        if marker:
            if pending is None:
                pending = (index + 1, marker["body"])
            elif MARKER.match(lines[index - 1]):
                # Markers on consecutive lines are one marker, so each line stays readable.
                pending = (pending[0], f"{pending[1]} {marker['body']}")
            else:
                problems.append(f"{document.name}:{pending[0]}: a marker with no block after it")
                pending = (index + 1, marker["body"])
        elif fence:
            indent = len(fence["indent"])
            end = index + 1
            while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
                end += 1
            if end == len(lines):
                problems.append(f"{document.name}:{index + 1}: a code fence that is never closed")
            body = [
                line[indent:] if line[:indent].isspace() else line
                for line in lines[index + 1 : end]
            ]
            block = Block(document, index + 1, fence["lang"].lower(), "\n".join(body) + "\n")
            if pending is not None:
                if block.lang not in PYTHON_LANGUAGES:
                    problems.append(
                        f"{document.name}:{pending[0]}: a marker before a {block.lang or 'plain'}"
                        " block; markers belong to ```python blocks"
                    )
                else:
                    try:
                        block.marker, block.prints = parse_marker(pending[1])
                    except ValueError as exc:
                        block.marker_error = f"its marker on line {pending[0]}: {exc}"
                pending = None
            blocks.append(block)
            index = end
        elif pending is not None and text.strip():
            problems.append(f"{document.name}:{pending[0]}: a marker not right before a block")
            pending = None
        index += 1
    if pending is not None:
        problems.append(f"{document.name}:{pending[0]}: a marker with no block after it")
    return blocks, problems


def read_programs(document: Path) -> list[Program]:
    programs: list[Program] = []
    for block in read_blocks(document)[0]:
        if block.lang not in PYTHON_LANGUAGES:
            continue
        if "continues" in block.marker:
            if not programs:
                program = Program([block])
                program.errors.append(
                    f"{block.where} says it continues, but no Python block comes before it"
                )
                programs.append(program)
                continue
            programs[-1].blocks.append(block)
        else:
            programs.append(Program([block]))
        program = programs[-1]
        if block.marker_error:
            program.errors.append(f"{block.where}: {block.marker_error}")
        program.options.update({k: v for k, v in block.marker.items() if k != "continues"})
        program.prints.extend(block.prints)
    return programs


BACKEND_SWAPS = [
    # (pattern, replacement for the variant on the other backend, the variant's backend)
    (re.compile(r"\banyio\.run\((\w+)\)"), r'anyio.run(\1, backend="trio")', "trio"),
    (re.compile(r"""backend=(["'])trio\1"""), r'backend="asyncio"', "asyncio"),
    (re.compile(r"""backend=(["'])asyncio\1"""), r'backend="trio"', "trio"),
    (re.compile(r"--backend trio\b"), "--backend asyncio", "asyncio"),
    (re.compile(r"--backend asyncio\b"), "--backend trio", "trio"),
]


def comment_spans(text: str) -> list[tuple[int, int]]:
    """Where the comments of Python ``text`` are, as offsets (none if it does not tokenize)."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                (row, col), (end_row, end_col) = token.start, token.end
                spans.append((starts[row - 1] + col, starts[end_row - 1] + end_col))
    except (tokenize.TokenError, SyntaxError):
        return []
    return spans


def on_other_backend(text: str) -> tuple[str, str | None]:
    """``text`` with its backend switched, and the backend it then names (None: no change).

    Every backend the code names is switched at once, in one pass, so a program that names
    asyncio in one place and trio in another becomes its mirror image. Comments are left
    as they are: they are the reader's, not the program's.
    """
    backends: set[str] = set()
    pieces: list[tuple[int, int, str]] = [(start, end, "") for start, end in comment_spans(text)]
    comments = len(pieces)
    for pattern, replacement, backend in BACKEND_SWAPS:
        for match in pattern.finditer(text):
            if any(start < match.end() and match.start() < end for start, end, _ in pieces):
                continue
            pieces.append((match.start(), match.end(), match.expand(replacement)))
            backends.add(backend)
    pieces = pieces[comments:]
    if not pieces:
        return text, None
    out, last = [], 0
    for start, end, replacement in sorted(pieces):
        out.append(text[last:start])
        out.append(replacement)
        last = end
    out.append(text[last:])
    return "".join(out), (backends.pop() if len(backends) == 1 else "mirrored")


@dataclass
class Case:
    program: Program
    variant: str | None  # None: as written; else the backend the variant runs on

    @property
    def test_id(self) -> str:
        return self.program.test_id + (f"-{self.variant}" if self.variant else "")

    def files(self) -> dict[str, str]:
        files = self.program.files()
        if self.variant is None:
            return files
        return {path: on_other_backend(text)[0] for path, text in files.items()}

    def command_option(self) -> str | None:
        command = self.program.options.get("command")
        if command is None or self.variant is None:
            return command
        return on_other_backend(command)[0]


def fail(message: str) -> NoReturn:
    """Fail with ``message`` alone: the snippet's output says more than this file's code."""
    pytest.fail(message, pytrace=False)


def is_pytest_file(path: str) -> bool:
    name = Path(path).name
    return name == "conftest.py" or name.startswith("test_") or name.endswith("_test.py")


def cases() -> Iterator[Case]:
    for document in DOCUMENTS:
        for program in read_programs(document):
            yield Case(program, None)
            if "signature" in program.options:
                continue
            files = program.files()
            if any(is_pytest_file(path) for path in files):
                continue  # the plugin runs every test on both backends
            texts = [*files.values(), program.options.get("command", "")]
            variants = {on_other_backend(text)[1] for text in texts} - {None}
            if variants:
                yield Case(program, variants.pop() if len(variants) == 1 else "mirrored")


ALL_CASES = list(cases())


def child_environment() -> dict[str, str]:
    # The snippets run as a user would run them: without this test run's pytest settings.
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


def command_line(case: Case, files: dict[str, str]) -> list[str]:
    if any(is_pytest_file(path) for path in files):
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command = case.command_option()
    if command is not None:
        words = shlex.split(command)
        if words[0] == "anyservice":
            script = Path(sys.executable).with_name("anyservice")
            words[0] = str(script) if script.exists() else sys.executable
            if not script.exists():
                words[1:1] = ["-m", "anyservice"]
        elif words[0] in {"python", "python3"}:
            words[0] = sys.executable
        return words
    return [sys.executable, list(files)[-1]]


def report(case: Case, why: str, command: list[str], stdout: str, stderr: str) -> str:
    shown = "\n".join(f"----- {path} -----\n{text}" for path, text in case.files().items())
    return (
        f"{case.test_id}: {why}\n"
        f"command: {shlex.join(command)}\n"
        f"{shown}"
        f"----- stdout -----\n{stdout or '(nothing)'}\n"
        f"----- stderr -----\n{stderr or '(nothing)'}\n"
        "(How blocks are run, and the markers that join them or serve them until SIGTERM:"
        " the docstring of tests/test_docs.py.)"
    )


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Output:
    """What a process writes to one of its pipes, read on a thread as it comes."""

    def __init__(self, pipe: object) -> None:
        self.chunks: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe: object) -> None:
        assert hasattr(pipe, "readline")
        for line in iter(pipe.readline, ""):
            self.chunks.append(line)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def run_serving(case: Case, command: list[str], cwd: Path) -> None:
    options = case.program.options
    ready_text = options.get("ready")
    port = int(options["port"]) if "port" in options else None
    if ready_text is None and port is None:
        fail(f"{case.test_id}: a 'serve' block needs ready=\"text\" or port=N to wait for")
    if port is not None and port_answers(port):
        fail(
            f"{case.test_id}: port {port} is already in use on this machine, and the snippet "
            "serves on it; free it and run again"
        )
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=child_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        stdout, stderr = Output(process.stdout), Output(process.stderr)
        try:
            code = serve_then_stop(case, process, stdout, stderr, ready_text, port)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        stdout.thread.join(5)
        stderr.thread.join(5)
    if code != 0:
        why = f"exited with {code} after SIGTERM, not 0"
        fail(report(case, why, command, stdout.text, stderr.text))
    check_prints(case, command, stdout.text, stderr.text)


def serve_then_stop(
    case: Case,
    process: subprocess.Popen[str],
    stdout: Output,
    stderr: Output,
    ready_text: str | None,
    port: int | None,
) -> int:
    """Wait until ``process`` is ready, send it SIGTERM, and return its exit code."""

    def failure(why: str) -> str:
        assert isinstance(process.args, list)
        return report(case, why, process.args, stdout.text, stderr.text)

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            stdout.thread.join(5)
            stderr.thread.join(5)
            fail(failure(f"exited with {process.returncode} before it was ready"))
        ready = (ready_text is None or ready_text in stdout.text + stderr.text) and (
            port is None or port_answers(port)
        )
        if ready:
            break
        if time.monotonic() > deadline:
            what = f"{ready_text!r} in its output" if ready_text else f"port {port}"
            fail(failure(f"not ready within {READY_TIMEOUT:.0f} s (waited for {what})"))
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        stdout.thread.join(1)
        stderr.thread.join(1)
        fail(failure(f"still running {EXIT_TIMEOUT:.0f} s after SIGTERM"))


def check_prints(case: Case, command: list[str], stdout: str, stderr: str) -> None:
    missing = [text for text in case.program.prints if text not in stdout]
    if missing:
        why = "did not print " + ", ".join(repr(text) for text in missing)
        fail(report(case, why, command, stdout, stderr))


def check_signature(case: Case) -> None:
    target = case.program.options["signature"]
    module_name, _, attribute = target.rpartition(".")
    real = getattr(importlib.import_module(module_name), attribute)
    code = case.program.files().get("snippet.py", "").rstrip()
    try:
        tree = ast.parse(code + ":\n    ...\n")
    except SyntaxError as exc:
        fail(f"{case.test_id}: not a def line without a body: {exc}")
    [definition] = tree.body
    assert isinstance(definition, ast.FunctionDef), f"{case.test_id}: not a def"
    namespace: dict[str, object] = {}
    exec(
        compile("from __future__ import annotations\n" + ast.unparse(tree), target, "exec"),
        namespace,
    )

    def described(function: object) -> list[str]:
        assert callable(function)
        signature = inspect.signature(function)

        def annotation(value: object) -> str:
            if value is inspect.Parameter.empty:
                return "-"
            return ast.unparse(ast.parse(str(value), mode="eval"))

        return [
            f"{p.name} {p.kind.name} default={p.default!r} annotation={annotation(p.annotation)}"
            for p in signature.parameters.values()
        ] + [f"returns {annotation(signature.return_annotation)}"]

    documented, actual = described(namespace[definition.name]), described(real)
    if documented != actual:
        fail(
            f"{case.test_id}: the documented signature differs from {target}'s\n"
            "documented:\n  " + "\n  ".join(documented) + "\nreal:\n  " + "\n  ".join(actual)
        )


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.test_id for case in ALL_CASES])
def test_snippet_runs(case: Case, tmp_path: Path) -> None:
    if case.program.errors:
        fail("\n".join(case.program.errors))
    if "signature" in case.program.options:
        check_signature(case)
        return
    files = case.files()
    for path, text in files.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    command = command_line(case, files)
    if "serve" in case.program.options:
        run_serving(case, command, tmp_path)
        return
    try:
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        why = (
            f"still running after {RUN_TIMEOUT:.0f} s; a block that serves until a signal"
            ' needs <!-- docs-test: serve ready="..." --> before it'
        )
        fail(report(case, why, command, out, err))
    if done.returncode != 0:
        fail(report(case, f"exited with {done.returncode}", command, done.stdout, done.stderr))
    check_prints(case, command, done.stdout, done.stderr)


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_markers_belong_to_python_blocks(document: Path) -> None:
    problems = read_blocks(document)[1]
    assert not problems, "\n".join(problems)


def test_every_document_has_python_blocks_found() -> None:
    # Guards the parser itself: if it stopped finding blocks, every test above would vanish.
    assert sum(len(read_programs(document)) for document in DOCUMENTS) >= 10


COMMAND = re.compile(r"^(?:\$\s+)?(?P<command>(?:anyservice|python3? -m anyservice)\b.*)$")


def console_commands(document: Path) -> Iterator[tuple[str, list[str]]]:
    """Each ``anyservice`` command of the console blocks of ``document``, with its place."""
    for block in read_blocks(document)[0]:
        if block.lang != "console":
            continue
        lines = block.code.splitlines()
        for offset, text in enumerate(lines, start=1):
            match = COMMAND.match(text.strip())
            if not match:
                continue
            line = match["command"].split("#")[0]
            # A long usage line goes on, indented, on the lines after it.
            for more in lines[offset:]:
                if not more[:1].isspace():
                    break
                line += " " + more.split("#")[0]
            for command in line.split(";"):
                words = command.split()
                if words[:3] in (["python", "-m", "anyservice"], ["python3", "-m", "anyservice"]):
                    words = ["anyservice", *words[3:]]
                if words and words[0] == "anyservice":
                    yield f"{document.relative_to(ROOT)}:{block.line + offset}", words


def cli_help(subcommand: str | None) -> str:
    script = Path(sys.executable).with_name("anyservice")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "anyservice"]
    done = subprocess.run(
        [*prefix, *([subcommand] if subcommand else []), "--help"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_console_commands_use_real_options(document: Path) -> None:
    # The console blocks hold placeholders (package.module:attribute), so they are not run;
    # what they can get wrong cheaply is a subcommand or an option the command lacks.
    helps: dict[str | None, str] = {}
    problems = []
    for where, words in console_commands(document):
        subcommand = words[1] if len(words) > 1 and not words[1].startswith("-") else None
        if subcommand not in helps:
            try:
                helps[subcommand] = cli_help(subcommand)
            except subprocess.CalledProcessError as exc:
                problems.append(f"{where}: `anyservice {subcommand} --help` failed: {exc.stderr}")
                continue
        known = set(re.findall(r"--[a-z][a-z-]*", helps[subcommand]))
        used = re.findall(r"(?<![\w-])--[a-z][a-z-]*", " ".join(words))
        problems += [
            f"{where}: {' '.join(words)!r} uses {option}, which the command lacks"
            for option in used
            if option not in known
        ]
    assert not problems, "\n".join(problems)
