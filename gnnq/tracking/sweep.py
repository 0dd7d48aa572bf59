"""A Hydra multirun is one MLflow parent run with one child run per job.

:class:`SweepCallback` runs in the launching process: it opens the parent run before the
first job and writes its id into the sweep folder, where every job (in this process or in
a joblib/SLURM worker) finds it; after the last job it closes the parent with a summary.
Jobs that failed leave a ``FAILED`` file in their output folder; the callback counts them so
the ``gnnq`` command can exit non-zero while keeping every finished job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gnnq.config import TrackingConfig
from gnnq.errors import GnnqError
from gnnq.tracking.mlflow_tracker import PARENT_RUN_FILE, MlflowTracker, flatten

log = logging.getLogger(__name__)

FAILED_MARKER = "FAILED"

#: Failed jobs of the sweeps finished in this process (read by the CLI for its exit code).
failed_jobs: list[str] = []


def parent_run_id_for(job_output_dir: Path) -> Optional[str]:
    marker = Path(job_output_dir).parent / PARENT_RUN_FILE
    return marker.read_text().strip() if marker.exists() else None


def _tracking_config(config: DictConfig) -> Optional[TrackingConfig]:
    tracking = OmegaConf.to_container(config.get("tracking", {}), resolve=True) or {}
    cfg = TrackingConfig(**tracking)
    return cfg if cfg.backend == "mlflow" else None


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.tracker: Optional[MlflowTracker] = None
        self.sweep_dir: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            tracking = _tracking_config(config)
        except (TypeError, GnnqError):
            return  # the jobs will report the bad tracking config themselves
        if tracking is None:
            return
        try:
            self.tracker = MlflowTracker(tracking)
        except GnnqError as err:
            log.error("%s", err)
            return
        overrides = list(config.hydra.overrides.task)
        name = tracking.run_name or f"sweep {config.get('task_name', 'train')}: " + " ".join(overrides)
        self.tracker.start(name[:250], tags={"gnnq.kind": "sweep"}, parent_run_id=None)
        params = config.hydra.sweeper.get("params")
        self.tracker.log_params({
            "sweep.overrides": " ".join(overrides), "sweep.dir": str(self.sweep_dir),
            **(flatten(OmegaConf.to_container(params), "sweep.params") if params else {})})
        (self.sweep_dir / PARENT_RUN_FILE).write_text(self.tracker.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = sorted(str(p.parent) for p in self.sweep_dir.glob(f"*/{FAILED_MARKER}")) \
            if self.sweep_dir else []
        failed_jobs.extend(failed)
        if self.tracker is None:
            return
        jobs = [p for p in self.sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
        self.tracker.log_metrics({"jobs": len(jobs), "failed_jobs": len(failed)})
        self.tracker.end("FAILED" if failed else "FINISHED")
