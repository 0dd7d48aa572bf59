"""A job killed mid-run and resumed (resume=true / gnnq resume) gives the job never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gnnq.cli import config_dir
from gnnq.config import validate
from gnnq.errors import GnnqError
from gnnq.train import snapshot
from gnnq.train.experiment import run_experiment
from gnnq.train.trainer import Trainer

from conftest import assert_clean_error, run_gnnq

# A preset of each method and level: dropout, mini-batch shuffling and BatchNorm (DQ's GIN),
# Degree-Quant's random protection and EMA ranges, A²Q's learned bits and Local Gradient, QLR's
# lazy initialisation. Smaller GINs and fewer SMP steps than the presets' keep the test fast.
SMALL_GIN = ("model.layers=2", "model.hidden=16")
PRESETS = {"dq_int4_gin_reddit_binary": ("synthetic_graphs", *SMALL_GIN),
           "a2q_gcn_cora": ("synthetic",),
           "smooth_smp_cora_int2_btstar": ("synthetic", "model.steps=2")}
EPOCHS = 4


class Killed(Exception):
    """Stands for SIGKILL: nothing after it runs, not even the summary."""


def _config(preset: str, dataset: str, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"+experiment={preset}", f"dataset={dataset}", "runs=2", f"trainer.epochs={EPOCHS}",
            "trainer.progress=none", "tracking=none", "trainer.snapshot_minutes=0",
            *overrides])
    return validate(cfg)


def _kill_at(monkeypatch, run: int, epoch: int) -> None:
    report = Trainer._report

    def dying_report(self, epochs, r, e, metrics):
        if (r, e) == (run, epoch):
            raise Killed
        report(self, epochs, r, e, metrics)

    monkeypatch.setattr(Trainer, "_report", dying_report)


def _checkpoint(folder: Path, run: int) -> dict:
    return torch.load(folder / "checkpoints" / f"run{run}.pt", weights_only=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_killed_job_resumes_to_the_same_result(preset, tmp_path, monkeypatch):
    dataset, *small = PRESETS[preset]
    whole = run_experiment(_config(preset, dataset, *small), tmp_path / "whole")

    folder = tmp_path / "killed"
    with monkeypatch.context() as patch:
        _kill_at(patch, run=1, epoch=3)
        with pytest.raises(Killed):
            run_experiment(_config(preset, dataset, *small), folder)
    assert not (folder / "summary.json").exists()
    assert (folder / "checkpoints" / "run0.pt").exists()
    assert torch.load(snapshot.snapshot_path(folder / "checkpoints", 1),
                      weights_only=True)["epoch"] == 2

    resumed = run_experiment(_config(preset, dataset, *small, "resume=true"), folder)
    assert resumed["runs"] == whole["runs"]
    assert resumed["metrics"] == whole["metrics"]
    for run in (0, 1):
        expected, got = _checkpoint(tmp_path / "whole", run), _checkpoint(folder, run)
        # Every epoch's training loss and scores, not only the selected epoch's.
        assert got["history"] == expected["history"]
        assert len(got["history"]) == EPOCHS
        for name, tensor in expected["state_dict"].items():
            assert torch.equal(tensor, got["state_dict"][name]), name
    assert not snapshot.snapshot_path(folder / "checkpoints", 1).exists()  # the run finished


def test_resume_replays_the_epochs_before_the_snapshot_to_the_tracker(tmp_path, monkeypatch):
    logged: list[tuple[int, int]] = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

        def log_metrics(self, metrics, step=None):
            if step is not None:
                logged.append((int(next(iter(metrics)).split(".")[0][3:]), step))

    monkeypatch.setattr("gnnq.train.experiment.make_tracker", lambda cfg: Recorder())
    with monkeypatch.context() as patch:
        _kill_at(patch, run=1, epoch=4)
        with pytest.raises(Killed):
            run_experiment(_config("fp32_gcn_cora", "synthetic"), tmp_path)
    logged.clear()
    run_experiment(_config("fp32_gcn_cora", "synthetic", "resume=true"), tmp_path)
    assert logged == [(run, epoch) for run in (0, 1) for epoch in range(1, EPOCHS + 1)]


def test_resume_without_snapshots_trains_from_the_start(tmp_path):
    fresh = run_experiment(_config("fp32_gcn_cora", "synthetic"), tmp_path / "a")
    resumed = run_experiment(_config("fp32_gcn_cora", "synthetic", "resume=true"), tmp_path / "b")
    assert resumed["runs"] == fresh["runs"]


@pytest.mark.parametrize("changed, named", [("trainer.lr=0.02", "trainer.lr=0.01 there but "
                                             "0.02 now"),
                                            ("model.hidden=32", "model.hidden=16 there but 32")])
def test_resume_under_other_settings_is_refused(tmp_path, monkeypatch, changed, named):
    with monkeypatch.context() as patch:
        _kill_at(patch, run=0, epoch=3)
        with pytest.raises(Killed):
            run_experiment(_config("fp32_gcn_cora", "synthetic"), tmp_path)
    with pytest.raises(GnnqError, match=f"cannot continue .*run0.snapshot.pt: it was made "
                                        f"with {named}"):
        run_experiment(_config("fp32_gcn_cora", "synthetic", "resume=true", changed), tmp_path)
    # Settings that do not change a run may differ.
    summary = run_experiment(_config("fp32_gcn_cora", "synthetic", "resume=true",
                                     "trainer.snapshot_minutes=null", "runs=1"), tmp_path)
    assert summary["metrics"]["runs_completed"] == 1


def test_a_damaged_snapshot_is_a_clean_error(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _kill_at(patch, run=0, epoch=3)
        with pytest.raises(Killed):
            run_experiment(_config("fp32_gcn_cora", "synthetic"), tmp_path)
    snapshot.snapshot_path(tmp_path / "checkpoints", 0).write_bytes(b"not a snapshot")
    with pytest.raises(GnnqError, match=r"cannot read the snapshot .*run0.snapshot.pt .*Delete "
                                        r"it to train that run from its first epoch"):
        run_experiment(_config("fp32_gcn_cora", "synthetic", "resume=true"), tmp_path)


def test_gnnq_resume_continues_the_job_in_its_folder(tmp_path, data_root):
    folder = tmp_path / "job"
    first = run_gnnq("train", "dataset=synthetic", "runs=2", "trainer.epochs=3",
                     "tracking=none", f"hydra.run.dir={folder}", cwd=tmp_path, data=data_root)
    assert first.returncode == 0, first.stderr
    before = json.loads((folder / "summary.json").read_text())
    (folder / "checkpoints" / "run1.pt").unlink()  # as if killed during run 1
    again = run_gnnq("resume", str(folder), cwd=tmp_path, data=data_root)
    assert again.returncode == 0, again.stderr
    assert "run 0 finished before" in again.stdout + again.stderr
    assert json.loads((folder / "summary.json").read_text())["runs"] == before["runs"]


def test_gnnq_resume_of_a_folder_that_is_no_job_is_a_clean_error(tmp_path):
    proc = run_gnnq("resume", str(tmp_path), cwd=tmp_path)
    assert_clean_error(proc, str(tmp_path), "is not the output folder of a gnnq train job")
