"""MLflow tracking end to end: a real `gnnq train -m` sweep, served by a real MLflow server.

The server runs lean on a free loopback port (1 worker, no job execution) over the SQLite
store the sweeps wrote; the test reads runs back only through the REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, run_gnnq

pytestmark = pytest.mark.slow

FINAL_KEYS = {"test_acc", "val_acc", "best_test_acc", "avg_bits", "compression_ratio"}
FAST = ["dataset=synthetic", "trainer.epochs=3", "trainer.progress=none"]


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store, written by a serial sweep and then by a parallel (joblib) sweep."""
    work = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{work}/mlflow.db"
    serial = run_gnnq("train", "-m", *FAST, "seed=0,1", f"tracking.uri={uri}",
                      "tracking.experiment=sweeps", f"hydra.sweep.dir={work}/serial", cwd=work)
    assert serial.returncode == 0, serial.stderr
    parallel = run_gnnq("train", "-m", *FAST, "seed=2,3,4,5", f"tracking.uri={uri}",
                        "tracking.experiment=sweeps", "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={work}/parallel", cwd=work)
    assert parallel.returncode == 0, parallel.stderr
    return work, uri


@pytest.fixture(scope="module")
def server(store):
    work, uri = store
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("the MLflow server did not start within 90 s")
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _runs(base: str) -> list[dict]:
    experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=sweeps")
    runs = _post(base, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment["experiment"]["experiment_id"]],
                  "max_results": 1000}).get("runs", [])
    return runs


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_parent_and_children_with_final_metrics(server):
    runs = _runs(server)
    parents = [r for r in runs if _tags(r).get("gnnq.kind") == "sweep"]
    assert len(parents) == 2
    children = [r for r in runs if "mlflow.parentRunId" in _tags(r)]
    assert len(children) == 6
    by_parent: dict[str, list[dict]] = {}
    for child in children:
        by_parent.setdefault(_tags(child)["mlflow.parentRunId"], []).append(child)
    assert sorted(len(v) for v in by_parent.values()) == [2, 4]
    assert set(by_parent) == {p["info"]["run_id"] for p in parents}
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in child["data"]["metrics"]}
        assert FINAL_KEYS <= keys, keys
        assert "run0.val_acc" in keys  # per-epoch history
    seeds = sorted(int({p["key"]: p["value"] for p in c["data"]["params"]}["seed"])
                   for c in children)
    assert seeds == [0, 1, 2, 3, 4, 5]  # the parallel sweep lost no run


def test_artifacts_listed(server):
    child = next(r for r in _runs(server) if "mlflow.parentRunId" in _tags(r))
    listing = _get(server, f"/api/2.0/mlflow/artifacts/list?run_id={child['info']['run_id']}")
    names = {f["path"] for f in listing.get("files", [])}
    assert {"summary.json", "config", "checkpoints"} <= names, names


def _connect_and_log(uri: str, barrier, results) -> None:
    from gnnq.config import TrackingConfig
    from gnnq.tracking.mlflow_tracker import MlflowTracker

    barrier.wait()
    try:
        tracker = MlflowTracker(TrackingConfig(backend="mlflow", uri=uri, experiment="fresh"))
        tracker.start("job", tags={}, parent_run_id=None)
        tracker.end()
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(err).__name__}: {err}"[:300])


def test_parallel_jobs_can_create_a_new_sqlite_store_together(tmp_path):
    """Without taking turns, MLflow's schema migrations of a new store collide (table
    already exists, duplicate column) and all but one job fail."""
    import multiprocessing

    import gnnq.tracking.mlflow_tracker  # noqa: F401 - imported once, before the fork
    import mlflow.tracking  # noqa: F401

    ctx = multiprocessing.get_context("fork")
    uri, jobs = f"sqlite:///{tmp_path}/mlflow.db", 4
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_connect_and_log, args=(uri, barrier, results))
             for _ in range(jobs)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    assert outcomes == ["ok"] * jobs, outcomes
