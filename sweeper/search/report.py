"""What a sweep leaves behind: the terminal summary and the parent MLflow run's results."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.search.settings_verdict import (
    CELLS_ATTR,
    EXTENDS_ATTR,
    INTERVAL_ATTR,
    Wording,
    current_settings,
    racing_cost,
    word,
)
from sweeper.search.space import SearchSpace, describe_params, display_value, format_value
from sweeper.tracking.credentials import redact_password


@dataclass
class SweepSummary:
    study: optuna.Study
    space: SearchSpace
    objectives: list[str]
    directions: list[str]
    sampler: str
    storage_url: str
    racing_seeds: int = 0  # with hydra.sweeper.racing: the most seeds a setting gets
    grid_size: int = 0

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def trials(self) -> list[FrozenTrial]:
        return sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)

    def best_trials(self) -> list[FrozenTrial]:
        """The best trial, or the Pareto front of a multi-objective study; none before a trial completes."""
        if not any(t.state == TrialState.COMPLETE for t in self.study.get_trials(deepcopy=False)):
            return []
        if self.multi_objective:
            return list(self.study.best_trials)
        return [self.current_best() or self.study.best_trial]

    def parent_params(self) -> dict[str, str]:
        """What identifies the study (fixed for its lifetime, so MLflow params)."""
        params = {
            "sweep.study_name": self.study.study_name,
            "sweep.objective": ",".join(self.objectives),
            "sweep.direction": ",".join(self.directions),
            "sweep.fixed_overrides": " ".join(self.space.fixed),
        }
        for key, distribution in self.space.distributions.items():
            params[f"sweep.space.{key}"] = _describe(distribution)
        for key, (parent, table) in self.space.conditional.items():
            branches = "; ".join(f"{parent}={value}: {_describe(d)}" for value, d in table.items())
            params[f"sweep.space.{key}"] = f"by {parent}: {branches}"[:500]  # MLflow caps a param at 6000 chars
        return params

    def parent_tags(self, options: Any) -> dict[str, str]:
        """How this invocation searches (may change when the sweep is resumed, so MLflow tags)."""
        tags = {
            "sweep.sampler": self.sampler,
            "sweep.seed": str(options.seed),
            "sweep.pruner": options.pruner,
            "sweep.storage": redact_password(self.storage_url),
        }
        if self.sampler != "grid":
            tags["sweep.n_trials"] = str(options.n_trials)
        return tags

    def wording(self) -> Wording:
        """What may be said about the settings (``sweeper.search.settings_verdict``); single objective only."""
        if self.multi_objective:
            return Wording([], {}, {})
        return word(self.trials(), self.objectives[0], self.directions[0] == "maximize")

    def verdict(self) -> list[str]:
        return self.wording().lines

    def current_best(self) -> FrozenTrial | None:
        """The best setting by its mean over its seeds, among each setting's latest trial (racing
        extends settings; an extended trial's smaller-sample mean does not compete)."""
        settings = current_settings(self.trials())
        if not settings or self.multi_objective:
            return None
        pick = max if self.directions[0] == "maximize" else min
        return pick(settings.values(), key=lambda t: t.values[0])

    def racing_lines(self) -> list[str]:
        """What racing saved against training every setting on every seed."""
        if not self.racing_seeds:
            return []
        trained, full = racing_cost(self.trials(), self.grid_size, self.racing_seeds)
        return [
            f"Racing trained {trained} seed-runs of the {full} that {self.racing_seeds} seeds for each of "
            f"{self.grid_size} settings take ({1 - trained / full:.0%} saved)."
        ]

    def rows(self, states: tuple[TrialState, ...] | None = None) -> list[dict[str, Any]]:
        """One row per trial (of ``states``): params to 4 significant digits; a pruned trial's value is
        its last intermediate one, marked with the step it was pruned at (and the seed, with replicates)."""
        wording = self.wording()
        best_numbers = {t.number for t in self.best_trials()}
        extended = {t.user_attrs.get(EXTENDS_ATTR): t.number for t in self.trials() if EXTENDS_ATTR in t.user_attrs}
        rows = []
        for trial in self.trials():
            if states is not None and trial.state not in states:
                continue
            values = trial.values or ([trial.value] if trial.value is not None else [])
            state, mark = trial.state.name, ""
            if trial.state == TrialState.PRUNED and trial.intermediate_values:
                step = int(trial.user_attrs.get("pruned_at_step", trial.last_step))
                replicate = trial.user_attrs.get("pruned_at_replicate")
                where = f"step {step}" + (f" of seed {int(replicate) + 1}" if replicate is not None else "")
                values, mark = [trial.intermediate_values[trial.last_step]], f" (pruned at {where})"
                state = f"PRUNED@{step}"
            if "duplicate_of" in trial.user_attrs:
                state += f" (=trial {trial.user_attrs['duplicate_of']})"
            if trial.number in extended:
                state += f" (extended by trial {extended[trial.number]})"
            row = {"number": trial.number, "state": state}
            row.update({key: display_value(value) for key, value in trial.params.items()})
            for name, value in zip(self.objectives, values, strict=False):
                row[name] = f"{value:.4f}{mark}"
            seeds = trial.user_attrs.get(CELLS_ATTR)
            if seeds:
                row["seeds"] = str(len(seeds))
            if INTERVAL_ATTR in trial.user_attrs:
                low, high, label = trial.user_attrs[INTERVAL_ATTR]
                row["interval"] = f"{low:.4g} to {high:.4g} [{label}]"
            if trial.number in wording.standing:
                row["vs_best"] = wording.standing[trial.number]
                if trial.number in wording.adjusted_p:
                    row["p_vs_best"] = f"{wording.adjusted_p[trial.number]:.3g}"
            elif trial.number in best_numbers and not wording.standing:
                row["vs_best"] = "best"
            row["mlflow_run_id"] = trial.user_attrs.get("mlflow_run_id", "")
            row["error"] = trial.user_attrs.get("error", "")
            rows.append(row)
        return rows

    def csv_text(self) -> str:
        rows = self.rows()
        columns = ["number", "state", *self.space.keys, *self.objectives, "interval", "seeds", "vs_best"]
        columns.append("p_vs_best")
        columns += ["mlflow_run_id", "error"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


def print_summary(summary: SweepSummary) -> None:
    """A table of the study's trials and the best one(s); failed trials listed apart, with their reasons
    and whether they were re-run (a killed trial's re-run is another trial with the same params)."""
    shown = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    rows = summary.rows(shown)
    columns = ["number", "state", *summary.space.keys, *summary.objectives, "interval", "seeds", "vs_best"]
    columns.append("p_vs_best")
    columns.append("mlflow_run_id")
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    failed = [t for t in summary.trials() if t.state == TrialState.FAIL]
    print(f"\nStudy '{summary.study.study_name}': {len(rows)} trial(s)" + (f", {len(failed)} failed" if failed else ""))
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
    if failed:
        reruns = {t.system_attrs.get("retry_history", [None])[-1]: t.number for t in summary.trials()}
        print("Failed:")
        for trial in failed:
            again = f"; re-run as trial {reruns[trial.number]}" if trial.number in reruns else ""
            reason = trial.user_attrs.get("error", "no reason recorded")
            print(f"  trial {trial.number} {describe_params(trial.params)}: {reason}{again}")
    best = summary.best_trials()
    label = "Pareto front" if summary.multi_objective else "Best"
    for trial in best:
        values = ", ".join(f"{n}={v:.4f}" for n, v in zip(summary.objectives, trial.values, strict=True))
        params = describe_params(trial.params)
        print(f"{label}: trial {trial.number} ({values}) {params} run {trial.user_attrs.get('mlflow_run_id', '-')}")
    for line in summary.verdict() + summary.racing_lines():
        print(line)
    if not best:
        print("No trial completed.")


def log_parent_results(parent: Any, summary: SweepSummary) -> None:
    """Best trial(s) and the table of all trials on the sweep's parent run (the plots are in the report)."""
    parent.log_text(summary.csv_text(), "sweep/trials.csv")
    best = summary.best_trials()
    payload = [
        {
            "number": t.number,
            "values": dict(zip(summary.objectives, t.values, strict=True)),
            "params": t.params,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        }
        for t in best
    ]
    parent.log_text(json.dumps(payload, indent=2, default=str), "sweep/best_trials.json")
    if verdict := summary.verdict() + summary.racing_lines():
        parent.log_text("\n".join(verdict) + "\n", "sweep/verdict.txt")
        parent.set_tags({"best.verdict": "\n".join(verdict)[:5000]})
    if summary.racing_seeds:
        trained, full = racing_cost(summary.trials(), summary.grid_size, summary.racing_seeds)
        parent.log_metrics({"racing/seed_runs": float(trained), "racing/full_seed_runs": float(full)})
    if best and not summary.multi_objective:
        top = best[0]
        parent.set_tags(
            {
                "best.trial_number": top.number,
                "best.mlflow_run_id": top.user_attrs.get("mlflow_run_id", ""),
                **{f"best.param.{k}": format_value(v) for k, v in top.params.items()},
            }
        )
        parent.log_metrics({f"best/{summary.objectives[0]}": top.values[0]})
    elif best:
        parent.set_tags({"pareto.trial_numbers": ",".join(str(t.number) for t in best)})
        _log_front_grids(parent, best)
    states = [t.state for t in summary.trials()]
    parent.log_metrics({f"trials/{s.name.lower()}": float(states.count(s)) for s in TrialState})


def sweep_figures(summary: SweepSummary) -> dict[str, Any]:
    """Optuna's plots (plotly figures) by name, each only when it can be computed for this study; the
    report (``sweeper.search.report_html``) draws them all with one copy of plotly.js."""
    from optuna import visualization as vis
    from optuna.importance import PedAnovaImportanceEvaluator

    study = summary.study
    first = (lambda t: t.values[0]) if summary.multi_objective else None
    name = summary.objectives[0]
    plots = {
        "optimization_history": lambda: vis.plot_optimization_history(study, target=first, target_name=name),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study, target=first, target_name=name),
        "param_importances": lambda: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target=first, target_name=name
        ),
    }
    if summary.multi_objective:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=summary.objectives)
    figures = {}
    for plot_name, make in plots.items():
        try:
            figures[plot_name] = make()
        except (ValueError, RuntimeError, ZeroDivisionError, ImportError) as error:
            print(f"(plot {plot_name} skipped: {error})")
    return figures


def _log_front_grids(parent: Any, front: list[FrozenTrial]) -> None:
    """Each Pareto-front member's final sample grid, copied from its trial run to ``sweep/pareto/``."""
    if not parent.run_id or not parent.tracking_uri:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for trial in front:
            run_id = trial.user_attrs.get("mlflow_run_id")
            grids = {a.path for a in client.list_artifacts(run_id, "samples")} if run_id else set()
            if "samples/selected.png" not in grids:
                continue
            local = Path(client.download_artifacts(run_id, "samples/selected.png", tmp))
            target = local.with_name(f"trial_{trial.number}.png")
            local.rename(target)
            parent.log_artifact(target, "sweep/pareto")


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "choice(" + ", ".join(format_value(c) for c in distribution.choices) + ")"
    kind = "int" if isinstance(distribution, optuna.distributions.IntDistribution) else "float"
    scale = ", log" if distribution.log else ""
    step = f", step={distribution.step}" if distribution.step is not None and distribution.step != 1 else ""
    return f"{kind}[{distribution.low}, {distribution.high}{step}{scale}]"
