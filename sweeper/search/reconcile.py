"""A trial whose worker died leaves its MLflow run RUNNING; the worker that finds the dead trial closes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweeper.tracking.credentials import redact_password
from sweeper.tracking.tracker import default_tracking_uri


def close_trial_runs(tracking_cfg: Any, outputs: Path, study_name: str, trial_number: int, reason: str) -> int:
    """Mark the trial's RUNNING MLflow runs KILLED with ``reason``; returns how many.

    Best effort: a tracking problem is printed, never raised (it must not stop the sweep).
    """
    if not tracking_cfg.enabled:
        return 0
    try:
        from mlflow.tracking import MlflowClient

        from sweeper.tracking.credentials import with_credentials
        from sweeper.tracking.store import mark_killed

        client = MlflowClient(tracking_uri=with_credentials(tracking_cfg.uri or default_tracking_uri(outputs)))
        experiment = client.get_experiment_by_name(tracking_cfg.experiment)
        if experiment is None:
            return 0
        query = (
            f"tags.`sweep.study_name` = '{study_name}' and tags.`sweep.trial_number` = '{trial_number}' "
            "and attributes.status = 'RUNNING'"
        )
        runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=100)
        for run in runs:
            mark_killed(client, run.info.run_id, reason)
        return len(runs)
    except Exception as error:  # the tracking server is down, or the store unreadable
        print(f"warning: could not close the MLflow run of trial {trial_number}: {redact_password(str(error))}")
        return 0
