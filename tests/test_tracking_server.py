"""``python -m sweeper`` against a real MLflow server: where artifacts go, the server dying mid-run or
down at the start, runs left RUNNING by kill -9, and passwords that never appear anywhere."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from sweeper.tracking.tracker import NOT_UPLOADED
from tests.conftest import REPO, run_cli, run_main
from tests.servers import create_postgres_database, drop_postgres_database, free_port

TINY = [
    "model=tiny",
    "eval.clip_model=tiny",
    "train.batch_size=2",
    "eval.num_inference_steps=2",
    "eval.images_per_prompt=1",
    "eval.prompts=[a red circle on a blue background,a green square on a yellow background]",
]


def runs(client: MlflowClient, experiment: str = "lora-sweeper"):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


@pytest.mark.slow
def test_on_a_server_the_lora_lands_in_the_servers_artifacts_destination(tmp_path, mlflow_server):
    done = run_main(*TINY, "train.max_steps=4", f"tracking.uri={mlflow_server.url}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    [run] = runs(MlflowClient(mlflow_server.url))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = mlflow_server.artifacts / run.info.experiment_id / run.info.run_id / "artifacts"
    assert (stored / "lora" / "lora.safetensors").is_file()
    assert (stored / "config" / "resolved.yaml").is_file()
    assert not (tmp_path / "outputs" / "mlartifacts").exists()  # nothing kept on the client's side


def sync(output_dir: Path) -> subprocess.CompletedProcess:
    """``python -m sweeper.sync OUTPUT_DIR`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sweeper.sync", str(output_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_server_dying_mid_run_does_not_stop_training_and_the_run_says_what_did_not_arrive(tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server.url)
    stopped = {}

    def stop_at_first_metrics() -> None:  # the server dies once training has sent its first metrics
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            found = [r for r in runs(client) if "train/loss" in r.data.metrics]
            if found:
                stopped["step"] = len(client.get_metric_history(found[0].info.run_id, "train/loss"))
                mlflow_server.stop()
                stopped["at"] = time.monotonic()
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=stop_at_first_metrics, daemon=True)
    watcher.start()
    out = tmp_path / "run"
    done = run_main(
        *TINY,
        "train.max_steps=400",
        "eval.every_n_steps=200",
        f"output.dir={out}",
        f"tracking.uri={mlflow_server.url}",
        cwd=tmp_path,
    )
    ended = time.monotonic()
    watcher.join(timeout=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at" in stopped, "the server was never stopped: no metrics reached it"
    print(f"server stopped after {stopped['step']} steps; run ended {ended - stopped['at']:.0f} s later")

    assert (out / "lora.safetensors").is_file()  # saved locally whatever the server does
    assert json.loads((out / "run.json").read_text())["lora_file"] == str(out / "lora.safetensors")
    assert "stopped answering" in done.stderr and "training goes on" in done.stderr
    report = (out / f"{NOT_UPLOADED}.txt").read_text()
    assert report.splitlines()[0] in done.stderr
    assert f"artifact lora/lora.safetensors -> {out / 'lora.safetensors'}" in report
    assert "metrics: " in report and f"-> {out / NOT_UPLOADED / 'metrics.tsv'}" in report
    assert "status FINISHED" in report
    metrics = (out / NOT_UPLOADED / "metrics.tsv").read_text().splitlines()
    assert any(line.startswith("train/loss\t") and line.split("\t")[2] == "400" for line in metrics)
    # a dead server costs seconds once (MLflow's own retries would wait ~258 s per call)
    assert ended - stopped["at"] < 150, ended - stopped["at"]
    assert f"python -m sweeper.sync {out}" in report

    # the server is back: the sync command delivers what was kept, once
    mlflow_server.start()
    [offline] = runs(client)
    assert offline.info.status == "RUNNING"
    synced = sync(out)
    assert synced.returncode == 0, synced.stderr[-3000:]
    [delivered] = runs(client)
    assert delivered.info.status == "FINISHED" and "error" not in delivered.data.tags
    history = client.get_metric_history(delivered.info.run_id, "train/loss")
    assert history[-1].step == 400
    assert "clip_score" in delivered.data.metrics and "lora.sha256" in delivered.data.tags
    stored = mlflow_server.artifacts / delivered.info.experiment_id / delivered.info.run_id / "artifacts"
    assert (stored / "lora" / "lora.safetensors").is_file() and (stored / "samples" / "selected.png").is_file()
    assert not (out / NOT_UPLOADED).exists() and (out / "tracking-uploaded" / "manifest.json").is_file()
    again = sync(out)
    assert again.returncode == 0 and "Nothing to send" in again.stdout
    assert len(client.get_metric_history(delivered.info.run_id, "train/loss")) == len(history)  # sent once


def test_a_run_that_ended_offline_is_delivered_not_marked_killed_by_the_next_run(tmp_path):
    """The stale-run check finds a RUNNING run whose process is gone but left its end in its folder."""
    from sweeper.sync import NOT_UPLOADED as KEPT
    from sweeper.sync import close_dead_runs, write_manifest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("offline")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    (out / KEPT).mkdir(parents=True)
    run = client.create_run(
        experiment,
        tags={"worker.host": socket.gethostname(), "worker.pid": ended.stdout.strip(), "output.dir": str(out)},
    )
    (out / KEPT / "metrics.tsv").write_text("key\tvalue\tstep\ttimestamp\nclip_score\t31.5\t10\t1700000000000\n")
    (out / KEPT / "tags.json").write_text(json.dumps({"lora.sha256": "abc"}))
    write_manifest(out / KEPT, run.info.run_id, uri, "FINISHED", [])
    assert close_dead_runs(client, experiment) == []
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and "error" not in after.data.tags
    assert after.data.metrics["clip_score"] == 31.5 and after.data.tags["lora.sha256"] == "abc"
    # a dead run without such a record is still marked KILLED
    other = client.create_run(
        experiment, tags={"worker.host": socket.gethostname(), "worker.pid": ended.stdout.strip()}
    )
    assert close_dead_runs(client, experiment) == [other.info.run_id]


def test_a_server_down_at_the_start_stops_the_run_at_once_with_the_fixes(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_main(*TINY, "train.max_steps=4", f"tracking.uri={uri}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        f"MLflow tracking server {uri} (tracking.uri) is not reachable: [Errno 111] Connection refused" in done.stderr
    )
    assert "tracking.enabled=false" in done.stderr
    assert "Traceback" not in done.stderr and "train:" not in done.stderr


@pytest.mark.slow
def test_a_run_killed_with_sigkill_is_marked_killed_when_the_next_run_starts(tmp_path):
    store = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *TINY, "train.max_steps=100000", "eval.every_n_steps=0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while True:  # killed while training: its first metrics are in the store
            assert process.poll() is None and time.monotonic() < deadline, "the first run ended or never trained"
            if (tmp_path / "outputs" / "mlflow.db").exists():
                training = [r for r in runs(store) if "train/loss" in r.data.metrics]
                if training:
                    break
            time.sleep(0.5)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    [killed] = training
    assert store.get_run(killed.info.run_id).info.status == "RUNNING"
    assert killed.data.tags["worker.pid"] == str(process.pid)

    done = run_main(*TINY, "train.max_steps=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"marked KILLED: {killed.info.run_id}" in done.stdout
    run = store.get_run(killed.info.run_id)
    assert run.info.status == "KILLED"
    assert f"pid {process.pid}) ended without closing it" in run.data.tags["error"]
    [second] = [r for r in runs(store) if r.info.run_id != killed.info.run_id]
    assert second.info.status == "FINISHED"


def every_row(url: str) -> str:
    """Every row of every table of a PostgreSQL database, as text."""
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        tables = connection.execute("select tablename from pg_tables where schemaname = 'public'").fetchall()
        return "\n".join(str(connection.execute(f'select * from "{t}"').fetchall()) for (t,) in tables)


@pytest.mark.slow
def test_passwords_in_the_storage_and_tracking_urls_appear_nowhere(tmp_path, mlflow_server):
    storage_db = create_postgres_database()
    try:
        storage = storage_db.url_with_password("S3cretPw")
        tracking = mlflow_server.url_with_credentials("user", "S3cretPw2")
        done = run_cli(
            "-m",
            *TINY,
            "train.max_steps=4",
            "network.dim=4,8",
            f"hydra.sweeper.storage={storage}",
            f"tracking.uri={tracking}",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        study = optuna.load_study(study_name=None, storage=storage_db.url)
        assert len(study.trials) == 2
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        optuna_rows = every_row(storage_db.url)
        assert "network.dim" in optuna_rows
    finally:
        drop_postgres_database(storage_db)

    secret = "S3cretPw"  # a prefix of both passwords
    assert secret not in done.stdout and secret not in done.stderr
    assert secret not in optuna_rows  # the study's tables (attributes, trial params)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in written) and any(p.parent.name == ".hydra" for p in written)
    assert [p for p in written if secret.encode() in p.read_bytes()] == []

    client = MlflowClient(mlflow_server.url)
    all_runs = runs(client)
    assert len(all_runs) == 3  # the parent and two trials
    for run in all_runs:
        assert secret not in json.dumps([run.data.params, run.data.tags])
        downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / run.info.run_id)))
        files = [p for p in downloaded.rglob("*") if p.is_file()]
        assert [p for p in files if secret.encode() in p.read_bytes()] == []
    trials = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert all(t.data.params["tracking.uri"] == mlflow_server.url for t in trials)
    assert any(p.name == "overrides.txt" for p in (tmp_path / "dl").rglob("*"))
