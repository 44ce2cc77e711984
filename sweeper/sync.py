"""``python -m sweeper.sync OUTPUT_DIR``: send to the MLflow store what runs kept while it was down.

A run whose tracking store stopped answering finishes anyway and keeps what did not arrive in
``<output.dir>/tracking-not-uploaded/`` (``sweeper.tracking.tracker``), with ``manifest.json`` naming the
run, the store and each part. This sends the parts in order (params, tags, metrics, artifacts, the
run's end), recording each in the manifest as it arrives, so a second sync, or one that stops
half-way, never sends a part twice. Once everything arrived the folder becomes ``tracking-uploaded/``.

The same happens without a command: at the start of a run whose ``output.dir`` holds such a folder,
and when the stale-run check finds a RUNNING run whose process ended after recording its end
locally (it is delivered, not marked KILLED).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sweeper.run.process_identity import HOST, PID, is_gone
from sweeper.tracking.store import check_reachable, is_http, mark_killed, use_short_http_retries
from training.atomic_file import write_text_atomically

NOT_UPLOADED = "tracking-not-uploaded"
UPLOADED = "tracking-uploaded"
MANIFEST = "manifest.json"
STEPS = ("params", "tags", "metrics", "artifacts", "status")


def write_manifest(folder: Path, run_id: str, tracking_uri: str, status: str | None, artifacts: list[dict]) -> None:
    """What ``sync`` needs to deliver the kept parts of ``run_id`` (written with the report)."""
    manifest = {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "status": status,
        "artifacts": artifacts,  # {"path", "target"}: target is the artifact folder in the run (or null)
        "sent": [],
    }
    write_text_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))


def pending(root: Path, recursive: bool = True) -> list[Path]:
    """Manifests of kept parts not yet delivered under ``root``."""
    if not root.is_dir():
        return []
    if not recursive:
        found = root / NOT_UPLOADED / MANIFEST
        return [found] if found.is_file() else []
    return sorted(root.rglob(f"{NOT_UPLOADED}/{MANIFEST}"))


def deliver(manifest_path: Path, tracking_uri: str | None = None) -> str:
    """Send one run's kept parts; returns what happened in a line. Raises when the store does not answer."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from sweeper.tracking.credentials import with_credentials

    folder = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    uri = tracking_uri or manifest["tracking_uri"]
    if is_http(uri):
        use_short_http_retries()
        problem = check_reachable(uri)
        if problem is not None:
            raise ConnectionError(f"{uri} does not answer: {problem}")
    client = MlflowClient(tracking_uri=with_credentials(uri))
    run_id = manifest["run_id"]
    client.get_run(run_id)  # the run must exist in this store

    def done(step: str) -> None:
        manifest["sent"].append(step)
        write_text_atomically(manifest_path, json.dumps(manifest, indent=1))

    if "params" not in manifest["sent"]:
        params = _read_json(folder / "params.json")
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start : start + 100], synchronous=True)
        done("params")
    if "tags" not in manifest["sent"]:
        tags = _read_json(folder / "tags.json")
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        done("tags")
    if "metrics" not in manifest["sent"]:
        metrics = _read_metrics(folder / "metrics.tsv", Metric)
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
        done("metrics")
    for index, artifact in enumerate(manifest["artifacts"]):
        step = f"artifact:{index}"
        if step in manifest["sent"]:
            continue
        path = Path(artifact["path"])
        if path.exists():
            client.log_artifact(run_id, str(path), artifact.get("target"))
        done(step)
    if "status" not in manifest["sent"]:
        if manifest.get("status"):
            client.set_terminated(run_id, status=manifest["status"])
        done("status")
    delivered = folder.with_name(UPLOADED)
    if delivered.exists():
        delivered = folder.with_name(f"{UPLOADED}-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(delivered)
    report = folder.with_name(NOT_UPLOADED + ".txt")
    if report.exists():
        report.rename(delivered.with_suffix(".txt"))
    return f"run {run_id}: kept parts sent to {uri} ({len(manifest['artifacts'])} artifact(s)); now in {delivered}"


def deliver_quietly(root: Path, recursive: bool = False) -> list[str]:
    """Deliver what is pending under ``root``; a store that still does not answer leaves it for later."""
    lines = []
    for manifest in pending(root, recursive):
        try:
            lines.append(deliver(manifest))
        except Exception as error:  # the store is still down, or refuses: keep it, say so
            lines.append(f"{manifest.parent}: not sent yet ({type(error).__name__}: {str(error)[:200]})")
    for line in lines:
        print(f"MLflow sync: {line}", file=sys.stderr)
    return lines


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_metrics(path: Path, metric: Any) -> list[Any]:
    if not path.is_file():
        return []
    rows = path.read_text().splitlines()[1:]
    found = []
    for row in rows:
        key, value, step, timestamp = row.split("\t")
        found.append(metric(key, float(value), int(timestamp), int(step)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.sync",
        description="Send to the MLflow store what runs kept while it did not answer (tracking-not-uploaded/).",
    )
    parser.add_argument("output_dir", type=Path, help="a run's output.dir, or a folder of many (searched recursively)")
    parser.add_argument("--tracking-uri", help="the store to send to (default: the one each run used)")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"{args.output_dir}: no such folder (give a run's output.dir)", file=sys.stderr)
        return 2
    manifests = pending(args.output_dir)
    if not manifests:
        print(f"Nothing to send under {args.output_dir}: every run's tracking data reached its store.")
        return 0
    failed = 0
    for manifest in manifests:
        try:
            print(deliver(manifest, args.tracking_uri))
        except Exception as error:
            failed += 1
            print(
                f"{manifest.parent}: not sent ({type(error).__name__}: {str(error)[:300]}); try again later",
                file=sys.stderr,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


def _delivered_from_its_folder(run: Any) -> bool:
    """A run whose process finished offline left its end in ``<output.dir>/tracking-not-uploaded``:
    deliver it (FINISHED with everything) rather than call it killed."""
    folder = run.data.tags.get("output.dir")
    for manifest in pending(Path(folder), recursive=False) if folder else []:
        if json.loads(manifest.read_text()).get("run_id") == run.info.run_id:
            try:
                print(f"MLflow sync: {deliver(manifest)}")
                return True
            except Exception as error:  # cannot send it now: still not a killed run
                print(f"MLflow sync: {manifest.parent}: not sent yet ({type(error).__name__}: {error})")
                return True
    return False


def close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Runs of this experiment still RUNNING whose process on this host has ended -> KILLED with the reason."""
    host = socket.gethostname()
    quoted = host.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{quoted}'", max_results=1000
    )
    closed = []
    for run in runs:
        if run.data.tags.get("sweep.role") == "parent":  # shared by a sweep's workers: the sweep reconciles it
            continue
        if is_gone(run.data.tags) is not True:
            continue
        if _delivered_from_its_folder(run):  # it ended, but its end never reached the store: sent now
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        reason = (
            f"the process that ran this run (host {host}, pid {run.data.tags.get(PID)}) ended without closing it "
            f"(killed: kill -9, out of memory, power loss); marked KILLED at {when} when the next run started"
        )
        mark_killed(client, run.info.run_id, reason)
        closed.append(run.info.run_id)
    if closed:
        print(f"MLflow: {len(closed)} run(s) left RUNNING by ended processes marked KILLED: {', '.join(closed)}")
        sys.stdout.flush()
    return closed
