"""What an Optuna storage URL names: a journal file, a SQLite file, or a database server (and its driver)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# SQLAlchemy dialect -> (the driver module a bare ``scheme://`` URL uses, the extra that installs one)
SERVER_DRIVERS = {
    "postgresql": ("psycopg", "postgres"),  # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3
    "mysql": ("MySQLdb", "mysql"),
    "mariadb": ("MySQLdb", "mysql"),
}
EXPLICIT_DRIVERS = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pymysql": "pymysql", "mysqldb": "MySQLdb"}


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith((".log", ".journal"))


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("journal:"))


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for anything else (``:memory:`` included)."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def missing_driver(url: str) -> str | None:
    """Why a database URL cannot connect from this environment (a driver not installed), or None.

    Found before any trial (or any import error deep in SQLAlchemy), with the command that fixes it.
    """
    if is_journal(url) or url.startswith("sqlite"):
        return None
    scheme = url.split("://", 1)[0].lower()
    dialect, _, driver = scheme.partition("+")
    if dialect not in SERVER_DRIVERS:
        return None
    default_module, extra = SERVER_DRIVERS[dialect]
    module = EXPLICIT_DRIVERS.get(driver, driver) if driver else default_module
    if importlib.util.find_spec(module) is not None:
        return None
    hint = {
        "postgres": "pip install -e '.[postgres]' (psycopg 3; the URL postgresql://USER@HOST/DB uses it)",
        "mysql": "pip install -e '.[mysql]' and write the URL as mysql+pymysql://USER@HOST/DB",
    }[extra]
    return f"the {dialect} driver '{module}' is not installed for {scheme}:// URLs; {hint}"
