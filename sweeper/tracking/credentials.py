"""Passwords out of URLs, before anything can write or print them.

``python -m sweeper`` calls :func:`move_passwords_to_env` on ``sys.argv`` first thing: a URL with a
password (``postgresql://user:PASS@host/db``, ``http://user:PASS@mlflow:5000``) loses it, and the
password goes into this process's environment, which launched jobs inherit. Hydra, its ``.hydra``
files and ``multirun.yaml``, the MLflow params, tags and artifacts, and the terminal only ever see
the URL without it.

- ``http(s)://`` (an MLflow server): the user and password become ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD``, which MLflow's client sends as basic auth; the URL keeps host and path.
- a database URL: the password goes into ``LORA_SWEEPER_DB_PASSWORD__<SCHEME>__<USER>__<HOST>__<PORT>``
  and :func:`with_credentials` puts it back only where a connection is opened.

Better still, keep passwords off the command line: ``MLFLOW_TRACKING_USERNAME/PASSWORD`` for the
server, ``PGPASSWORD`` or ``~/.pgpass`` for PostgreSQL (psycopg reads them itself).
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from urllib.parse import unquote

ENV_PREFIX = "LORA_SWEEPER_DB_PASSWORD__"

# scheme://user:password@host[:port]; the password ends at the first "@" (URL syntax wants a literal
# "@" in it percent-encoded), the host at a path, query, quote or white space
_URL_WITH_PASSWORD = re.compile(
    r"(?P<scheme>[a-zA-Z][\w+.-]*)://(?P<user>[^:/@\s'\"]+):(?P<password>[^@\s'\"]+)@(?P<host>[^/?#\s'\",]*)"
)
_URL_WITH_USER = re.compile(r"^(?P<scheme>[a-zA-Z][\w+.-]*)://(?P<user>[^:/@\s'\"]+)@(?P<host>[^/?#\s'\",]*)")


def password_env_name(scheme: str, user: str, host: str) -> str:
    """The variable that holds the password of ``scheme://user@host``; the driver (``+psycopg``) is ignored."""
    parts = (scheme.split("+", 1)[0], user, *host.split(":", 1))
    return ENV_PREFIX + "__".join(re.sub(r"[^A-Za-z0-9]", "_", part).upper() for part in parts)


def move_passwords_to_env(args: list[str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """``args`` with every URL's password removed; the passwords are put into ``environ`` (os.environ)."""
    environ = os.environ if environ is None else environ

    def strip(match: re.Match) -> str:
        scheme, user, password, host = match.group("scheme", "user", "password", "host")
        if scheme.lower() in ("http", "https"):
            # MLflow sends these as they are: the URL's percent-encoding is undone
            environ["MLFLOW_TRACKING_USERNAME"], environ["MLFLOW_TRACKING_PASSWORD"] = unquote(user), unquote(password)
            return f"{scheme}://{host}"
        environ[password_env_name(scheme, user, host)] = password  # put back as written (SQLAlchemy decodes it)
        return f"{scheme}://{user}@{host}"

    return [_URL_WITH_PASSWORD.sub(strip, arg) for arg in args]


def with_credentials(url: str, environ: MutableMapping[str, str] | None = None) -> str:
    """A database URL with the password :func:`move_passwords_to_env` took out of it put back.

    For connecting only: never print or store the result. A URL that has a password, names no
    user, or whose password was not moved, is returned as it is (the driver may still find one in
    ``PGPASSWORD`` or ``~/.pgpass``).
    """
    environ = os.environ if environ is None else environ
    match = _URL_WITH_USER.match(url)
    if match is None:
        return url
    scheme, user, host = match.group("scheme", "user", "host")
    password = environ.get(password_env_name(scheme, user, host))
    if not password:
        return url
    return f"{scheme}://{user}:{password}@{host}{url[match.end() :]}"


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]+:)[^@\s]+@")


def redact_password(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)
