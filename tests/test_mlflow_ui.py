"""The MLflow UI, for real: a 2-trial sweep, ``mlflow server`` on loopback, headless Chromium via Playwright.

Needs Debian's ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` Python package; the test
never downloads a browser (no ``playwright install``). Screenshots land in the test's tmp dir and in
``outputs/test-artifacts/mlflow-ui/`` so CI can keep them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeper.tracking.tracker import runs_page
from tests.conftest import REPO, run_main

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing (pip install playwright; no browser download)"
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FAST_TRIAL = ["train.max_steps=4", "train.batch_size=2", "eval.num_inference_steps=2", "eval.images_per_prompt=1"]
SAMPLE_GRID = "samples/final.png"
SERVER_START_S = 60  # mlflow server + uvicorn import and migrate in ~10 s; generous for a loaded CI box
UI_WAIT_MS = 20_000  # every Playwright wait is bounded by this
KEPT_SHOTS = REPO / "outputs" / "test-artifacts" / "mlflow-ui"


@dataclass
class Sweep:
    cwd: Path
    experiment_id: str
    parent_id: str
    parent_name: str
    children: dict[str, str]  # run name -> run id
    dims: dict[str, str]  # run name -> network.dim
    clip_scores: dict[str, float]  # run name -> clip_score


@pytest.fixture
def sweep(tmp_path: Path) -> Sweep:
    cwd = tmp_path / "work"
    cwd.mkdir()
    done = run_main("-m", "network.dim=4,8", *FAST_TRIAL, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora-sweeper")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(SAMPLE_GRID in {a.path for a in client.list_artifacts(c.info.run_id, "samples")} for c in children)
    return Sweep(
        cwd=cwd,
        experiment_id=experiment.experiment_id,
        parent_id=parents[0].info.run_id,
        parent_name=parents[0].info.run_name,
        children={c.info.run_name: c.info.run_id for c in children},
        dims={c.info.run_name: c.data.params["network.dim"] for c in children},
        clip_scores={c.info.run_name: c.data.metrics["clip_score"] for c in children},
    )


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole session (mlflow CLI + uvicorn worker), SIGKILL whatever is left after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader: leave nothing of it running
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)


@pytest.fixture
def mlflow_server(sweep: Sweep, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """``mlflow server`` against the sweep's SQLite store on 127.0.0.1:<free port>; stopped by a finalizer."""
    port = free_loopback_port()
    store = sweep.cwd / "outputs"
    log_path = tmp_path / "mlflow-server.log"
    # No job runner: it would add a tree of huey consumer processes (and a /dev/shm dir) the UI doesn't need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        # The runs' artifact URIs are file:// paths under outputs/mlartifacts, which the server reads directly;
        # the proxy destination is pinned there too so nothing is created in the server's cwd.
        "--serve-artifacts",
        "--artifacts-destination",
        (store / "mlartifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=sweep.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    request.addfinalizer(lambda: stop_process_group(proc))

    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return base
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer in {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture
def page(tmp_path: Path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=UI_WAIT_MS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(UI_WAIT_MS)
            page.set_default_navigation_timeout(UI_WAIT_MS)
            yield page
        finally:
            browser.close()


class Shots:
    """Screenshots into the test's tmp dir, each copied at once to outputs/test-artifacts/mlflow-ui/."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(KEPT_SHOTS, ignore_errors=True)
        KEPT_SHOTS.mkdir(parents=True, exist_ok=True)

    def take(self, page, name: str) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), timeout=UI_WAIT_MS)
        shutil.copy2(path, KEPT_SHOTS / path.name)
        return path


def close_assistant_panel(page) -> None:
    """The 'MLflow Assistant' side panel opens by default and squeezes the page; close it where it shows."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        close.click(timeout=3_000)
        close.wait_for(state="hidden", timeout=3_000)
    except sync_api.TimeoutError:
        pass  # not shown in this MLflow build: nothing to close


def run_link(page, run_id: str):
    return page.locator(f'a[href$="/runs/{run_id}"]')


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_sweep_its_trials_their_samples_and_the_swept_param(
    sweep: Sweep, mlflow_server: str, page, tmp_path: Path
):
    shots = Shots(tmp_path / "screenshots")
    expect = sync_api.expect
    exp = sweep.experiment_id
    try:
        # (1) the page the run prints: the experiment's runs table (not MLflow 3's GenAI overview),
        # sorted by the objective: the trials listed flat, named by their swept values, best first
        page.goto(f"{mlflow_server}/{runs_page(exp, 'clip_score')}", wait_until="load")
        expect(page.get_by_text("Sort: clip_score")).to_be_visible()
        for name, run_id in sweep.children.items():
            expect(run_link(page, run_id).first).to_have_text(name)
        names = page.locator('[col-id="attributes.`Run Name`"] a').all_inner_texts()
        assert names[0] == max(sweep.clip_scores, key=sweep.clip_scores.get), names
        close_assistant_panel(page)
        shots.take(page, "01-printed-page-best-first")

        # the same table sorted by start time (MLflow's default) nests the trials under the sweep's parent
        by_start = "&orderByKey=attributes.start_time&orderByAsc=false"
        page.goto(f"{mlflow_server}/{runs_page(exp)}{by_start}", wait_until="load")
        parent_link = run_link(page, sweep.parent_id).first
        expect(parent_link).to_be_visible()
        expect(parent_link).to_have_text(sweep.parent_name)
        shots.take(page, "01-experiment-collapsed")

        parent_row = page.locator('[role="row"]', has=run_link(page, sweep.parent_id)).first
        parent_row.locator('[col-id="attributes.`Run Name`"] button').first.click()  # the expand (+) toggle
        for name, run_id in sweep.children.items():
            child = run_link(page, run_id).first
            expect(child).to_be_visible()
            expect(child).to_have_text(name)
        expect(page.get_by_text("3 matching runs")).to_be_visible()
        shots.take(page, "02-experiment-expanded")

        # (2) a trial's page: the clip_score metric, then the sample grid in the artifact tree, previewed
        name, run_id = sorted(sweep.children.items())[0]
        page.goto(f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}", wait_until="load")
        expect(page.get_by_test_id("runs-header")).to_have_text(name)
        clip = page.get_by_role("link", name="clip_score", exact=True)
        clip.scroll_into_view_if_needed()
        expect(clip).to_be_visible()
        expect(page.get_by_role("row").filter(has=clip)).to_contain_text(repr(sweep.clip_scores[name]))
        shots.take(page, "03-trial-overview-metrics")

        page.goto(f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}/artifacts", wait_until="load")
        folder, file_name = SAMPLE_GRID.split("/")
        page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{folder}"]').click()
        grid_node = page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{file_name}"]')
        expect(grid_node).to_be_visible()
        grid_node.click()
        preview = page.locator(f'img[alt="{SAMPLE_GRID}"]')
        expect(preview).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())
        shots.take(page, "04-trial-artifacts-sample-grid")

        # (3) compare view of the two trials: network.dim is among the params, with each trial's value
        ids = [sweep.children[n] for n in sorted(sweep.children)]
        query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp])})
        page.goto(f"{mlflow_server}/#/compare-runs?{query}", wait_until="load")
        expect(page.get_by_role("heading", name="Comparing 2 Runs")).to_be_visible()
        dim_row = page.locator("tr", has=page.get_by_role("rowheader", name="network.dim", exact=True))
        expect(dim_row).to_have_count(1)
        dim_row.scroll_into_view_if_needed()
        expect(dim_row.locator("td")).to_have_text([sweep.dims[n] for n in sorted(sweep.children)])
        shots.take(page, "05-compare-trials-params")
    except Exception:
        with contextlib.suppress(Exception):
            shots.take(page, "99-failure")
        raise
