"""Real database and MLflow servers for tests: a fresh database per test, a real ``mlflow server``.

PostgreSQL (trust auth) on 127.0.0.1:5432 and MariaDB (root, no password) on 127.0.0.1:3306, as on
CI. A test using these fixtures is skipped, with how to run it, only when the server is unreachable.

Fixtures (imported by ``tests/conftest.py``):

- ``postgres_db``: a :class:`Database` (``.url``, ``.url_with_password(pw)``, ``.name``), dropped
  (``WITH (FORCE)``) at teardown; ``postgres_url`` / ``postgres_password_url`` are its URLs.
- ``mariadb_db`` / ``mariadb_url``: the same on MariaDB.
- ``mlflow_server``: an :class:`MlflowServer` on a fresh PostgreSQL database and a fresh artifacts
  folder (``.url``, ``.artifacts``, ``.stop()``, ``.start()``, ``.restart()``), stopped at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER = "127.0.0.1", 5432, "postgres"
MARIADB_HOST, MARIADB_PORT, MARIADB_USER = "127.0.0.1", 3306, "root"
SERVER_START_TIMEOUT_S = 120  # mlflow server takes ~10 s on an idle 2-core machine (migrations, imports)

HOW_TO_RUN = (
    "these tests need real servers, as CI runs them: PostgreSQL on 127.0.0.1:5432 (user postgres, "
    "trust auth for 127.0.0.1) and MariaDB on 127.0.0.1:3306 (root, empty password); "
    "e.g. apt-get install postgresql mariadb-server, then start both services"
)


@dataclass(frozen=True)
class Database:
    """A database created for one test; ``url`` is its SQLAlchemy URL."""

    scheme: str  # postgresql+psycopg | mysql+pymysql
    user: str
    host: str
    port: int
    name: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.user}@{self.host}:{self.port}/{self.name}"

    def url_with_password(self, password: str = "S3cretPw") -> str:
        """The same database with a password in the URL (trust auth accepts any)."""
        return f"{self.scheme}://{self.user}:{password}@{self.host}:{self.port}/{self.name}"


def _unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# --- PostgreSQL
def _postgres_admin():
    import psycopg

    return psycopg.connect(
        host=POSTGRES_HOST,
        port=POSTGRES_PORT,
        user=POSTGRES_USER,
        dbname="postgres",
        connect_timeout=5,
        autocommit=True,
    )


def create_postgres_database() -> Database:
    """A new, empty PostgreSQL database; skips the test when the server cannot be reached."""
    import psycopg

    try:
        connection = _postgres_admin()
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_HOST}:{POSTGRES_PORT} ({error}); {HOW_TO_RUN}")
    database = Database("postgresql+psycopg", POSTGRES_USER, POSTGRES_HOST, POSTGRES_PORT, _unique_name("test"))
    with connection:
        connection.execute(f'CREATE DATABASE "{database.name}"')
    return database


def drop_postgres_database(database: Database) -> None:
    with _postgres_admin() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


@pytest.fixture
def postgres_db() -> Iterator[Database]:
    database = create_postgres_database()
    try:
        yield database
    finally:
        drop_postgres_database(database)


@pytest.fixture
def postgres_url(postgres_db: Database) -> str:
    return postgres_db.url


@pytest.fixture
def postgres_password_url(postgres_db: Database) -> str:
    return postgres_db.url_with_password()


# --- MariaDB
def _mariadb_admin():
    import pymysql

    return pymysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user=MARIADB_USER, password="", connect_timeout=5, autocommit=True
    )


def create_mariadb_database() -> Database:
    import pymysql

    try:
        connection = _mariadb_admin()
    except pymysql.err.OperationalError as error:
        pytest.skip(f"MariaDB not reachable at {MARIADB_HOST}:{MARIADB_PORT} ({error}); {HOW_TO_RUN}")
    database = Database("mysql+pymysql", MARIADB_USER, MARIADB_HOST, MARIADB_PORT, _unique_name("test"))
    with connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{database.name}`")
    return database


def drop_mariadb_database(database: Database) -> None:
    with _mariadb_admin() as connection, connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{database.name}`")


@pytest.fixture
def mariadb_db() -> Iterator[Database]:
    database = create_mariadb_database()
    try:
        yield database
    finally:
        drop_mariadb_database(database)


@pytest.fixture
def mariadb_url(mariadb_db: Database) -> str:
    return mariadb_db.url


# --- MLflow server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` as a subprocess (its own process group), on one port for its whole life.

    ``stop()`` ends it (and its uvicorn worker) as a crash would look to clients: the port refuses
    connections. ``start()`` brings it back on the same port and store.
    """

    def __init__(self, backend_uri: str, artifacts: Path, log_path: Path, port: int | None = None) -> None:
        self.backend_uri, self.artifacts, self.log_path = backend_uri, artifacts, log_path
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with_credentials(self, user: str = "user", password: str = "S3cretPw2") -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        assert self.process is None, "already running"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # the server must not pick up a test's client settings (credentials, retries)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with self.log_path.open("a") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"mlflow server exited with {code} at start:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Terminate the server's process group; waits until the port refuses connections."""
        if self.process is None:
            return
        process, self.process = self.process, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # the uvicorn child may outlive its parent for a moment
            os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@pytest.fixture
def mlflow_server(postgres_db: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on a fresh PostgreSQL store and a fresh ``--artifacts-destination``."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(postgres_db.url, folder / "artifacts", folder / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
