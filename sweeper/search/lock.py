"""One lock per study, held by whichever worker is deciding what runs next.

Optuna's storages make each write atomic but not a decision spread over several reads and writes
("which grid point is still missing? enqueue it, then pop it"). Two workers making that decision at
the same instant run the same point twice. The lock lives where the study lives, so it spans every
worker that can reach the study:

- ``sqlite:///FILE``: an advisory file lock beside the database (one machine, by nature);
- ``postgresql://``: a session-level advisory lock (``pg_advisory_lock``) on the server;
- ``mysql://`` (MariaDB too): a named lock (``GET_LOCK``) on the server;
- a journal file: the worker holds the journal's lock for its whole life (``JournalWorkerLock``).

The same lock serializes the first creation of Optuna's schema on a fresh database, which crashes
when two workers run it at once (``UniqueViolation ... studydirection``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sweeper.search.storage_url import is_journal, journal_path, sqlite_path

LOCK_WAIT_SECONDS = 600  # a decision takes milliseconds; this long means a server problem


def _lock_key(study_name: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, stable across processes and machines."""
    digest = hashlib.sha256(f"lora-sweeper:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def study_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Exclusive among all workers of ``study_name`` on ``storage_url`` while the block runs."""
    if is_journal(storage_url):
        yield  # the journal's worker already holds it exclusively (JournalWorkerLock)
        return
    path = sqlite_path(storage_url)
    if path is not None:
        with _file_lock(path.with_name(path.name + f".{_lock_key(study_name) & 0xFFFFFFFF:08x}.lock")):
            yield
        return
    with _server_lock(storage_url, study_name):
        yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, timeout=LOCK_WAIT_SECONDS):  # released by the kernel if the process dies
        yield


@contextmanager
def _server_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """An advisory lock on the database server, released when the block ends or the connection drops."""
    import sqlalchemy

    from sweeper.tracking.credentials import with_credentials

    engine = sqlalchemy.create_engine(with_credentials(storage_url), poolclass=sqlalchemy.pool.NullPool)
    dialect = engine.dialect.name
    key = _lock_key(study_name)
    try:
        with engine.connect() as connection:
            if dialect == "postgresql":
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                release = sqlalchemy.text("SELECT pg_advisory_unlock(:key)")
            elif dialect in ("mysql", "mariadb"):
                name = f"lora-sweeper-{key & 0xFFFFFFFFFFFF:012x}"
                got = connection.execute(
                    sqlalchemy.text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": LOCK_WAIT_SECONDS}
                ).scalar()
                if got != 1:
                    raise TimeoutError(f"could not take the study lock {name} on {dialect} in {LOCK_WAIT_SECONDS} s")
                release = sqlalchemy.text("SELECT RELEASE_LOCK(:name)")
                key = name  # type: ignore[assignment]
            else:
                yield  # another server: its own transactions are all there is
                return
            try:
                yield
            finally:
                connection.execute(release, {"key": key} if dialect == "postgresql" else {"name": key})
                connection.commit()
    finally:
        engine.dispose()


class JournalBusyError(RuntimeError):
    """A second worker on a journal file, which cannot tell a dead worker's trial from a live one."""


class JournalWorkerLock:
    """Journal storage has no heartbeat: one worker at a time, and then every RUNNING trial is stale.

    The lock is a file lock beside the journal, held for the worker's life and released by the
    kernel however the worker ends (kill -9 included).
    """

    def __init__(self, storage_url: str) -> None:
        from filelock import FileLock

        self.journal = journal_path(storage_url)
        self.path = self.journal.with_name(self.journal.name + ".worker.lock")
        self._lock = FileLock(self.path, timeout=0)

    def acquire(self) -> None:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise JournalBusyError(
                f"another worker uses the journal {self.journal}: journal storage has no heartbeat, so it serves "
                "one worker at a time. For several workers use an RDB storage: hydra.sweeper.storage="
                "sqlite:///PATH (one machine) or postgresql://HOST/DB (README: Many workers)."
            ) from None

    def release(self) -> None:
        self._lock.release()
