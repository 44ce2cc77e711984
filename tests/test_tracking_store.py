"""Opening a tracking store: workers started together, a server that is down or dies, dead runs closed.

Real processes, a real SQLite file, a real ``mlflow server`` on PostgreSQL (tests/servers.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from sweeper.tracking.store import TrackingUnavailableError
from sweeper.tracking.tracker import NOT_UPLOADED, start_run
from tests.conftest import REPO, ended_at_teardown
from tests.servers import free_port

WORKERS = 4


def tracking(uri: str, tmp_path: Path, experiment: str = "lora-sweeper", artifact_root: str | None = None):
    return OmegaConf.create({"enabled": True, "uri": uri, "experiment": experiment, "artifact_root": artifact_root})


# One worker: imports MLflow, says it is ready, waits for "go", opens the store, logs, prints its run.
WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store
    from omegaconf import OmegaConf
    from sweeper.tracking.tracker import start_run
    uri, barrier, index = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cfg = OmegaConf.create({"enabled": True, "uri": uri, "experiment": "together", "artifact_root": None})
    if uri.startswith("http"):  # the client set up before "go" (a SQLite store must not be: it migrates)
        import requests
        mlflow.tracking.MlflowClient(uri)
    (barrier / f"ready-{index}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.002)
    with start_run(cfg, barrier / "outputs", run_name="worker") as tracker:
        tracker.log_params({"worker": index})
        tracker.log_metrics({"m": 1.0}, 1)
    print(json.dumps({"run_id": tracker.run_id}))
    """
)


