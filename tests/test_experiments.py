"""Every pinned configuration in conf/experiment/ composes, validates, and runs.

The smoke run swaps in the tiny synthetic dataset of the same level (node or graph), one run
of two epochs, so the whole set stays fast; the real datasets are exercised elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gnnq.cli import config_dir
from gnnq.config import validate
from gnnq.train.experiment import run_experiment

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
GRAPH_LEVEL = {"mutag", "proteins", "reddit_binary", "zinc", "synthetic_graphs"}


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", *overrides])


def test_there_are_experiments():
    assert len(EXPERIMENTS) >= 11


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    config = validate(_compose(name))
    assert config.task_name == name
    assert config.runs >= 1


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_smoke_run(name, tmp_path: Path):
    pinned = validate(_compose(name))
    tiny = "synthetic_graphs" if pinned.dataset.name in GRAPH_LEVEL else "synthetic"
    cfg = _compose(name, f"dataset={tiny}", "runs=1", "trainer.epochs=2",
                   "trainer.progress=none", "tracking=none")
    summary = run_experiment(validate(cfg), tmp_path)
    assert summary["metrics"]["runs_completed"] == 1
    assert (tmp_path / "checkpoints" / "run0.pt").exists()


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith("smooth_")])
def test_smoothness_presets_select_with_the_specs_tie_rule(name):
    # docs/smoothness.md, protocol: equal validation accuracies go to the higher train accuracy.
    assert validate(_compose(name)).trainer.val_ties == "train"
