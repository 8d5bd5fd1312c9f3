"""A throwaway PostgreSQL server for tests and benchmarks, started from Debian's binaries.

:func:`postgres_server` runs ``initdb`` and ``pg_ctl start`` on a fresh data directory under
a temporary directory, listening on a free loopback port with trust authentication, waits
(boundedly) until it accepts connections, yields its URL and stops it with
``pg_ctl stop -m fast``. PostgreSQL refuses to run as root, so under root the server runs
as the ``postgres`` system user (the Debian package creates it) through ``runuser``.

:func:`find_binaries` says where ``initdb`` and ``pg_ctl`` are, or why they cannot be used,
so a test session can skip with one reason (or fail, in CI).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MissingPostgres",
    "PostgresBinaries",
    "find_binaries",
    "postgres_schema",
    "postgres_server",
]

#: Bound on initdb, on the server's start and on its first accepted connection.
STARTUP = 90.0
USER = "anyservice"


class MissingPostgres(RuntimeError):
    """No usable PostgreSQL server binaries on this machine (the message says why)."""


@dataclass(frozen=True)
class PostgresBinaries:
    """Where the server's programs are, and which system user runs them."""

    bindir: Path
    #: The unprivileged user to run the server as, or ``None`` to run as ourselves.
    run_as: str | None

    def command(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        return ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else argv


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_binaries() -> PostgresBinaries:
    """The newest installed server binaries (Debian's layout first, then ``PATH``).

    Raises:
        MissingPostgres: There is no ``initdb``/``pg_ctl``, or we are root and there is no
            ``postgres`` user (or ``runuser``) to run the server as.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if candidates:
        bindir = Path(candidates[-1]).parent
    else:
        initdb = shutil.which("initdb")
        if initdb is None:
            raise MissingPostgres(
                "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
                "'postgresql' package (apt-get install postgresql) to run these tests"
            )
        bindir = Path(os.path.realpath(initdb)).parent
    if not (bindir / "pg_ctl").exists():
        raise MissingPostgres(f"found initdb in {bindir} but no pg_ctl beside it")
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise MissingPostgres(
                "running as root, and PostgreSQL refuses root: create a 'postgres' user "
                "(Debian's postgresql package does) to run the test server as"
            ) from None
        if shutil.which("runuser") is None:
            raise MissingPostgres("running as root without 'runuser' to drop to 'postgres'")
        run_as = "postgres"
    return PostgresBinaries(bindir, run_as)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts_connections(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=STARTUP, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        server_log = log.read_text(errors="replace") if log and log.exists() else ""
        raise RuntimeError(
            f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}{server_log}"
        )


@contextlib.contextmanager
def postgres_server(
    binaries: PostgresBinaries | None = None, *, durable: bool = False
) -> Iterator[str]:
    """Run a fresh PostgreSQL server for the duration of the ``with`` block.

    Args:
        binaries: From :func:`find_binaries` (looked up when not given).
        durable: Keep ``fsync`` on (PostgreSQL's default, for benchmarks). Tests turn it
            off: the data directory is thrown away, and fsyncs only slow them down.

    Yields:
        ``postgresql://anyservice@127.0.0.1:PORT/postgres``.

    Raises:
        MissingPostgres: No usable binaries.
        RuntimeError: initdb or the server's start failed (with the server's log).
        TimeoutError: The server did not accept connections within ``STARTUP`` seconds.
    """
    binaries = binaries or find_binaries()
    top = Path(tempfile.mkdtemp(prefix="anyservice-pg-"))
    data, log = top / "data", top / "server.log"
    try:
        if binaries.run_as:
            entry = pwd.getpwnam(binaries.run_as)
            os.chown(top, entry.pw_uid, entry.pw_gid)
        _run(
            binaries.command(
                "initdb", "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"
            ),
            "initdb",
        )
        port = _free_port()
        options = [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={top}",
            "-c max_connections=200",
        ]
        if not durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        _run(
            binaries.command(
                "pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", str(int(STARTUP)),
                "-o", " ".join(options),
            ),
            "pg_ctl start",
            log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + STARTUP
            while not _accepts_connections(port):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PostgreSQL on port {port} accepted no connection")
                time.sleep(0.05)
            yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                binaries.command("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w"),
                capture_output=True,
                timeout=STARTUP,
                stdin=subprocess.DEVNULL,
                check=False,
            )
    finally:
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def postgres_schema(server_url: str, **options: str) -> Iterator[str]:
    """A broker URL on ``server_url`` whose tables live in a fresh schema, dropped after.

    Each test gets its own schema, so tests share one server but no runs. ``options``
    become further URL query options (e.g. ``listen="false"``).
    """
    import psycopg  # the driver is a test dependency, not one of this module's users'
    from psycopg import sql

    schema = f"test_{uuid.uuid4().hex[:12]}"
    query = "&".join(f"{name}={value}" for name, value in {"schema": schema, **options}.items())
    try:
        yield f"{server_url}?{query}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
