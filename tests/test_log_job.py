"""`gnnq log`: a finished job's folder sent to a store later, as the job would have logged it."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from gnnq.cli import EXIT_USER_ERROR, main

from conftest import run_gnnq

FAST = ["dataset=synthetic", "runs=2", "trainer.epochs=3", "trainer.progress=none"]
TRACKING_PARAMS = ("tracking.uri", "tracking.experiment", "tracking.run_name", "tracking.backend")


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def live_job_uri(work) -> str:
    return f"sqlite:///{work}/live.db"


@pytest.fixture(scope="module")
def live_job(tmp_path_factory):
    """A job tracked live, and its output folder."""
    work = tmp_path_factory.mktemp("log_job")
    uri = live_job_uri(work)
    proc = run_gnnq("train", *FAST, "+quant=a2q", f"tracking.uri={uri}",
                    "tracking.experiment=live", f"hydra.run.dir={work}/job", cwd=work)
    assert proc.returncode == 0, proc.stderr
    (run,) = _runs(uri, "live")
    return work, run


def test_logged_job_matches_the_live_run_and_is_logged_once(live_job, capsys):
    work, live = live_job
    uri = f"sqlite:///{work}/gathered.db"
    args = ("log", str(work / "job"), "--uri", uri, "--experiment", "gathered",
            "--run-name", "copied")
    proc = run_gnnq(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    (run,) = _runs(uri, "gathered")
    assert run.info.status == "FINISHED" and run.info.run_name == "copied"
    assert run.data.tags["gnnq.logged_from"] == str((work / "job").resolve())
    for tag in ("dataset", "model", "method", "gnnq.version"):
        assert run.data.tags[tag] == live.data.tags[tag]

    def untracked(params: dict) -> dict:
        return {k: v for k, v in params.items() if k not in TRACKING_PARAMS}

    assert untracked(run.data.params) == untracked(live.data.params)
    assert run.data.metrics == live.data.metrics  # final values and each curve's last
    client, live_client = MlflowClient(uri), MlflowClient(live_job_uri(work))
    for key in ("run1.train_loss", "run0.val_acc", "run1.avg_bits"):
        curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert curve == [(m.step, m.value)
                         for m in live_client.get_metric_history(live.info.run_id, key)]
        assert [step for step, _ in curve] == [1, 2, 3]
    summary = json.loads((work / "job" / "summary.json").read_text())
    assert run.data.metrics["test_acc"] == summary["metrics"]["test_acc"]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"summary.json", "config", "checkpoints", "analysis"} <= artifacts
    # Again: nothing new, so a report never counts the job twice.
    assert main(list(args)) == 0 and "already logged" in capsys.readouterr().out
    assert len(_runs(uri, "gathered")) == 1


def test_a_job_run_without_tracking_goes_to_its_configured_store(tmp_path, monkeypatch):
    proc = run_gnnq("train", *FAST, "tracking=none", f"hydra.run.dir={tmp_path}/job",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.chdir(tmp_path)  # the job's store is the default, sqlite:///mlflow.db
    assert main(["log", "job"]) == 0
    (run,) = _runs(f"sqlite:///{tmp_path}/mlflow.db", "gnnq")
    assert run.info.run_name == "gcn-synthetic-fp32" and run.data.metrics["runs_completed"] == 2
    assert main(["report", "--uri", "sqlite:///mlflow.db", "--out", "cmp"]) == 0
    row = "| synthetic | gcn | fp32 | fp32 | train | acc | 2 |"
    assert row in (tmp_path / "cmp.md").read_text()


def test_a_resumed_job_replaces_the_run_logged_before_it_finished(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/store.db"  # absolute: MLflow caches a store by its URI
    log = ["log", "job", "--uri", uri]
    job = ["train", *FAST, "tracking=none", f"hydra.run.dir={tmp_path}/job"]
    assert run_gnnq(*job, cwd=tmp_path).returncode == 0
    summary = tmp_path / "job" / "summary.json"
    whole = json.loads(summary.read_text())
    # As if stopped with Ctrl-C during run 1: one finished run, the summary says why.
    (tmp_path / "job" / "checkpoints" / "run1.pt").unlink()
    summary.write_text(json.dumps({**whole, "runs": whole["runs"][:1], "error": "Interrupted",
                                   "metrics": {**whole["metrics"], "runs_completed": 1.0}}))
    assert main(log) == 0
    (partial,) = _runs(uri, "gnnq")
    assert partial.info.status == "FAILED"
    summary.write_text(json.dumps(whole))  # resumed and finished (tests/test_resume.py)
    capsys.readouterr()
    assert main(log) == 0
    assert f"replaces run {partial.info.run_id}" in capsys.readouterr().out
    (run,) = _runs(uri, "gnnq")  # the partial one is deleted
    assert run.info.status == "FINISHED" and run.data.metrics["runs_completed"] == 2
    assert main(log) == 0 and "already logged" in capsys.readouterr().out


def test_folders_that_are_not_finished_jobs_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def refused(*fragments: str) -> None:
        assert main(["log", str(tmp_path)]) == EXIT_USER_ERROR
        message = capsys.readouterr().err
        assert all(f in message for f in fragments), message

    refused(str(tmp_path), "summary.json is missing")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "summary.json").write_text('{"metrics": {"test_acc"')
    refused("is corrupt")
    (tmp_path / "summary.json").write_text('{"metrics": {"runs_completed": 0}}')
    refused("no finished run")
    assert not (tmp_path / "mlflow.db").exists()
