"""Opening an MLflow tracking store safely: fail fast when it is down, race-free when it is new.

- An ``http(s)://`` server is checked with one short request before anything else; when it does
  not answer the run stops within seconds with a message naming ``tracking.uri`` and the fixes.
- MLflow's client retries for our process are few and short (unless the user set MLflow's own
  variables), so a server that dies mid-run costs seconds, not minutes, before the tracker goes
  offline (``sweeper.tracking.tracker``).
- Workers started together on a new SQLite store take turns (a file lock beside the database) for
  MLflow's schema migration and the experiment's creation; on any store, an experiment created by
  another worker in the meantime (``RESOURCE_ALREADY_EXISTS``) is simply used.
- Runs left RUNNING by a process of this host that has ended (kill -9, the OOM killer) are closed
  as KILLED, with an ``error`` tag saying so, when the next run starts in the experiment.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sweeper.search.storage_url import sqlite_path
from sweeper.tracking.credentials import redact_password

STARTUP_CHECK_TIMEOUT_S = 5  # the one request that says whether an http(s) server is there
STORE_LOCK_TIMEOUT_S = 300  # waiting for another worker's SQLite migration (~2 s) and experiment
# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) retry a refused connection for
# ~258 s; ours give up after ~2 s, then the tracker keeps what it could not send and retries later.
CLIENT_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
TRANSIENT_ERROR_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


class TrackingUnavailableError(RuntimeError):
    """The tracking store cannot be reached at the start of a run; the message says how to go on."""

    def __init__(self, uri: str, reason: str, answered: bool = False) -> None:
        shown = redact_password(uri)
        what = "MLflow tracking server" if is_http(uri) else "MLflow tracking store"
        failed = "is not reachable" if is_http(uri) and not answered else "cannot be used"
        super().__init__(
            f"{what} {shown} (tracking.uri) {failed}: {reason}. Nothing was trained.\n"
            f"  Fix: start the server (mlflow server ...) or correct tracking.uri, or train without it: "
            f"tracking.enabled=false (no tracking) or tracking.uri=sqlite:///$PWD/outputs/mlflow.db (a local store)."
        )


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def use_short_http_retries() -> None:
    """MLflow reads its request settings from the environment at each call: set ours where the user set none."""
    for name, value in CLIENT_HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def short_reason(error: BaseException) -> str:
    """``[Errno 111] Connection refused`` rather than three nested exception reprs."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\][^'\")\]]*|[Rr]ead timed out|timed out|Connection refused", text)
    if found:
        return found.group(0).strip()
    return f"{type(error).__name__}: {text[:300]}"


def check_reachable(uri: str, timeout: float = STARTUP_CHECK_TIMEOUT_S) -> str | None:
    """None when an http(s) server answers (any answer but a gateway error), else why not; other URIs: None."""
    if not is_http(uri):
        return None
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as error:
        return short_reason(error)
    if response.status_code in (502, 503, 504):
        return f"HTTP {response.status_code} {response.reason}"
    return None


def is_unreachable(error: BaseException) -> bool:
    """The store is down or unreachable (worth keeping the data and retrying), not a refused request."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_ERROR_CODES
    import requests
    import sqlalchemy.exc

    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code >= 500
    return isinstance(error, requests.RequestException | OSError | sqlalchemy.exc.OperationalError)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Held while a SQLite store is first opened (MLflow migrates its schema then) and its experiment
    created: workers started together would otherwise migrate at once (``duplicate column name: step``)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=STORE_LOCK_TIMEOUT_S):
        yield


# MLflow 3 opens an experiment on its GenAI traces page unless it is tagged as model training
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(client: Any, name: str, artifact_location: str | None, attempts: int = 5) -> str:
    """Get or create: another worker creating it at the same moment is fine (``RESOURCE_ALREADY_EXISTS``)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.tags.get(EXPERIMENT_KIND) != TRAINING_KIND:  # made before, or by hand
                client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
            return experiment.experiment_id
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND: TRAINING_KIND}
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        time.sleep(0.1 * (attempt + 1))  # created by another worker, not yet visible to this one
    raise RuntimeError(f"experiment {name!r} exists but could not be read after {attempts} attempts")


def artifact_location(uri: str, artifact_root: str | None, outputs: Path, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts. On a server, where the server says (its
    ``--artifacts-destination``, proxied as ``mlflow-artifacts:``) unless tracking.artifact_root is set:
    a folder of this machine would be invisible to every other one."""
    if is_http(uri) and artifact_root is None:
        return None
    return Path(artifact_root or outputs / "mlartifacts").resolve().joinpath(experiment).as_uri()


def mark_killed(client: Any, run_id: str, reason: str) -> None:
    """A run whose process died: KILLED, with the reason as its ``error`` tag."""
    client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, status="KILLED")
