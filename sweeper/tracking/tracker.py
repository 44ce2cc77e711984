"""Run tracking: MLflow through its client API, or a null tracker with the same methods.

The task and the loop call ``tracker.log_*`` unconditionally; whether anything is recorded is
decided once, here (the null-object pattern).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.run.process_identity import this_process
from sweeper.sync import NOT_UPLOADED, close_dead_runs, deliver_quietly, write_manifest
from sweeper.tracking.credentials import redact_password, with_credentials
from sweeper.tracking.store import (
    TrackingUnavailableError,
    artifact_location,
    check_reachable,
    experiment_id,
    is_http,
    is_unreachable,
    short_reason,
    store_lock,
    use_short_http_retries,
)
from training.atomic_file import write_text_atomically

METRIC_FLUSH_EVERY = 50  # buffered metric points per MLflow write (each write is a DB transaction)
PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length
OFFLINE_RETRY_SECONDS = 60  # an unreachable store is tried again at most this often (and at the run's end)


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


LOCAL_UI = "http://127.0.0.1:5000"
# MLflow 3.17's UI opens every experiment on its GenAI pages unless the page's workflowType says
# "machine learning" (a browser-wide toggle; the experiment's mlflow.experimentKind tag is not read)
RUNS_PAGE = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def runs_page(experiment_id: str, sort_by: str | None = None, higher_is_better: bool = True) -> str:
    """The experiment's runs table, sorted by ``sort_by`` (best first): MLflow shows no metric column
    by default and takes none from the URL, but it does take the sort order."""
    page = RUNS_PAGE.format(experiment_id=experiment_id)
    if sort_by:
        page += f"&orderByKey=metrics.%60{sort_by}%60&orderByAsc={'false' if higher_is_better else 'true'}"
    return page


def ui_command(
    tracking_uri: str, experiment_id: str | None = None, sort_by: str | None = None, higher_is_better: bool = True
) -> str:
    """The command that opens the MLflow UI on this store, and the page with the experiment's runs."""
    page = runs_page(experiment_id, sort_by, higher_is_better) if experiment_id else ""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {redact_password(tracking_uri).rstrip('/')}/{page}"
    # this interpreter's own mlflow (works without activating the venv); one web worker and no job
    # runner: 2 processes and ~0.55 GB instead of 10 and ~2.5 GB (measured, MLflow 3.17)
    mlflow = Path(sys.executable).with_name("mlflow")
    return (
        f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {mlflow} ui --workers 1 "
        f"--backend-store-uri {redact_password(tracking_uri)}, then open {LOCAL_UI}/{page}"
    )


