"""The MLflow UI shows what gnnq logs: a real sweep, a real `mlflow server`, headless Chromium.

`make test` installs Chromium from Debian's packages when it is missing (see the Makefile's
`browser` target); where it cannot, this test is skipped with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from html import unescape
from pathlib import Path

import pytest
from conftest import free_port, run_gnnq

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                "(make test installs Debian's chromium package when it can)")
# The compare page lays out metric names and values in absolutely positioned grid cells.
CELL = re.compile(r'<div class="[^"]*" style="height: \d+px; left: (\d+)px; position: absolute; '
                  r'top: (\d+)px; width: \d+px;">(.*?)</div>', re.S)


def _text(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", "", html)).strip()


def _render(url: str) -> str:
    """The DOM after the page's scripts ran; a tall window so no grid row is virtualised away."""
    proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--window-size=1600,20000",
                           "--virtual-time-budget=20000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture
def sweep_store(tmp_path: Path):
    """A two-job A²Q bit-budget sweep logged to a fresh SQLite store; its children's run ids,
    names and metrics as MLflow holds them."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_gnnq("train", "-m", "dataset=synthetic", "+quant=a2q", "quant.bit_budget=2,4",
                    "trainer.epochs=3", "trainer.progress=none", f"tracking.uri={store}",
                    f"hydra.sweep.dir={tmp_path}/multirun", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("gnnq")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("gnnq.kind") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    return store, experiment.experiment_id, children


@pytest.fixture
def mlflow_server(sweep_store):
    store, experiment_id, children = sweep_store
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            time.sleep(1)
        yield url, experiment_id, children
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_mlflow_ui_shows_every_child_run_with_its_accuracy_and_bits(mlflow_server):
    url, experiment_id, children = mlflow_server
    ids = [r.info.run_id for r in children]
    page = f"{url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment_id])}"
    dom = _render(page)
    for run in children:
        assert run.info.run_name in unescape(dom), run.info.run_name
    # Rows of the metric grid: the name cell and one value cell per run (in `ids` order) share
    # their vertical offset.
    rows: dict[int, list[tuple[int, str]]] = {}
    for left, top, cell in CELL.findall(dom):
        rows.setdefault(int(top), []).append((int(left), _text(cell)))
    shown = {}
    for cells in rows.values():
        names = [t for _, t in cells if t in ("test_acc", "avg_bits")]
        if names:
            values = [t for _, t in sorted(cells) if t != names[0]]
            shown[names[0]] = values
    for key in ("test_acc", "avg_bits"):
        assert key in shown, f"{key} is not on the rendered page"
        want = [r.data.metrics[key] for r in children]
        got = [float(v) for v in shown[key]]
        assert got == pytest.approx(want, abs=0.01), (key, got, want)
