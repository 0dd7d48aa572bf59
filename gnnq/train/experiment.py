"""One job of ``gnnq train``: load, build, fit every run, summarise, track.

The flow is the architecture's chain, one call per arrow: validated config → task →
quantizer factory → trainer (per run) → summary → tracker. Finished runs are never lost:
each run's checkpoint is written as soon as it ends, and the summary (of the runs that
finished) is written to the output folder before anything is sent to the tracker. With
``resume=true`` a job continues in its folder: checkpointed runs are taken as they are, an
interrupted run continues from its snapshot (:mod:`gnnq.train.snapshot`).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from gnnq import __version__
from gnnq.config import TrainConfig
from gnnq.data import load_task
from gnnq.errors import GnnqError, load_failure
from gnnq.models import build_model
from gnnq.quant import build_quantizers
from gnnq.tracking.mlflow_tracker import Tracker, flatten, make_tracker
from gnnq.train import snapshot
from gnnq.train.metrics import mean_std
from gnnq.train.trainer import RunResult, Trainer, TrainingDiverged

log = logging.getLogger(__name__)

FINAL_KEYS = ("val", "test", "best_test")


def summarise(results: list[RunResult], metric: str) -> dict[str, float]:
    """Final metrics: mean (and ``_std``) over runs of each selection rule, bits, compression."""
    summary: dict[str, float] = {}
    for key in FINAL_KEYS:
        mean, std = mean_std(getattr(r, key) for r in results)
        summary[f"{key}_{metric}"], summary[f"{key}_{metric}_std"] = mean, std
    summary["avg_bits"], summary["avg_bits_std"] = mean_std(r.avg_bits for r in results)
    summary["compression_ratio"], _ = mean_std(r.compression_ratio for r in results)
    summary["runs_completed"] = float(len(results))
    return summary


def default_run_name(config: TrainConfig, job_overrides: str = "") -> str:
    method = (config.quant or {}).get("name", "fp32")
    name = f"{config.model.name}-{config.dataset.name}-{method}"
    return f"{name} [{job_overrides}]" if job_overrides else name


def run_experiment(config: TrainConfig, output_dir: Path, parent_run_id: Optional[str] = None,
                   job_overrides: str = "") -> dict[str, Any]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    quantizers = build_quantizers(config.quant)  # a bad option fails before the data loads
    tracker = make_tracker(config.tracking)  # fails fast on an unreachable store
    task = load_task(config.data, config.dataset)
    metric = task.metric

    start_tracking(tracker, config, config.tracking.run_name
                   or default_run_name(config, job_overrides), parent_run_id)

    def on_epoch(run: int, epoch: int, scores: dict[str, float]) -> None:
        tracker.log_metrics({epoch_metric_key(run, k, metric): v for k, v in scores.items()},
                            step=epoch)

    checkpoints = output_dir / "checkpoints"
    trainer = Trainer(config, task, quantizers, on_epoch=on_epoch, snapshots=checkpoints)
    results: list[RunResult] = []
    started = time.time()
    status, error = "FINISHED", None
    try:
        for run in range(config.first_run, config.first_run + config.runs):
            result = _finished_run(checkpoints, config, run) if config.resume else None
            if result is not None:
                for epoch, metrics in result.history:
                    on_epoch(run, epoch, metrics)
                log.info("run %d finished before (%s): taken as it is", run,
                         checkpoints / f"run{run}.pt")
            else:
                result = trainer.fit(run)
                if config.trainer.checkpoint:
                    _save_checkpoint(output_dir, config, task, result)
                snapshot.snapshot_path(checkpoints, run).unlink(missing_ok=True)
            results.append(result)
            log.info("run %d (seed %d%s): val %.2f test %.2f best test %.2f at epoch %d, "
                     "avg bits %.2f", run, result.seed,
                     "" if result.fold is None else f", fold {result.fold}", result.val,
                     result.test, result.best_test, result.best_epoch, result.avg_bits)
    except GnnqError as err:
        status, error = "FAILED", err
    except KeyboardInterrupt as err:  # Ctrl-C: keep the finished runs, close the MLflow run
        status, error = "KILLED", err
    summary = _write_summary(output_dir, config, task, results, metric, time.time() - started,
                             error)
    analysis = _method_artifacts(quantizers, config, task, results, output_dir)
    summary["mlflow_run_id"] = finish_tracking(tracker, output_dir, summary["metrics"], status,
                                               config, analysis)
    if error is not None:
        raise error
    return summary


def epoch_metric_key(run: int, key: str, metric: str) -> str:
    """The tracker's name of an epoch's value: ``run<r>.`` and, for split scores, the task
    metric (``run0.val_acc``, ``run3.test_mae``); losses and diagnostics keep their names."""
    return f"run{run}." + (f"{key}_{metric}" if key in ("train", "val", "test") else key)


def start_tracking(tracker: Tracker, config: TrainConfig, run_name: str,
                   parent_run_id: Optional[str] = None,
                   extra_tags: Optional[dict[str, str]] = None) -> None:
    """Open the job's run: its tags (dataset, model, method, version, ``config.tags``) and the
    validated config as params."""
    tags = {"gnnq.version": __version__, "dataset": config.dataset.name,
            "model": config.model.name, "method": (config.quant or {}).get("name", "fp32"),
            **{str(k): str(v) for k, v in config.tags.items()}, **(extra_tags or {})}
    tracker.start(run_name, tags=tags, parent_run_id=parent_run_id)
    tracker.log_params(flatten(OmegaConf.to_container(OmegaConf.structured(config))))


def _save_checkpoint(output_dir: Path, config: TrainConfig, task, result: RunResult) -> None:
    folder = output_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    torch.save({"state_dict": result.state_dict, "result": result.record(),
                "history": result.history,
                "config": OmegaConf.to_container(OmegaConf.structured(config)),
                "task": {"name": task.name, "level": task.level, "num_features": task.num_features,
                         "num_classes": task.num_classes, "metric": task.metric}},
               folder / f"run{result.run}.pt")


def _finished_run(folder: Path, config: TrainConfig, run: int) -> Optional[RunResult]:
    """Run ``run`` as its checkpoint keeps it (None if it has none), made under the same
    settings (else a clean error)."""
    path = folder / f"run{run}.pt"
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        snapshot.check_same_training(snapshot.training_settings(saved["config"]), config, path)
        return RunResult(**saved["result"], state_dict=saved["state_dict"],
                         history=saved.get("history", []))
    except GnnqError:
        raise
    except Exception as err:  # noqa: BLE001 - pickle/zip errors, missing keys
        raise GnnqError(f"resume=true cannot read the finished run {path} (a damaged file; "
                        f"{load_failure(err)}). Delete it to train run {run} again.") from None


def _write_summary(output_dir: Path, config: TrainConfig, task, results: list[RunResult],
                   metric: str, seconds: float, error: Optional[Exception]) -> dict[str, Any]:
    metrics = summarise(results, metric) if results else {"runs_completed": 0.0}
    summary = {
        "metrics": metrics,
        "runs": [r.record() for r in results],
        "runs_requested": config.runs,
        "dataset": task.name, "model": config.model.name,
        "method": (config.quant or {}).get("name", "fp32"),
        "seconds": round(seconds, 2),
        "error": None if error is None else (str(error) or type(error).__name__),
        # the diverged run, epoch and last finished epoch's metrics (e.g. SMP's multiplier)
        "diverged": error.record() if isinstance(error, TrainingDiverged) else None,
        # threads too: CPU float sums, and so the trained models, depend on the thread count
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "threads": torch.get_num_threads()},
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _method_artifacts(quantizers, config: TrainConfig, task, results: list[RunResult],
                      output_dir: Path) -> list[Path]:
    """Files the quantization method writes about the selected model of the last run (its
    factory's optional ``artifacts(model, task, folder)``, e.g. A²Q's bit analysis), in
    ``analysis/``. A failure here is logged, never fatal: the runs are already saved."""
    write = getattr(quantizers, "artifacts", None)
    if write is None or not results:
        return []
    try:
        model = build_model(config.model, task, quantizers)
        model.load_state_dict(results[-1].state_dict)
        return write(model, task, output_dir / "analysis")
    except Exception as err:  # noqa: BLE001 - an analysis bug must not cost the finished runs
        log.error("The method's analysis artifacts failed (%s: %s); results are unaffected.",
                  type(err).__name__, err)
        return []


def finish_tracking(tracker: Tracker, output_dir: Path, metrics: dict[str, float],
                    status: str, config: TrainConfig, analysis: list[Path]) -> Optional[str]:
    """Send final metrics and artifacts; a tracking failure here loses nothing on disk.

    Returns the MLflow run id (``None`` without tracking or when tracking failed)."""
    try:
        tracker.log_metrics(metrics)
        for name, folder in (("summary.json", None), (".hydra/config.yaml", "config"),
                             (".hydra/overrides.yaml", "config")):
            tracker.log_artifact(output_dir / name, folder)
        for path in analysis:
            tracker.log_artifact(path, "analysis")
        if config.tracking.log_checkpoint:
            tracker.log_artifact(output_dir / "checkpoints", "checkpoints")
        tracker.end(status)
        return tracker.run_id
    except Exception as err:  # noqa: BLE001 - never lose finished work to a tracking failure
        log.error("Tracking failed (%s: %s). Every result is kept in %s (summary.json, "
                  "checkpoints/); once the store works, send them with: gnnq log %s",
                  type(err).__name__, err, output_dir, output_dir)
        return None