class NullTracker:
    """Tracking off: every call is accepted and nothing is kept."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    leave_running = False

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_image(self, image: Any, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient`` with metrics buffered into batches.

    Tracking never stops training: when the store stops answering, the tracker goes offline. It
    keeps what it could not send (metrics, params, tags, artifacts by their local file), tries again
    at most every ``retry_every_s`` seconds and once more when the run ends, and then lists what never
    arrived (printed, and written to ``<local_dir>/tracking-not-uploaded.txt`` with the data beside it).
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        tracking_uri: str,
        *,
        local_dir: Path | None = None,
        retry_every_s: float = OFFLINE_RETRY_SECONDS,
    ) -> None:
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self.local_dir, self.retry_every_s = local_dir, retry_every_s
        self.leave_running = False
        self.offline_reason: str | None = None  # why the store was last unreachable; None = online
        self.not_uploaded: list[str] = []  # the final report's lines, once the run has ended
        self._pending: list[Any] = []
        self._kept: list[_Item] = []  # not sent yet, in order
        self._refused: list[tuple[_Item, str]] = []  # refused by the store when re-sent
        self._next_retry = 0.0
        self._spool: Path | None = None  # texts and images written for upload

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts 100 params per batch
            self._send(_Item("params", items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        if len(self._pending) >= METRIC_FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self._send(_Item("metrics", chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(_Item("artifact", Path(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send(_Item("text", redact_password(text), artifact_file))  # a config may still hold a URL's password

    def log_image(self, image: Any, artifact_file: str) -> None:
        path = self._spool_path(artifact_file)
        image.save(path)
        self._send(_Item("artifact", path, _folder(artifact_file), spooled=True))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send(_Item("tags", {key: redact_password(str(value)) for key, value in tags.items()}))

    def close(self, status: str) -> None:
        """Flush, set the run's final status (unless ``leave_running``), retry what was kept, report the rest."""
        self.flush()
        if not self.leave_running:
            self._send(_Item("status", status))
        if self.offline_reason is not None:
            self._reconnect(force=True)
        if self._kept or self._refused:
            self._report()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    # --- sending, keeping, re-sending
    def _send(self, item: _Item) -> None:
        if self.offline_reason is not None and not self._reconnect():
            self._keep(item)
            return
        try:
            item.send(self.client, self.run_id)
        except Exception as error:
            if not is_unreachable(error):
                raise
            self._go_offline(error)
            self._keep(item)
            return
        item.sent()

    def _go_offline(self, error: BaseException) -> None:
        self.offline_reason = short_reason(error)
        self._next_retry = time.monotonic() + self.retry_every_s
        print(
            f"\nMLflow: {redact_password(self.tracking_uri)} (tracking.uri) stopped answering ({self.offline_reason}); "
            f"training goes on, what is not sent is kept and retried every {self.retry_every_s:.0f} s "
            "(the end of the run lists what never arrived)",
            file=sys.stderr,
        )

    def _keep(self, item: _Item) -> None:
        if item.kind == "text":  # kept as a file: on disk, not in memory, and listed by its path
            path = self._spool_path(item.target)
            path.write_text(item.payload)
            item = _Item("artifact", path, _folder(item.target), spooled=True)
        last = self._kept[-1] if self._kept else None
        if item.kind == "metrics" and last is not None and last.kind == "metrics" and len(last.payload) < 1000:
            last.payload.extend(item.payload)
            return
        self._kept.append(item)

    def _reconnect(self, force: bool = False) -> bool:
        """Back online when the store answers and everything kept has gone through (at most every retry_every_s)."""
        if not force and time.monotonic() < self._next_retry:
            return False
        self._next_retry = time.monotonic() + self.retry_every_s
        reason = check_reachable(self.tracking_uri)
        if reason is not None:
            self.offline_reason = reason
            return False
        sent = 0
        while self._kept:
            item = self._kept[0]
            try:
                item.send(self.client, self.run_id)
            except Exception as error:
                if is_unreachable(error):
                    self.offline_reason = short_reason(error)
                    return False
                self._refused.append((item, f"{type(error).__name__}: {str(error)[:300]}"))
            else:
                item.sent()
                sent += 1
            self._kept.pop(0)
        self.offline_reason = None
        print(f"MLflow: {redact_password(self.tracking_uri)} answers again; {sent} kept item(s) sent", file=sys.stderr)
        return True

    def _spool_path(self, artifact_file: str) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="lora-sweeper-tracking-"))
        path = self._spool / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _report(self) -> None:
        """Print, and write beside the run's output, what did not reach the store; keep its data there."""
        folder = (self.local_dir or Path(tempfile.mkdtemp(prefix="lora-sweeper-"))) / NOT_UPLOADED
        folder.mkdir(parents=True, exist_ok=True)
        kept_lines, artifacts = _not_uploaded_lines(self._kept, folder)
        lines = kept_lines + [f"  refused by the store: {item.describe()}: {error}" for item, error in self._refused]
        status = next((item.payload for item in self._kept if item.kind == "status"), None)
        if self._kept:  # what `python -m sweeper.sync` (or the next run in this folder) delivers
            write_manifest(folder, self.run_id, redact_password(self.tracking_uri), status, artifacts)
            lines.append(f"  when the store answers again: python -m sweeper.sync {folder.parent}")
        reason = f": {self.offline_reason}" if self.offline_reason else ""
        head = (
            f"WARNING: not everything reached the MLflow tracking store {redact_password(self.tracking_uri)} "
            f"(tracking.uri) for run {self.run_id}{reason}. Training was not affected; missing there:"
        )
        report = folder.with_name(NOT_UPLOADED + ".txt")
        self.not_uploaded = lines
        write_text_atomically(report, "\n".join([head, *lines]) + "\n")
        print("\n".join(["", head, *lines, f"  (this list: {report}; the data: {folder}/)"]), file=sys.stderr)


