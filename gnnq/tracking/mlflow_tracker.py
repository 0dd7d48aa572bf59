"""MLflow tracking: one run per job, children under a sweep's parent run.

Uses ``MlflowClient`` with explicit run ids (no fluent global "active run"), so jobs that
Hydra runs one after another in one process, or in parallel in several, never share state.
Writes go out in batches within MLflow's limits (100 params, 1000 metrics per request) and
are retried, because parallel jobs writing into one SQLite store can meet a locked database.
"""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from gnnq.config import TrackingConfig
from gnnq.errors import GnnqError

log = logging.getLogger(__name__)

PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAM_VALUE_LIMIT = 6000
PARENT_RUN_FILE = "mlflow_parent_run_id"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id

T = TypeVar("T")


def _limit_http_retries(timeout: float) -> None:
    # MLflow's own defaults retry a dead server for minutes; a user wants to know in seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(timeout, 1))))


def check_reachable(uri: str, timeout: float) -> None:
    """Fail fast, before any training, when the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise GnnqError(
                f"The MLflow tracking server at {uri} did not answer within {timeout:g} s "
                f"({getattr(err, 'reason', err)}). Start it (for example 'make ui'), point "
                f"tracking.uri at a running server or a local store (sqlite:///mlflow.db), "
                f"or run without tracking: tracking=none.") from None
    elif uri.startswith("sqlite:///"):
        folder = _sqlite_folder(uri)
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise GnnqError(
                f"The MLflow store {uri} cannot be written: {folder} is not a writable folder. "
                f"Set tracking.uri to a writable location or use tracking=none.")


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):]).expanduser().resolve()


def _sqlite_folder(uri: str) -> Path:
    return _sqlite_path(uri).parent


SQLITE_HEADER = b"SQLite format 3\x00"


def open_client(uri: str, timeout: float, *, must_exist: bool = False):
    """An ``MlflowClient`` on ``uri``, or one clear error: a server that does not answer, a
    folder that cannot be written, a file that is not a SQLite database, a store MLflow cannot
    open, and for readers (``must_exist``) a SQLite store that is not there, which MLflow
    would otherwise create empty."""
    _limit_http_retries(timeout)
    check_reachable(uri, timeout)
    if uri.startswith("sqlite:///"):
        path = _sqlite_path(uri)
        if must_exist and not path.is_file():
            raise GnnqError(f"There is no MLflow store at {uri} ({path} does not exist). Give "
                            f"the store the runs were logged to: the training jobs' "
                            f"tracking.uri, by default sqlite:///mlflow.db in the folder "
                            f"gnnq train ran in.")
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as f:
                if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise GnnqError(
                        f"The MLflow store {uri} is not a SQLite database: {path} is damaged "
                        f"or another kind of file. Point the URI at an MLflow store, or move "
                        f"the file away to start a new one.")
    from mlflow.tracking import MlflowClient

    try:
        with _one_connect_at_a_time(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # opens (and for SQLite, migrates) it
    except Exception as err:  # noqa: BLE001 - SQLAlchemy, MLflow and OS errors alike
        raise GnnqError(f"The MLflow store {uri} could not be opened ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no details'}). Point the "
                        f"URI at a working MLflow store, or train with tracking=none and send "
                        f"the jobs later with gnnq log.") from None
    return client


@contextmanager
def _one_connect_at_a_time(uri: str) -> Iterator[None]:
    """MLflow creates and migrates a new SQLite store on the first connect, and parallel jobs
    doing that at once break each other's migrations; so connects to one store take turns
    (an exclusive lock on its folder, released when the client exists)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None or not uri.startswith("sqlite:///"):
        yield
        return
    fd = os.open(_sqlite_folder(uri), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: connect unlocked
            pass
        yield
    finally:
        os.close(fd)


def _retry(what: str, call: Callable[[], T], attempts: int = 6) -> T:
    delay = 0.2
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; locked DBs among them
            if attempt == attempts - 1:
                raise
            log.debug("retrying %s after %s", what, err)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys for a nested dict/list config, values as strings."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: str(tree)[:PARAM_VALUE_LIMIT]}
    flat: dict[str, str] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not flat and prefix:
        flat[prefix] = "{}" if isinstance(tree, dict) else "[]"
    return flat


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tracker:
    """No tracking (``tracking=none``): every call does nothing."""

    run_id: Optional[str] = None

    def start(self, run_name: str, tags: dict[str, str], parent_run_id: Optional[str]) -> None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None: ...
    def flush(self) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(Tracker):
    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.client = open_client(cfg.uri, cfg.connect_timeout)
        self.run_id = None
        self.failure: Optional[Exception] = None
        self._pending: list = []

    def experiment_id(self) -> str:
        return _retry("experiment", lambda: get_or_create_experiment(self.client, self.cfg.experiment))

    def start(self, run_name: str, tags: dict[str, str], parent_run_id: Optional[str]) -> None:
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        experiment_id = self.experiment_id()
        run = _retry("create run", lambda: self.client.create_run(
            experiment_id, run_name=run_name, tags=tags))
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        entries = [Param(k, v) for k, v in sorted(params.items())]
        for chunk in _chunks(entries, PARAMS_PER_BATCH):
            _retry("log params", lambda: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Buffered: sent by :meth:`flush` (per-epoch metrics would cost a request each).

        A store that fails mid-training must not stop the training: the first failure is
        logged, later metrics are dropped, and :meth:`end` reports it."""
        from mlflow.entities import Metric

        if self.failure is not None:
            return
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        if len(self._pending) >= METRICS_PER_BATCH:
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - see the docstring
                self.failure = err
                log.error("Tracking stopped working during training (%s: %s); training goes "
                          "on and every result is still written to the output folder.",
                          type(err).__name__, err)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for chunk in _chunks(pending, METRICS_PER_BATCH):
            _retry("log metrics", lambda: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            _retry("log artifacts", lambda: self.client.log_artifacts(
                self.run_id, str(path), artifact_path))
        elif path.exists():
            _retry("log artifact", lambda: self.client.log_artifact(
                self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        if self.failure is not None:
            raise RuntimeError(f"the tracking store failed during training: {self.failure}")
        self.flush()
        _retry("end run", lambda: self.client.set_terminated(self.run_id, status))


def get_or_create_experiment(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def make_tracker(cfg: TrackingConfig) -> Tracker:
    return MlflowTracker(cfg) if cfg.backend == "mlflow" else Tracker()
