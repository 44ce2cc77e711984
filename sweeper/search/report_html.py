"""The sweep report: one self-contained HTML page that compares the trials, offline.

MLflow's own views cannot be set up from outside (no preselected metric column, the compare view
plots whatever it likes first, and "No common artifacts to display" for the sample grids), so the
sweep brings its own page: the leaderboard in the terminal summary's words, every trial's selected
sample grid side by side, Optuna's plots, the failed and pruned trials with their reasons, and the
commands that reproduce a trial or resume the sweep. It is written to the sweep folder and logged
to the parent run as ``sweep/report.html``, which MLflow's artifact view previews (a sandboxed
iframe that runs scripts).

Size: the images are downscaled and embedded as data URIs; plotly.js (4.8 MB in plotly 6-7) is
embedded once for all plots, gzip-compressed (1.5 MB, 2 MB as base64) and unpacked in the browser
with ``DecompressionStream``. The tables and grids need no script at all.
"""

from __future__ import annotations

import base64
import gzip
import html
import io
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from sweeper.search.report import SweepSummary, sweep_figures
from sweeper.search.space import describe_params
from sweeper.tracking.credentials import redact_password, with_credentials
from training.atomic_file import write_text_atomically

REPORT_NAME = "report.html"  # in the sweep folder
REPORT_ARTIFACT = "sweep/report.html"  # on the parent run
GRID_MAX_WIDTH = 768  # px: a 6-prompt x 8-image SD grid (4096 px wide) still shows faces, at ~100 KB
GRID_SHOWN_WIDTH = 480  # px on the page: every grid at the same scale, several side by side
GRID = "samples/selected.png"  # the checkpoint eval.select kept (sweeper.run.task)
BASELINE = "samples/baseline.png"
# what must be the same for the columns to compare LoRAs, not prompts or seeds
SAME_IN_EVERY_COLUMN = (
    "eval.prompts",
    "eval.test_seed",
    "eval.images_per_prompt",
    "eval.num_inference_steps",
    "eval.guidance_scale",
    "eval.sampler",
)
SHOWN_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3}


@dataclass
class Grid:
    caption: str
    data_uri: str | None = None
    width: int = 0  # px, as embedded
    missing: str | None = None  # why there is no image


@dataclass
class Commands:
    cwd: Path  # where the sweep was started: the default storage and MLflow store are under ./outputs
    resume: str  # the sweep command again
    reproduce_suffix: str = ""  # " --tracking-uri …" when the MLflow store is not ./outputs' default


def resume_command(config: Any, cwd: Path) -> str:
    """The sweep's own command line, rebuilt from Hydra's record of it (what the user typed, with any
    password already moved to the environment): running it again resumes the same study."""
    hydra_overrides = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.mode=")]
    arguments = ["-m", *config.hydra.overrides.task, *hydra_overrides]
    return f"cd {shlex.quote(str(cwd))} && {shlex.quote(sys.executable)} -m sweeper " + shlex.join(arguments)


def write_report(
    summary: SweepSummary, folder: Path, commands: Commands, tracking_uri: str | None, parent_run_id: str | None
) -> Path:
    """Build the page and write it to ``folder/report.html`` (a temporary name, then renamed)."""
    trials = _leaderboard_order(summary)
    grids, same = _grids(tracking_uri, trials, summary)
    page = _page(summary, trials, grids, same, sweep_figures(summary), commands, parent_run_id)
    return write_text_atomically(Path(folder).resolve() / REPORT_NAME, page)


def write_and_log_report(parent: Any, summary: SweepSummary, folder: Path, commands: Commands) -> Path:
    path = write_report(summary, folder, commands, parent.tracking_uri, parent.run_id)
    parent.log_artifact(path, "sweep")
    return path


# --- the trials and their grids


def _leaderboard_order(summary: SweepSummary) -> list[FrozenTrial]:
    """Finished trials best first (by the first objective; a pruned one by its last reported value),
    then running and waiting ones, then failed ones, each by number."""
    sign = -1.0 if summary.directions[0] == "maximize" else 1.0

    def key(trial: FrozenTrial) -> tuple:
        value = trial.values[0] if trial.values else None
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = trial.intermediate_values[trial.last_step]
        rank = STATE_ORDER.get(trial.state, 4)
        return (rank, sign * value if value is not None else 0.0, trial.number)

    return sorted(summary.trials(), key=key)


