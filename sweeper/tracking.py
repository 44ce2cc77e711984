"""Run tracking: MLflow through its client API, or a null tracker with the same methods.

The task and the loop call ``tracker.log_*`` unconditionally; whether anything is recorded is
decided once, here (the null-object pattern).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

METRIC_FLUSH_EVERY = 50  # buffered metric points per MLflow write (each write is a DB transaction)
PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}``; lists stay whole values (one param each)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def default_tracking_uri(outputs: Path) -> str:
    return f"sqlite:///{(outputs / 'mlflow.db').resolve()}"


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


class NullTracker:
    """Tracking off: every call is accepted and nothing is kept."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_image(self, image: Any, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient`` with metrics buffered into batches."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str) -> None:
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self._pending: list[Any] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        if len(self._pending) >= METRIC_FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            image.save(path)
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent) or None)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact_password(str(value)))


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]+:)[^@\s]+@")


def redact_password(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)


def _find_run(client: Any, experiment_id: str, tags: Mapping[str, str]) -> Any | None:
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1, order_by=["start_time ASC"])
    return runs[0] if runs else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    text = redact_password(text)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _experiment_id(client: Any, tracking_cfg: Any, outputs: Path) -> str:
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_root = Path(tracking_cfg.artifact_root or outputs / "mlartifacts").resolve()
    return client.create_experiment(
        tracking_cfg.experiment, artifact_location=artifact_root.joinpath(tracking_cfg.experiment).as_uri()
    )


@contextmanager
def start_run(
    tracking_cfg: Any,
    outputs: Path,
    run_name: str | None = None,
    description: str = "",
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_tags: Mapping[str, str] | None = None,
) -> Iterator[MlflowTracker | NullTracker]:
    """Open a run (nested under ``parent_run_id`` if given) and always close it with a status.

    With ``resume_tags``, an existing top-level run carrying exactly those tags is reopened instead
    of starting a new one (a resumed sweep keeps its one parent run).
    """
    if not tracking_cfg.enabled:
        yield NullTracker()
        return
    from mlflow.tracking import MlflowClient

    uri = tracking_cfg.uri or default_tracking_uri(outputs)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, tracking_cfg, outputs)
    run_tags = dict(tags or {})
    if description:
        run_tags["mlflow.note.content"] = description
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    existing = _find_run(client, experiment_id, resume_tags) if resume_tags else None
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        run = existing
    else:
        run = client.create_run(experiment_id, run_name=run_name, tags={**run_tags, **(resume_tags or {})})
    tracker = MlflowTracker(client, run.info.run_id, uri)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as error:
        tracker.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        raise
    finally:
        try:
            tracker.flush()
        finally:
            client.set_terminated(run.info.run_id, status=status)
