"""`gnnq report` on a small store made here: table values are the runs' metrics, pooled right."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import assert_clean_error, run_gnnq
from gnnq.report import Stat


def _job(client, experiment_id, dataset, model, method, params, metrics, parent=None):
    tags = {"dataset": dataset, "model": model, "method": method}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp")
    parent = client.create_run(exp, tags={"gnnq.kind": "sweep"}).info.run_id
    final = lambda t, s: {"test_acc": t, "test_acc_std": s, "best_test_acc": t + 1,  # noqa: E731
                          "best_test_acc_std": s, "val_acc": t - 1, "val_acc_std": s,
                          "runs_completed": 10, "avg_bits": 32.0, "compression_ratio": 1.0}
    _job(client, exp, "cora", "gcn", "fp32", {"quant": "None"}, final(81.5, 0.5))
    for budget, acc in (("2.0", 80.0), ("4.0", 81.0)):
        _job(client, exp, "cora", "gcn", "a2q", {"quant.bit_budget": budget},
             {**final(acc, 1.0), "avg_bits": float(budget) - 0.1,
              "compression_ratio": 32 / (float(budget) - 0.1)}, parent=parent)
    # two single-seed jobs of the same group are pooled into one row of 2 runs ...
    for acc in (70.0, 72.0):
        _job(client, exp, "citeseer", "gcn", "fp32", {},
             {**final(acc, 0.0), "runs_completed": 1})
    # ... but a pinned experiment (another task_name) is a row of its own
    _job(client, exp, "citeseer", "gcn", "fp32", {"task_name": "fp32_gcn_citeseer"},
         final(70.8, 0.7))
    client.set_terminated(parent)
    return tmp_path, uri, parent


def test_stat_pools_exactly():
    values = [1.0, 2.0, 4.0, 8.0, 3.0]
    pooled = Stat()
    pooled.add(2, 1.5, math.sqrt(0.5))               # [1, 2]
    pooled.add(3, 5.0, math.sqrt(7.0))               # [4, 8, 3]
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert pooled.n == 5
    assert pooled.mean == pytest.approx(mean) and pooled.std == pytest.approx(std)


def test_report_table_and_plot(store):
    tmp_path, uri, _ = store
    proc = run_gnnq("report", "--uri", uri, "--experiment", "cmp", "--out",
                    str(tmp_path / "out" / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "cmp.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| cora") or
            line.startswith("| citeseer")]
    assert len(rows) == 5
    assert "| cora | gcn | fp32 | fp32 | - | acc | 10 | 81.50 ± 0.50 | 82.50 ± 0.50 | " \
           "80.50 ± 0.50 | 32.00 | 1.00x | 1 |" in table
    assert "| cora | gcn | a2q | bit_budget=2.0 | - | acc | 10 | 80.00 ± 1.00 |" in table
    assert "| citeseer | gcn | fp32 | fp32 | - | acc | 2 | 71.00 ± 1.41 |" in table
    assert "| citeseer | gcn | fp32 | fp32 | fp32_gcn_citeseer | acc | 10 | 70.80 ± 0.70 |" in table
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 1000


def test_report_filters_by_parent(store):
    tmp_path, uri, parent = store
    proc = run_gnnq("report", "--uri", uri, "--parent", parent, "--out",
                    str(tmp_path / "sweep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "sweep.md").read_text()
    assert "a2q" in table and "fp32 | fp32" not in table


def test_report_bad_input(store):
    tmp_path, uri, _ = store
    assert_clean_error(run_gnnq("report", "--uri", uri, "--experiment", "nope", cwd=tmp_path),
                       "'nope'", "cmp")
    assert_clean_error(run_gnnq("report", "--uri", uri, "--tag", "dataset=pubmed",
                                cwd=tmp_path), "No finished gnnq runs")
    assert_clean_error(run_gnnq("report", "--uri", uri, "--parent", "x' or '1'='1",
                                cwd=tmp_path), "Invalid --parent", "32 hex digits")


def test_report_tag_values_may_hold_quotes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("x")
    _job(client, exp, "o'hare", "gcn", "fp32", {}, {"test_acc": 80.0, "test_acc_std": 0.0,
                                                   "runs_completed": 1})
    proc = run_gnnq("report", "--uri", uri, "--tag", "dataset=o'hare", "--out",
                    str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| o'hare | gcn |" in (tmp_path / "r.md").read_text()
    assert_clean_error(run_gnnq("report", "--uri", uri, "--tag", "dataset=o'h\"are",
                                cwd=tmp_path), "Invalid --tag", "not both")


def test_report_on_a_missing_or_damaged_store(tmp_path):
    missing = tmp_path / "typo.db"
    assert_clean_error(run_gnnq("report", "--uri", f"sqlite:///{missing}", cwd=tmp_path),
                       "There is no MLflow store", str(missing))
    assert not missing.exists()  # a reader does not create an empty store
    (tmp_path / "notes.db").write_text("not a database")
    assert_clean_error(run_gnnq("report", "--uri", f"sqlite:///{tmp_path}/notes.db",
                                cwd=tmp_path), "is not a SQLite database")
