"""The `gnnq` command end to end: help, composition, a real run, and every kind of bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from gnnq.errors import GnnqError

from conftest import GNNQ, assert_clean_error, free_port, requires_shared_data, run_gnnq

FAST = ["trainer.epochs=5", "trainer.progress=none"]


def test_help_lists_subcommands(tmp_path):
    proc = run_gnnq("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "train" in proc.stdout


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`gnnq --help | head -1`: the pipe's reader is gone before gnnq writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed_pipe:
        proc = subprocess.run([*GNNQ, "--help"], cwd=tmp_path, stdout=closed_pipe,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.stderr == ""
    assert proc.returncode == 128 + 13


def test_unknown_subcommand(tmp_path):
    assert_clean_error(run_gnnq("trian", cwd=tmp_path), "Unknown command 'trian'", "train")


def test_train_help_and_cfg(tmp_path):
    proc = run_gnnq("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "dataset" in proc.stdout
    proc = run_gnnq("train", "--cfg", "job", "dataset=citeseer", "model=gat", cwd=tmp_path)
    assert proc.returncode == 0
    assert "name: citeseer" in proc.stdout and "heads: 8" in proc.stdout


@pytest.mark.parametrize("override, fragments", [
    ("dataset=imagenet", ["Unknown dataset 'imagenet'", "cora", "reddit_binary"]),
    ("model=transformer", ["Unknown model 'transformer'", "gcn", "gat"]),
    ("+quant=a2qq", ["Unknown quantizer 'a2qq'", "a2q, degree_quant, smoothness"]),
    ("dataset=cora,imagenet", ["Unknown dataset 'imagenet'", "citeseer"]),
    ("+experiment=a2q_gcn_corra", ["Unknown experiment preset 'a2q_gcn_corra'", "a2q_gcn_cora"]),
    ("trainer.epochs=many", ["trainer.epochs", "many"]),
    ("model.dropout=1.5", ["model.dropout", "1.5", "<= 1.0"]),
    ("runs=0", ["runs", ">= 1"]),
    ("seed=-5", ["seed: -5", ">= 0"]),
    ("seed=4294967295 runs=2", ["seed: 4294967295", "<= 4294967294"]),  # NumPy's 32-bit seeds
    ("dataset.split_seed=-1", ["dataset.split_seed: -1", ">= 0"]),
    ("trainer.scheduler.name=linear", ["linear", "cosine", "plateau"]),
    ("+model.widht=3", ["model.widht", "hidden", "dropout"]),
    ("model.widht=3", ["model.widht", "hidden", "dropout"]),
    ("seeds=3", ["seeds", "seed", "runs", "dataset"]),
    ("trainer.scheduler.gama=3", ["trainer.scheduler.gama", "gamma", "step_size"]),
    ("model=smp model.multiplier_bound=-1", ["model.multiplier_bound", "-1", ">= 0"]),
    ("trainer.select_max_bits=2.5", ["trainer.select_max_bits=2.5", "FP32", "+quant=a2q"]),
    ("+quant=a2q trainer.select_max_bits=0.5", ["trainer.select_max_bits", "0.5", ">= 1"]),
    # An option of another choice of the group than the selected one.
    ("model.steps=3", ["'model.steps'", "model=gcn", "model=smp", "hidden, layers"]),
    ("+experiment=fp32_gin_reddit_binary model=gcn model.steps=3",
     ["'model.steps'", "model=gcn or model=gin", "model=smp", "train_eps"]),
    ("dataset=reddit_binary dataset.split=random",
     ["'dataset.split'", "dataset=reddit_binary", "dataset=cora", "folds"]),
    ("quant.bits=4", ["'quant.bits'", "none is selected", "+quant=<a2q|degree_quant|smoothness>"]),
    ("+quant=a2q quant.foo=1", ["'quant.foo'", "no quantizer has it", "bit_budget, init_bits"]),
    ("+quant=smoothness quant.bit_budget=2", ["'quant.bit_budget'", "+quant=a2q quant.bit_budget"]),
    # A method's own checks run before the data loads (here: there is none, offline).
    ("+quant=degree_quant quant.bits=3 data.download=never", ["quant.bits: 3", "4, 8"]),
])
def test_bad_config_values(tmp_path, override, fragments):
    proc = run_gnnq("train", *override.split(), "tracking=none", f"hydra.run.dir={tmp_path}/out",
                    cwd=tmp_path)
    assert_clean_error(proc, *fragments)
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "search path" not in proc.stderr


@pytest.mark.parametrize("overrides, expected", [
    (["model=smp", "model.steps=3"], ["steps: 3"]),
    (["+experiment=smooth_smp_cora_int4", "model.steps=3"], ["steps: 3"]),
    # Planetoid's random split and feature normalisation are options of the default cora.
    (["dataset.split=random", "dataset.train_per_class=10", "dataset.normalize_features=true"],
     ["train_per_class: 10", "normalize_features: true"]),
    (["+experiment=a2q_gat_cora", "dataset.normalize_features=true"], ["normalize_features: true"]),
    (["dataset='citeseer'", "model=\"gat\""], ["name: citeseer", "heads: 8"]),  # quoted choices
])
def test_options_of_the_selected_choice_pass(tmp_path, overrides, expected):
    proc = run_gnnq("train", "--cfg", "job", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(fragment in proc.stdout for fragment in expected), proc.stdout


def test_sweep_lists_are_left_to_hydra():
    from gnnq.cli import config_dir
    from gnnq.config import check_override_keys

    check_override_keys(["model=gcn,smp", "model.steps=3"], config_dir())
    with pytest.raises(GnnqError, match="model=gcn"):
        check_override_keys(["model=gcn", "model.steps=3"], config_dir())


def test_multirun_with_cfg_is_a_clean_error(tmp_path):
    assert_clean_error(run_gnnq("train", "-m", "--cfg", "job", "seed=1,2", cwd=tmp_path),
                       "-m and --cfg")


def test_train_synthetic_writes_summary_and_checkpoints(tmp_path):
    proc = run_gnnq("train", "dataset=synthetic", "runs=2", "tracking=none", *FAST,
                    f"hydra.run.dir={tmp_path}/out", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "test_acc" in proc.stdout and "avg_bits 32.00" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["runs_completed"] == 2
    assert summary["metrics"]["compression_ratio"] == 1.0
    assert {r["seed"] for r in summary["runs"]} == {0, 1}
    assert summary["machine"]["threads"] == 1
    assert (tmp_path / "out" / "checkpoints" / "run1.pt").exists()


def test_graph_level_synthetic(tmp_path):
    proc = run_gnnq("train", "dataset=synthetic_graphs", "model=gin", "runs=2", "tracking=none",
                    *FAST, f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["fold"] for r in summary["runs"]] == [0, 1]


def test_missing_data_offline(tmp_path):
    # A hang fails through run_gnnq's timeout; no wall-clock bound beyond it, since start-up
    # alone can take a minute on a loaded 2-core machine.
    proc = run_gnnq("train", "dataset=citeseer", "tracking=none", "data.download=never",
                    f"data.root={tmp_path}/empty", f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert_clean_error(proc, "citeseer", str(tmp_path / "empty"), "ind.citeseer.x")


@requires_shared_data("planetoid", "Cora")
def test_corrupt_data_file(tmp_path):
    from conftest import SHARED_DATA

    raw = tmp_path / "data" / "planetoid" / "Cora" / "raw"
    raw.mkdir(parents=True)
    for src in (SHARED_DATA / "planetoid" / "Cora" / "raw").iterdir():
        (raw / src.name).write_bytes(src.read_bytes())
    (raw / "ind.cora.x").write_bytes(b"\x80\x04garbage, not a pickle")
    proc = run_gnnq("train", "dataset=cora", "tracking=none", f"data.root={tmp_path}/data",
                    f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert_clean_error(proc, "ind.cora.x")


def test_nan_loss_is_reported_and_finished_runs_kept(tmp_path):
    # lr=1e30 blows the weights up; the first run may or may not finish, none may crash.
    proc = run_gnnq("train", "dataset=synthetic", "runs=2", "tracking=none", "trainer.lr=1e30",
                    "trainer.weight_decay=0", *FAST, f"hydra.run.dir={tmp_path}/out",
                    cwd=tmp_path)
    assert_clean_error(proc, "diverged", "trainer.lr")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "diverged" in summary["error"]
    diverged = summary["diverged"]  # the run after the finished ones, and where it broke
    assert diverged["run"] == len(summary["runs"]) and diverged["epoch"] >= 1
    last = diverged["last_epoch_metrics"]
    assert (last is None) == (diverged["epoch"] == 1)
    assert last is None or math.isfinite(last["train_loss"])


def test_dead_tracking_server(tmp_path):
    # MLflow's own retries against a dead server take minutes; the 2 s connect timeout
    # must cut them short, well inside this subprocess timeout.
    proc = run_gnnq("train", "dataset=synthetic", *FAST, "tracking.connect_timeout=2",
                    f"tracking.uri=http://127.0.0.1:{free_port()}",
                    f"hydra.run.dir={tmp_path}/out", cwd=tmp_path, timeout=180)
    assert_clean_error(proc, "did not answer", "tracking=none")


@pytest.mark.parametrize("content, fragments", [
    (b"not a database", ["is not a SQLite database", "move the file away"]),
    (b"SQLite format 3\x00" + b"\x01" * 200, ["could not be opened", "DatabaseError"]),
])
def test_damaged_tracking_store(tmp_path, content, fragments):
    (tmp_path / "mlflow.db").write_bytes(content)
    proc = run_gnnq("train", "dataset=synthetic", *FAST,
                    f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert_clean_error(proc, "sqlite:///", *fragments)
    assert (tmp_path / "mlflow.db").read_bytes() == content  # left as it was


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_output_folder(tmp_path, multirun):
    # A regular file in the way (permission bits would not stop root, who runs CI).
    (tmp_path / "taken").write_text("")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    proc = run_gnnq("train", *(["-m"] if multirun else []), "dataset=synthetic", *FAST,
                    "tracking=none", f"{key}={tmp_path}/taken/out", cwd=tmp_path)
    assert_clean_error(proc, f"{tmp_path}/taken/out", "Not a directory", f"{key}=")


def test_report_to_an_unwritable_place(tmp_path):
    (tmp_path / "taken").write_text("")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"), tags={"dataset": "cora"})
    client.log_metric(run.info.run_id, "test_acc", 80.0)
    client.set_terminated(run.info.run_id)
    proc = run_gnnq("report", "--uri", uri, "--out", f"{tmp_path}/taken/report", cwd=tmp_path)
    assert_clean_error(proc, f"{tmp_path}/taken", "Check the path")


def test_sweep_with_a_failing_job_keeps_the_others(tmp_path):
    proc = run_gnnq("train", "-m", "dataset=synthetic", "trainer.lr=0.01,1e30",
                    "trainer.weight_decay=0", "tracking=none", *FAST,
                    f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "sweep" / "0" / "summary.json").exists()
    assert (tmp_path / "sweep" / "1" / "FAILED").exists()


def test_optuna_sweeper_gets_the_validation_metric(tmp_path):
    proc = run_gnnq("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.direction=maximize", "trainer.lr=interval(0.001,0.05)",
                    "dataset=synthetic", "tracking=none", *FAST,
                    f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_value" in best


def test_tracking_failure_mid_training_keeps_the_results(tmp_path, monkeypatch, caplog):
    """The store dies after the run started: training finishes, summary and checkpoint stay."""
    from gnnq.config import DatasetConfig, TrackingConfig, TrainConfig, TrainerConfig
    from gnnq.tracking import mlflow_tracker
    from gnnq.train.experiment import run_experiment

    def broken_flush(self):
        raise ConnectionError("server went away")

    monkeypatch.setattr(mlflow_tracker, "METRICS_PER_BATCH", 10)
    monkeypatch.setattr(mlflow_tracker.MlflowTracker, "flush", broken_flush)
    config = TrainConfig(dataset=DatasetConfig(name="synthetic"),
                         trainer=TrainerConfig(epochs=5, progress="none"),
                         tracking=TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    summary = run_experiment(config, tmp_path / "out")
    assert summary["mlflow_run_id"] is None
    assert summary["metrics"]["runs_completed"] == 1
    assert (tmp_path / "out" / "summary.json").exists()
    assert (tmp_path / "out" / "checkpoints" / "run0.pt").exists()
    assert "server went away" in caplog.text