def _grids(
    tracking_uri: str | None, trials: list[FrozenTrial], summary: SweepSummary
) -> tuple[dict[Any, Grid], list[str]]:
    """Trial number -> its selected grid ("base" -> the base model's), and what the page may say
    about the columns' prompts and seeds (from each grid run's params)."""
    shown = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    grids: dict[Any, Grid] = {}
    if not shown:
        return grids, []
    if not tracking_uri:
        return {"none": Grid("", missing="tracking is off (tracking=none): the sample grids live only in MLflow")}, []
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(with_credentials(tracking_uri))
    eval_params: dict[int, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for trial in shown:
            run_id = trial.user_attrs.get("mlflow_run_id")
            caption = _caption(trial, summary)
            if not run_id:
                grids[trial.number] = Grid(caption, missing="no MLflow run recorded")
                continue
            try:
                run = client.get_run(run_id)
                # a setting trained on several seeds shows its representative seed's grid (sweeper.run.replicates)
                grid_run = run.data.tags.get("lora.representative_run_id") or run_id
                if grid_run != run_id:
                    run = client.get_run(grid_run)
                    caption += f" (seed {run.data.tags.get('replicate.seed', '?')}, nearest the setting's mean)"
                eval_params[trial.number] = {k: run.data.params.get(k, "") for k in SAME_IN_EVERY_COLUMN}
                local = client.download_artifacts(grid_run, GRID, f"{tmp}/{trial.number}")
                grids[trial.number] = Grid(caption, *_data_uri(Path(local)))
                if "base" not in grids:
                    base = client.download_artifacts(grid_run, BASELINE, f"{tmp}/base")
                    grids["base"] = Grid("base model (no LoRA)", *_data_uri(Path(base)))
            except (MlflowException, OSError) as error:  # a server down or an artifact missing: say so, go on
                grids[trial.number] = Grid(caption, missing=f"{type(error).__name__}: {str(error)[:300]}")
    return grids, _same_columns(eval_params)


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No tqdm bar per downloaded grid on the sweep's terminal."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _caption(trial: FrozenTrial, summary: SweepSummary) -> str:
    values = trial.values or []
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        values = [trial.intermediate_values[trial.last_step]]
    scores = ", ".join(f"{name}={value:.4g}" for name, value in zip(summary.objectives, values, strict=False))
    pruned = " (pruned)" if trial.state == TrialState.PRUNED else ""
    return f"trial {trial.number}: {describe_params(trial.params)}; {scores}{pruned}"


def _same_columns(eval_params: Mapping[int, Mapping[str, str]]) -> list[str]:
    """One sentence per eval setting: the same in every column, or which trials differ."""
    lines = []
    for key in SAME_IN_EVERY_COLUMN:
        values = {number: params.get(key, "") for number, params in eval_params.items()}
        distinct = set(values.values())
        if len(distinct) == 1:
            value = next(iter(distinct))
            lines.append(f"{key} = {value or '(default)'} in every column")
        elif distinct:
            by_value = "; ".join(
                f"{v or '(default)'}: trials {', '.join(str(n) for n, x in values.items() if x == v)}"
                for v in sorted(distinct)
            )
            lines.append(f"{key} DIFFERS between columns ({by_value})")
    return lines


def _data_uri(path: Path) -> tuple[str, int]:
    """The image at most GRID_MAX_WIDTH wide, as PNG or JPEG, whichever is smaller (labels stay
    sharp in PNG on small grids; photos are far smaller as JPEG)."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.width > GRID_MAX_WIDTH:
        image = image.resize((GRID_MAX_WIDTH, round(image.height * GRID_MAX_WIDTH / image.width)), Image.LANCZOS)
    encoded = {}
    for kind, options in (("png", {"optimize": True}), ("jpeg", {"quality": 85})):
        buffer = io.BytesIO()
        image.save(buffer, format=kind.upper(), **options)
        encoded[kind] = buffer.getvalue()
    kind = min(encoded, key=lambda k: len(encoded[k]))
    return f"data:image/{kind};base64," + base64.b64encode(encoded[kind]).decode("ascii"), image.width


# --- the page


def _page(
    summary: SweepSummary,
    trials: list[FrozenTrial],
    grids: dict[Any, Grid],
    same: list[str],
    figures: dict[str, Any],
    commands: Commands,
    parent_run_id: str | None,
) -> str:
    study = summary.study
    states = [t.state for t in trials]
    counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if states.count(s))
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(summary.objectives, summary.directions, strict=True))
    head = [
        ("study", study.study_name),
        ("objective", objectives),
        ("sampler", summary.sampler),
        ("trials", counts or "none"),
        ("storage", redact_password(summary.storage_url)),
        ("MLflow parent run", parent_run_id or "(tracking off)"),
        ("written", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
    ]
    parts = [
        f"<h1>Sweep report: {_e(study.study_name)}</h1>",
        "<table class=kv>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in head) + "</table>",
        _leaderboard(summary, trials),
        _grid_section(trials, grids, same),
        _plots(figures),
        _failed_and_pruned(summary, trials),
        _commands(summary, trials, commands),
    ]
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>Sweep report: {_e(study.study_name)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def _leaderboard(summary: SweepSummary, trials: list[FrozenTrial]) -> str:
    """The terminal table's rows (same values, same vs_best words), best first, and the verdict lines."""
    rows = {row["number"]: row for row in summary.rows(SHOWN_STATES)}  # the terminal table's; failed apart
    columns = ["number", "state", *summary.space.distributions, *summary.objectives, "interval", "seeds"]
    columns += ["vs_best", "p_vs_best", "mlflow_run_id"]
    best = {t.number for t in summary.best_trials()}
    body = []
    for trial in trials:
        if trial.number not in rows:
            continue
        row = rows[trial.number]
        mark = " class=best" if trial.number in best else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{_e(row.get(c, ''))}</td>" for c in columns) + "</tr>")
    label = "Pareto front" if summary.multi_objective else "best"
    verdict = summary.verdict() + summary.racing_lines()
    return (
        f"<h2>Leaderboard</h2><p>Best first by {_e(summary.objectives[0])} (the highlighted row"
        f"{'s are the ' if summary.multi_objective else ' is the '}{label}); the columns and words are the "
        "terminal summary's (<code>sweep/trials.csv</code>). An interval's label says what it is true of "
        "(README: How sure is the verdict?). Failed trials are listed <a href='#failed'>apart</a>.</p>"
        "<table><tr>"
        + "".join(f"<th>{_e(c)}</th>" for c in columns)
        + "</tr>"
        + "".join(body)
        + "</table>"
        + (f"<h3>Verdict</h3><pre>{_e(chr(10).join(verdict))}</pre>" if verdict else "")
    )


def _grid_section(trials: list[FrozenTrial], grids: dict[Any, Grid], same: list[str]) -> str:
    if not grids:
        return "<h2>Sample grids</h2><p>No trial finished, so there is no grid to show.</p>"
    if "none" in grids:
        return f"<h2>Sample grids</h2><p>{_e(grids['none'].missing)}</p>"
    order = ["base", *[t.number for t in trials if t.number in grids]]
    shown = min(GRID_SHOWN_WIDTH, max(g.width for g in grids.values()) or GRID_SHOWN_WIDTH)
    cells = []
    for key in order:
        if key not in grids:
            continue
        grid = grids[key]
        picture = (
            f"<img src='{grid.data_uri}' alt='{_e(grid.caption)}'>" if grid.data_uri else f"<p>{_e(grid.missing)}</p>"
        )
        cells.append(f"<figure style='width:{shown}px'>{picture}<figcaption>{_e(grid.caption)}</figcaption></figure>")
    return (
        "<h2>Sample grids</h2><p>Each trial's grid of the checkpoint it kept (<code>eval.select</code>; "
        f"<code>{GRID}</code> on its run), best first, the base model on the left. A row is one eval prompt "
        "(its label above the images), a column inside a grid one sampling seed: the same prompts and seeds in "
        "every grid, so differences are the LoRAs'.</p>"
        + ("<ul class=same>" + "".join(f"<li>{_e(line)}</li>" for line in same) + "</ul>" if same else "")
        + "<div class=grids>"
        + "".join(cells)
        + "</div>"
    )


def _plots(figures: dict[str, Any]) -> str:
    """Every figure as JSON in its own div, drawn by one copy of plotly.js unpacked in the browser."""
    if not figures:
        return "<h2>Optuna plots</h2><p>None could be computed for this study yet.</p>"
    from plotly.offline import get_plotlyjs

    packed = base64.b64encode(gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=6, mtime=0)).decode()
    divs = []
    for name, figure in figures.items():
        spec = figure.to_json().replace("</", "<\\/")  # no "</script>" inside the script element
        divs.append(
            f"<h3>{_e(name.replace('_', ' '))}</h3><div id='plot-{name}' class=plot></div>"
            f"<script type='application/json' class=figure data-target='plot-{name}'>{spec}</script>"
        )
    return (
        "<h2>Optuna plots</h2><p id=plots-note>Drawing the plots (plotly.js, unpacked in this browser)…</p>"
        + "".join(divs)
        + f"<script type='application/octet-stream' id=plotly-js-gzip>{packed}</script>"
        + f"<script>{LOADER}</script>"
    )