def start_together(uri: str, tmp_path: Path, count: int = WORKERS) -> list[dict]:
    """``count`` real processes that open ``uri`` at the same instant, once all have imported MLflow."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        ended_at_teardown(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, uri, str(tmp_path), str(index)],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        for index in range(count)
    ]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < count:
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a worker did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
def test_workers_opening_a_new_sqlite_store_at_once_all_succeed_with_one_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    results = start_together(uri, tmp_path)

    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "together"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in results)
    assert {r.data.params["worker"] for r in runs} == {str(i) for i in range(WORKERS)}
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_workers_starting_together_on_a_new_server_all_succeed_with_one_experiment(tmp_path, mlflow_server):
    results = start_together(mlflow_server.url, tmp_path)

    client = MlflowClient(mlflow_server.url)
    experiments = [e for e in client.search_experiments() if e.name == "together"]
    assert len(experiments) == 1
    # the server chose where artifacts go: proxied to its --artifacts-destination, not a client folder
    assert experiments[0].artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in results)


def test_a_server_that_is_down_at_the_start_fails_within_seconds_naming_the_fixes(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailableError) as raised, start_run(tracking(uri, tmp_path), tmp_path):
        pytest.fail("the run must not start")
    elapsed = time.perf_counter() - started
    assert elapsed < 5, elapsed
    message = str(raised.value)
    assert f"{uri} (tracking.uri) is not reachable" in message
    assert "Connection refused" in message
    assert "tracking.enabled=false" in message and "tracking.uri=sqlite:///" in message


@pytest.mark.slow
def test_the_tracker_keeps_what_a_stopped_server_missed_and_sends_it_when_the_server_is_back(tmp_path, mlflow_server):
    local = tmp_path / "run"
    (local / "lora.safetensors").parent.mkdir(parents=True)
    (local / "lora.safetensors").write_bytes(b"weights")
    with start_run(tracking(mlflow_server.url, tmp_path), tmp_path, local_dir=local) as tracker:
        tracker.log_params({"a": 1})
        mlflow_server.stop()

        started = time.perf_counter()
        tracker.log_metrics({"train/loss": 0.5}, 1)
        tracker.flush()  # the first failed call: MLflow's retries, then offline
        first_failure = time.perf_counter() - started
        assert tracker.offline_reason is not None

        started = time.perf_counter()
        for step in range(2, 502):  # offline: kept, and the server is not asked on every call
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        tracker.set_tags({"selected_step": "500"})
        tracker.log_text("hello", "eval/summary.txt")
        tracker.log_image(Image.new("RGB", (8, 8)), "samples/step_000100.png")
        tracker.log_artifact(local / "lora.safetensors", "lora")
        offline_calls = time.perf_counter() - started
        mlflow_server.start()
    assert first_failure < 10, first_failure  # MLflow's own defaults retry for ~258 s
    assert offline_calls < 2, offline_calls

    # the end of the run tried once more, and everything arrived
    assert tracker.offline_reason is None and tracker.not_uploaded == []
    assert not (local / f"{NOT_UPLOADED}.txt").exists()
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["a"] == "1" and run.data.tags["selected_step"] == "500"
    assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 501
    files = {a.path for folder in ("eval", "samples", "lora") for a in client.list_artifacts(tracker.run_id, folder)}
    assert files == {"eval/summary.txt", "samples/step_000100.png", "lora/lora.safetensors"}


@pytest.mark.slow
def test_what_never_reached_the_server_is_listed_and_kept_beside_the_run(tmp_path, mlflow_server):
    local = tmp_path / "run"
    local.mkdir()
    (local / "lora.safetensors").write_bytes(b"weights")
    with start_run(tracking(mlflow_server.url, tmp_path), tmp_path, local_dir=local) as tracker:
        mlflow_server.stop()
        tracker.log_params({"a": 1})
        for step in range(1, 61):
            tracker.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step)
        tracker.log_text("scores", "eval/summary.txt")
        tracker.log_artifact(local / "lora.safetensors", "lora")

    report = (local / f"{NOT_UPLOADED}.txt").read_text()
    assert f"{mlflow_server.url} (tracking.uri) for run {tracker.run_id}" in report
    assert "metrics: 120 value(s) of 2 metric(s) (lr, train/loss), steps 1-60" in report
    assert f"artifact lora/lora.safetensors -> {local / 'lora.safetensors'}" in report
    assert "artifact eval/summary.txt" in report and "status FINISHED" in report
    kept = local / NOT_UPLOADED
    assert len((kept / "metrics.tsv").read_text().splitlines()) == 121
    assert json.loads((kept / "params.json").read_text()) == {"a": "1"}
    assert (kept / "artifacts" / "eval" / "summary.txt").read_text() == "scores"


def test_a_reopened_parent_run_drops_the_error_of_an_earlier_failure(tmp_path):
    cfg = tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    resume = {"sweep.study_name": "s", "sweep.role": "parent"}
    with pytest.raises(RuntimeError), start_run(cfg, tmp_path, resume_tags=resume) as first:
        raise RuntimeError("disk full")
    client = MlflowClient(cfg.uri)
    assert client.get_run(first.run_id).data.tags["error"] == "RuntimeError: disk full"

    with start_run(cfg, tmp_path, resume_tags=resume) as again:
        assert again.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags


def test_a_run_whose_process_was_killed_is_closed_as_killed_when_the_next_run_starts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from omegaconf import OmegaConf
        from pathlib import Path
        from sweeper.tracking.tracker import start_run
        cfg = OmegaConf.create({{"enabled": True, "uri": {uri!r}, "experiment": "lora-sweeper", "artifact_root": None}})
        with start_run(cfg, Path({str(tmp_path)!r})) as tracker:
            print(tracker.run_id, flush=True)
            time.sleep(600)
        """
    )
    process = ended_at_teardown(
        subprocess.Popen(
            [sys.executable, "-c", holder],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
    )
    killed_run = process.stdout.readline().strip()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    client = MlflowClient(uri)
    assert client.get_run(killed_run).info.status == "RUNNING"

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:  # a RUNNING run of a live process on this host is left alone
        with start_run(tracking(uri, tmp_path), tmp_path) as live:
            client.set_tag(live.run_id, "worker.pid", str(alive.pid))
            client.set_tag(live.run_id, "worker.started", "")
            with start_run(tracking(uri, tmp_path), tmp_path):
                pass
            assert client.get_run(live.run_id).info.status == "RUNNING"
    finally:
        alive.kill()
        alive.wait()

    run = client.get_run(killed_run)
    assert run.info.status == "KILLED"
    assert f"pid {process.pid}) ended without closing it" in run.data.tags["error"]