@dataclass
class _Item:
    """One write to the run: sent now, or kept to be sent when the store answers again."""

    kind: str  # params | metrics | tags | artifact | text | status
    payload: Any
    target: str | None = None  # the artifact folder (artifact) or file (text)
    spooled: bool = False  # a file written for the upload (image, kept text): removed once sent

    def send(self, client: Any, run_id: str) -> None:
        from mlflow.entities import RunTag

        if self.kind == "params":
            client.log_batch(run_id, params=self.payload, synchronous=True)
        elif self.kind == "metrics":
            client.log_batch(run_id, metrics=self.payload, synchronous=True)
        elif self.kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self.payload.items()], synchronous=True)
        elif self.kind == "artifact":
            client.log_artifact(run_id, str(self.payload), self.target)
        elif self.kind == "text":
            client.log_text(run_id, self.payload, self.target)
        else:
            client.set_terminated(run_id, status=self.payload)

    def sent(self) -> None:
        if self.spooled:
            self.payload.unlink(missing_ok=True)

    def describe(self) -> str:
        if self.kind == "artifact":
            return f"artifact {_artifact_name(self)}"
        return f"{self.kind} ({len(self.payload)})" if self.kind != "status" else f"run status {self.payload}"


def _folder(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def _artifact_name(item: _Item) -> str:
    return f"{item.target}/{item.payload.name}" if item.target else item.payload.name


def _not_uploaded_lines(kept: list[_Item], folder: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """One line per kind of what was kept; metrics, params and tags are written into ``folder``; and
    each kept artifact's file and folder in the run (for ``sweeper.sync``)."""
    lines, artifacts = [], []
    metrics = [m for item in kept if item.kind == "metrics" for m in item.payload]
    if metrics:
        rows = ["key\tvalue\tstep\ttimestamp"] + [f"{m.key}\t{m.value!r}\t{m.step}\t{m.timestamp}" for m in metrics]
        (folder / "metrics.tsv").write_text("\n".join(rows) + "\n")
        names = sorted({m.key for m in metrics})
        steps = [m.step for m in metrics]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(
            f"  metrics: {len(metrics)} value(s) of {len(names)} metric(s) ({shown}), steps {min(steps)}-{max(steps)}"
            f" -> {folder / 'metrics.tsv'}"
        )
    params = {p.key: p.value for item in kept if item.kind == "params" for p in item.payload}
    if params:
        (folder / "params.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        lines.append(f"  params: {len(params)} -> {folder / 'params.json'}")
    tags = {k: v for item in kept if item.kind == "tags" for k, v in item.payload.items()}
    if tags:
        (folder / "tags.json").write_text(json.dumps(tags, indent=1, sort_keys=True) + "\n")
        lines.append(f"  tags: {', '.join(sorted(tags))} -> {folder / 'tags.json'}")
    for item in kept:
        if item.kind != "artifact":
            continue
        path = item.payload
        if item.spooled:  # out of the temporary spool, into the run's folder
            path = folder / "artifacts" / _artifact_name(item)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(item.payload, path)
        lines.append(f"  artifact {_artifact_name(item)} -> {path}")
        artifacts.append({"path": str(path), "target": item.target})
    for item in kept:
        if item.kind == "status":
            lines.append(f"  the run's end (status {item.payload}): the store still shows it RUNNING")
    return lines, artifacts


def _find_run(client: Any, experiment_id: str, tags: Mapping[str, str]) -> Any | None:
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1, order_by=["start_time ASC"])
    return runs[0] if runs else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    text = redact_password(text)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


@contextmanager
def start_run(
    tracking_cfg: Any,
    outputs: Path,
    run_name: str | None = None,
    description: str = "",
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_tags: Mapping[str, str] | None = None,
    local_dir: Path | None = None,
) -> Iterator[MlflowTracker | NullTracker]:
    """Open a run (nested under ``parent_run_id`` if given) and always close it with a status.

    With ``resume_tags``, an existing top-level run carrying exactly those tags is reopened instead
    of starting a new one (a resumed sweep keeps its one parent run); an ``error`` tag left by an
    earlier failure is dropped. A store that cannot be reached here raises
    ``TrackingUnavailableError`` within seconds; later, the tracker goes offline instead (see
    ``MlflowTracker``) and writes what did not arrive to ``local_dir/tracking-not-uploaded.txt``.
    """
    if not tracking_cfg.enabled:
        yield NullTracker()
        return
    uri = tracking_cfg.uri or default_tracking_uri(outputs)
    if local_dir is not None:  # an earlier run in this folder kept what its store did not take: send it first
        deliver_quietly(Path(local_dir))
    client, run = _open_run(tracking_cfg, uri, outputs, run_name, description, parent_run_id, tags, resume_tags)
    tracker = MlflowTracker(client, run.info.run_id, uri, local_dir=local_dir)
    tracker.experiment_id = run.info.experiment_id
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt as interrupted:  # Ctrl-C, or SIGTERM (sweeper.run.signals)
        from sweeper.run.signals import interruption_reason

        status = "KILLED"
        tracker.set_tags({"error": interruption_reason(interrupted)})
        raise
    except BaseException as error:
        tracker.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        raise
    finally:
        tracker.close(status)  # a sweep's parent that other workers still use stays RUNNING (leave_running)


def _open_run(
    tracking_cfg: Any,
    uri: str,
    outputs: Path,
    run_name: str | None,
    description: str,
    parent_run_id: str | None,
    tags: Mapping[str, str] | None,
    resume_tags: Mapping[str, str] | None,
) -> tuple[Any, Any]:
    """The client and the new (or reopened) run; ``TrackingUnavailableError`` when the store does not answer."""
    from mlflow.tracking import MlflowClient

    if is_http(uri):
        use_short_http_retries()
        problem = check_reachable(uri)
        if problem is not None:
            raise TrackingUnavailableError(uri, problem)
    run_tags = {**(tags or {}), **this_process()}  # who runs it: a run its process left RUNNING is found later
    if description:
        run_tags["mlflow.note.content"] = description
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    try:
        with store_lock(uri):  # the first open of a SQLite store migrates it: one worker at a time
            client = MlflowClient(tracking_uri=with_credentials(uri))
            location = artifact_location(uri, tracking_cfg.artifact_root, outputs, tracking_cfg.experiment)
            experiment = experiment_id(client, tracking_cfg.experiment, location)
        close_dead_runs(client, experiment)
        existing = _find_run(client, experiment, resume_tags) if resume_tags else None
        if existing is not None:
            client.update_run(existing.info.run_id, status="RUNNING")
            if "error" in existing.data.tags:  # from an earlier failure; this resume starts clean
                client.delete_tag(existing.info.run_id, "error")
            return client, existing
        return client, client.create_run(experiment, run_name=run_name, tags={**run_tags, **(resume_tags or {})})
    except Exception as error:
        from mlflow.exceptions import MlflowException

        if is_unreachable(error):
            raise TrackingUnavailableError(uri, short_reason(error)) from error
        if isinstance(error, MlflowException):  # it answered, but not as an MLflow store would (a wrong URL)
            raise TrackingUnavailableError(uri, f"{type(error).__name__}: {error}", answered=True) from error
        raise
