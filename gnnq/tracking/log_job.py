"""``gnnq log``: send a finished job's output folder to an MLflow store.

A job writes its results to its output folder before it talks to the tracker, so a store
that was unreachable, or a job run with ``tracking=none``, loses nothing: this command logs
the folder afterwards as the job would have (the same tags, the validated config as params,
the final metrics, the summary, config and analysis files as artifacts, and each run's
per-epoch curves from its checkpoint). Into another store it copies a job, e.g. to build one
comparison from jobs that ran elsewhere. A folder already logged to the experiment is not
logged twice; one whose summary has changed since (a stopped job that was resumed and
finished) is logged again, and its earlier run is deleted (MLflow keeps deleted runs
restorable), so a report counts the job once, as it is now.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from gnnq.config import TrainConfig, validate
from gnnq.errors import GnnqError
from gnnq.tracking.mlflow_tracker import MlflowTracker

log = logging.getLogger(__name__)

#: Tag naming the folder a logged job came from (absolute path).
SOURCE_TAG = "gnnq.logged_from"
#: Tag holding the SHA-256 of the summary.json a run was logged from.
SUMMARY_TAG = "gnnq.summary_sha256"


def read_job(folder: Path) -> tuple[dict, TrainConfig]:
    """The job's ``summary.json`` and validated config, with a clear error if either is
    missing or unreadable."""
    summary_path, config_path = folder / "summary.json", folder / ".hydra" / "config.yaml"
    for path in (summary_path, config_path):
        if not path.is_file():
            raise GnnqError(f"{folder} is not a finished gnnq job's output folder: {path.name} "
                            f"is missing (a job writes summary.json and .hydra/config.yaml "
                            f"when it ends). Pass the folder that holds them.")
    try:
        summary = json.loads(summary_path.read_text())
        metrics = summary["metrics"]
    except (ValueError, KeyError, TypeError) as err:
        raise GnnqError(f"{summary_path} is corrupt ({type(err).__name__}: {err}); it cannot be "
                        f"logged. Rerun the job, or restore the file.") from None
    if not metrics.get("runs_completed"):
        raise GnnqError(f"{folder} holds no finished run (runs_completed is 0); nothing to log.")
    return summary, validate(OmegaConf.load(config_path))


def logged_run(tracker: MlflowTracker, folder: Path):
    """The run of the tracker's experiment already logged from ``folder`` (None if none)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id()], f"tags.`{SOURCE_TAG}` = '{folder}'", max_results=1)
    return runs[0] if runs else None


def _is_current(run, digest: str, summary: dict) -> bool:
    """Whether ``run`` was logged from the summary as it is now (runs logged before the
    digest tag existed: the same number of finished runs and the same status)."""
    logged = run.data.tags.get(SUMMARY_TAG)
    if logged is not None:
        return logged == digest
    status = "FINISHED" if summary.get("error") is None else "FAILED"
    return (run.info.status == status and run.data.metrics.get("runs_completed")
            == summary["metrics"]["runs_completed"])


def log_job(folder: Path, uri: Optional[str] = None, experiment: Optional[str] = None,
            run_name: Optional[str] = None) -> tuple[str, Optional[str], bool]:
    """Log the finished job in ``folder`` (to the store, experiment and run name its config
    names unless given). Returns ``(run id, replaced run id, logged now)``: ``logged now`` is
    False when the experiment already held a run of the folder as it is; a run logged from
    it before it changed is deleted and returned as the replaced one."""
    from gnnq.train.experiment import default_run_name, finish_tracking, start_tracking

    folder = Path(folder).resolve()
    summary, config = read_job(folder)
    tracking = replace(config.tracking, backend="mlflow",
                       uri=uri or config.tracking.uri,
                       experiment=experiment or config.tracking.experiment,
                       run_name=run_name or config.tracking.run_name)
    config = replace(config, tracking=tracking)
    tracker = MlflowTracker(tracking)
    digest = hashlib.sha256((folder / "summary.json").read_bytes()).hexdigest()
    existing = logged_run(tracker, folder)
    if existing is not None and _is_current(existing, digest, summary):
        return existing.info.run_id, None, False
    start_tracking(tracker, config, tracking.run_name or default_run_name(config),
                   extra_tags={SOURCE_TAG: str(folder), SUMMARY_TAG: digest})
    _log_curves(tracker, folder / "checkpoints")
    analysis = sorted(p for p in (folder / "analysis").glob("*") if p.is_file())
    status = "FINISHED" if summary.get("error") is None else "FAILED"
    run_id = finish_tracking(tracker, folder, summary["metrics"], status, config, analysis)
    if run_id is None:
        raise GnnqError(f"Logging {folder} to {tracking.uri} failed (the reason is logged "
                        f"above); the folder is unchanged, so the command can be repeated.")
    if existing is not None:
        tracker.client.delete_run(existing.info.run_id)
        return run_id, existing.info.run_id, True
    return run_id, None, True


def _log_curves(tracker: MlflowTracker, checkpoints: Path) -> None:
    """Every epoch's metrics of each run, as the live run logged them, from the checkpoints
    that keep them (those written before gnnq kept histories have none; skipped)."""
    from gnnq.export import load_checkpoint
    from gnnq.train.experiment import epoch_metric_key
    from gnnq.train.snapshot import finished_checkpoints

    for path in finished_checkpoints(checkpoints):
        try:
            saved = load_checkpoint(path)
        except GnnqError as err:  # the curves are optional, the job is not
            log.warning("No per-epoch curves: %s", err)
            continue
        run, metric = saved["result"]["run"], saved["task"]["metric"]
        for epoch, metrics in saved.get("history", []):
            tracker.log_metrics({epoch_metric_key(run, k, metric): v
                                 for k, v in metrics.items()}, step=epoch)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gnnq log", description="Log finished gnnq jobs' output folders (summary.json, "
        ".hydra/config.yaml) to an MLflow store: after a tracking outage, after tracking=none, "
        "or to gather jobs into one store.")
    parser.add_argument("folders", nargs="+", type=Path, help="a job's output folder")
    parser.add_argument("--uri", help="MLflow tracking URI (default: the job's tracking.uri)")
    parser.add_argument("--experiment",
                        help="MLflow experiment (default: the job's tracking.experiment)")
    parser.add_argument("--run-name", help="run name (default: the job's tracking.run_name, "
                        "else model-dataset-method)")
    options = parser.parse_args(args)
    for folder in options.folders:
        run_id, replaced, logged = log_job(folder, options.uri, options.experiment,
                                           options.run_name)
        note = ("" if logged and replaced is None
                else f" (replaces run {replaced}, logged before the job changed; deleted)"
                if logged else " (already logged there; nothing sent)")
        print(f"gnnq: {folder} -> MLflow run {run_id}{note}")
    return 0