def _failed_and_pruned(summary: SweepSummary, trials: list[FrozenTrial]) -> str:
    reruns = {t.system_attrs.get("retry_history", [None])[-1]: t.number for t in trials}
    extended = {t.user_attrs.get("extends"): t.number for t in trials if "extends" in t.user_attrs}
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.FAIL:
            reason = trial.user_attrs.get("error") or "no reason recorded"
            if failure := trial.user_attrs.get("failure"):
                reason += f" (failure={failure})"
            after = f"re-run as trial {reruns[trial.number]}" if trial.number in reruns else "not re-run"
        elif trial.state == TrialState.PRUNED:
            step = trial.user_attrs.get("pruned_at_step", trial.last_step)
            seed = trial.user_attrs.get("pruned_at_replicate")
            reason = f"pruned at step {step}" + (f" of seed {int(seed) + 1}" if seed is not None else "")
            reason += f" by {type(summary.study.pruner).__name__}"
            after = "kept its best evaluated checkpoint"
        else:
            continue
        if previous := trial.user_attrs.get("previous_error"):
            reason += f"; its earlier attempt: {previous}"
        if trial.number in extended:
            after += f"; extended by trial {extended[trial.number]}"
        cells = [trial.number, trial.state.name, describe_params(trial.params), reason, after]
        cells.append(trial.user_attrs.get("mlflow_run_id", ""))
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return "<h2 id=failed>Failed and pruned trials</h2><p>None.</p>"
    header = "".join(f"<th>{c}</th>" for c in ("trial", "state", "params", "reason", "afterwards", "mlflow_run_id"))
    return f"<h2 id=failed>Failed and pruned trials</h2><table><tr>{header}</tr>{''.join(rows)}</table>"


