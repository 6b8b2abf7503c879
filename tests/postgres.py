"""A real PostgreSQL server for the tests, started by them in a temporary folder (initdb + pg_ctl), never mocked.

Debian's server binaries live under /usr/lib/postgresql/<version>/bin (package
``postgresql``). initdb refuses to run as root: as root (CI) the server runs as
the ``postgres`` user the package creates (``runuser``), its folder owned by it;
otherwise as the current user. A missing server is a failure naming the
package, never a skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.node_peers import free_port

#: Where Debian's packages put the server's programs (newest version first).
DEBIAN_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True) \
    if Path("/usr/lib/postgresql").is_dir() else []


def server_binaries() -> Path:
    for folder in [*DEBIAN_BINARIES, *([Path(shutil.which("initdb")).parent] if shutil.which("initdb") else [])]:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise RuntimeError("PostgreSQL's initdb and pg_ctl not found: install postgresql (apt-get install postgresql)")


class PostgresServer:
    """One PostgreSQL cluster on a free loopback port, trust authentication, user ``lobevol``."""

    USER = "lobevol"

    def __init__(self):
        self.bin = server_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="lobevol-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.run_as = "postgres" if os.geteuid() == 0 else None
        if self.run_as:
            shutil.chown(self.root, self.run_as)

    def _command(self, program: str, *arguments: str) -> list[str]:
        command = [str(self.bin / program), *arguments]
        return ["runuser", "-u", self.run_as, "--", *command] if self.run_as else command

    def init(self) -> "PostgresServer":
        subprocess.run(self._command("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "-E", "UTF8",
                                     "--no-sync"), check=True, capture_output=True, text=True)
        return self

    def start(self) -> "PostgresServer":
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        completed = subprocess.run(self._command("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                                                 "-o", options, "-w", "start"), capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {completed.stderr}{self.log()[-2000:]}")
        return self

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(self._command("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"), capture_output=True)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """The tests' PostgreSQL server (one for the session; each test takes a fresh database)."""
    server = PostgresServer().init().start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            server.new_database()
            break
        except Exception:
            time.sleep(0.2)
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path):
    """A job store location on each back end: an SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "db" / "jobs.sqlite"
    return request.getfixturevalue("postgres").new_database()