def _commands(summary: SweepSummary, trials: list[FrozenTrial], commands: Commands) -> str:
    python = shlex.quote(sys.executable)
    lines = [
        f"# trial {t.number} ({describe_params(t.params)}): trains it again as a single run and compares\n"
        f"cd {shlex.quote(str(commands.cwd))} && {python} -m sweeper.reproduce "
        f"{t.user_attrs['mlflow_run_id']}{commands.reproduce_suffix}"
        for t in trials
        if t.user_attrs.get("mlflow_run_id")
    ]
    return (
        "<h2>Commands</h2><p>Resume or extend the sweep: the same command again continues the same study (a "
        "grid until every point has a result, TPE until <code>hydra.sweeper.n_trials</code> finished trials; "
        "raise it to extend):</p>"
        f"<pre class=cmd>{_e(commands.resume)}</pre>"
        "<p>Reproduce a trial from its MLflow record (README: Reproduce a run):</p>"
        f"<pre class=cmd>{_e(chr(10).join(lines) or '(no trial has an MLflow run)')}</pre>"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f2f2f2}tr.best td{background:#e8f5e9;font-weight:600}
table.kv th{width:11em}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap}
.grids{display:flex;gap:12px;overflow-x:auto;align-items:flex-start;padding-bottom:8px}
figure{margin:0;flex:0 0 auto}figure img{width:100%;height:auto;image-rendering:auto;
border:1px solid #ddd}figcaption{font-size:12px;margin-top:4px}.plot{width:100%;min-height:420px}
"""

# plotly.js arrives gzip-compressed: unpack it, run it once, then draw every figure
LOADER = """
(async () => {
  const note = document.getElementById('plots-note');
  try {
    if (!window.DecompressionStream) throw new Error('this browser has no DecompressionStream '
      + '(Chrome 80+, Firefox 113+, Safari 16.4+)');
    const packed = atob(document.getElementById('plotly-js-gzip').textContent.trim());
    const bytes = new Uint8Array(packed.length);
    for (let i = 0; i < packed.length; i++) bytes[i] = packed.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    const code = await new Response(stream).text();
    const script = document.createElement('script');
    script.textContent = code;
    document.head.appendChild(script);
    for (const spec of document.querySelectorAll('script.figure')) {
      const figure = JSON.parse(spec.textContent);
      Plotly.newPlot(spec.dataset.target, figure.data, figure.layout, {responsive: true, displaylogo: false});
    }
    note.remove();
  } catch (error) {
    note.textContent = 'The plots could not be drawn: ' + error;
  }
})();
"""
