"""What the result scripts share: run `gnnq train` jobs into fixed folders and read back
their summary.json files.

Each job is the `gnnq` command exactly as a user types it, logged to the project's MLflow
store unless `tracking=none` is among the overrides. A job whose repeats are split into
`shards` parallel jobs (`first_run`/`runs`) writes `shard<k>/summary.json`, a run added to an
unfinished job `run<k>/summary.json`; readers pool them.

outputs/ is scratch (checkpoints, logs) and stays out of git, so each finished job's record
(summary, config, analysis numbers) is also kept in results/jobs/ under the same relative path.
A script restores those records into outputs/ before it starts (`restore_jobs`), so a fresh
clone rebuilds every table, skips every finished job (a job two scripts share, SAME_JOBS, is
kept once and linked from the other), and a long job set (10 GIN-REDDIT-BINARY
folds per method) can be finished over several machines. Every job is launched with
`resume=true`: one killed mid-run (a machine or session that ended) continues from the
snapshot it left in its folder, to the same result it would have reached uninterrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from gnnq.train.metrics import mean_std

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
ARCHIVE = ROOT / "results" / "jobs"
# A finished job's record: all that the tables and `gnnq log` read. Checkpoints stay in
# outputs/ (megabytes each; only scripts/export_check.py reads them).
RECORD = ("summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "analysis/*.json")
# Shards of a job whose runs take an hour or so each on one core (GIN-REDDIT-BINARY folds,
# quantized SMP on Coauthor CS): each run is its own process and is kept (results/jobs/)
# even if the machine goes mid-job.
RUN_SHARDS = 10
# The comparison's rows; its FP32 and A²Q cells there are the very jobs scripts/baselines.py
# and scripts/a2q.py run (`+experiment=fp32_<row>`, `+experiment=a2q_<row>`, same runs).
COMPARISON_ROWS = ("gcn_cora", "gcn_citeseer", "gat_cora", "gin_reddit_binary")
SAME_JOBS = [pair for row in COMPARISON_ROWS for pair in (
    (f"baselines/fp32_{row}", f"comparison/{row}/fp32"),
    (f"a2q/a2q_{row}", f"comparison/{row}/a2q"))]


def gnnq_command() -> list[str]:
    """`gnnq` from the running interpreter's environment, even when it is not on PATH."""
    script = Path(sys.executable).with_name("gnnq")
    return [str(script)] if script.exists() else [shutil.which("gnnq") or "gnnq"]


def launch(folder: Path, overrides: Sequence[str], runs: int = 10,
           first_run: int = 0) -> subprocess.Popen:
    """Start one single-threaded job writing into ``folder``: runs ``first_run`` onwards,
    continuing what a killed job left there (its finished runs, its last snapshot)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [*gnnq_command(), "train", *overrides, f"hydra.run.dir={folder}",
           "trainer.progress=log", f"runs={runs}", "resume=true"]
    if first_run:
        cmd.append(f"first_run={first_run}")
    print("+ gnnq", " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def archive(folder: Path) -> None:
    """Keep the records of the job in ``folder`` (every finished part) in results/jobs/,
    replacing what was kept of it before. A linked folder is another job's: skipped."""
    parts = [] if folder.is_symlink() else job_folders(folder)
    if not parts:
        return
    kept = ARCHIVE / folder.relative_to(OUTPUTS)
    shutil.rmtree(kept, ignore_errors=True)
    for part in parts:
        for path in (p for pattern in RECORD for p in part.glob(pattern)):
            target = kept / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def restore_jobs() -> list[Path]:
    """Copy the job records kept in results/jobs/ into outputs/ where the part has no
    summary there yet (a fresh clone or another machine); returns the parts restored."""
    restored = []
    for summary in sorted(ARCHIVE.rglob("summary.json")):
        part = OUTPUTS / summary.parent.relative_to(ARCHIVE)
        if not (part / "summary.json").exists():
            shutil.copytree(summary.parent, part, dirs_exist_ok=True)
            restored.append(part)
    link_same_jobs()
    return restored


def link_same_jobs() -> None:
    """For each pair of SAME_JOBS where one script's folder exists and the other's does not,
    link the missing one to it: a job trained (or begun) by one script is read, finished and
    archived in its folder only, never trained twice."""
    for pair in SAME_JOBS:
        first, second = (OUTPUTS / name for name in pair)
        for home, link in ((first, second), (second, first)):
            if home.is_dir() and not home.is_symlink() and not os.path.lexists(link):
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(home.resolve())


def missing_runs(folder: Path, runs: int) -> list[int]:
    """Run indices below ``runs`` that no summary in ``folder`` holds. None once a summary
    records an error: a diverged job is a result (delete its folder, here and under
    results/jobs/, to rerun it)."""
    parts = summaries(folder)
    if any(p.get("error") for p in parts):
        return []
    done = {r["run"] for p in parts for r in p["runs"]}
    return [k for k in range(runs) if k not in done]


def run_all(jobs: Iterable[tuple], parallel: int = 1) -> None:
    """Run ``(folder, overrides, shards[, runs])`` jobs (10 runs unless given), up to
    ``parallel`` processes at a time. A job of ``shards`` > 1 runs as that many processes of
    ``runs // shards`` runs each (``shard<k>/``). A folder that has all its runs is skipped;
    one that has some gets each missing run as its own process in ``run<k>/``. A job's record
    is archived (results/jobs/) each time one of its processes ends, and first of all any
    record it has from before."""
    pending = []  # (job folder, process folder, overrides, runs, first run)
    for folder, overrides, shards, *runs in jobs:
        archive(folder)
        total = runs[0] if runs else 10
        missing = missing_runs(folder, total)
        if len(missing) < total:
            pending += [(folder, folder / f"run{k}", overrides, 1, k) for k in missing]
        else:
            per = total // shards
            pending += [(folder, folder / f"shard{k}" if shards > 1 else folder, overrides,
                         per, k * per) for k in range(shards)]
    running: dict[subprocess.Popen, Path] = {}
    failed = []
    while pending or running:
        while pending and len(running) < parallel:
            job, *process = pending.pop(0)
            running[launch(*process)] = job
        done = [p for p in running if p.poll() is not None]
        if not done:
            time.sleep(2)
        for finished in done:
            if finished.returncode != 0:
                failed.append(" ".join(finished.args[1:]))
            archive(running.pop(finished))  # a diverged job's summary is a result too
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


def job_folders(folder: Path) -> list[Path]:
    """The output folders of the job's parts that finished: the job's own, its shards' and
    its single-run resumes'."""
    parts = [folder, *sorted(folder.glob("shard*")), *sorted(folder.glob("run*"))]
    return [p for p in parts if (p / "summary.json").exists()]


def summaries(folder: Path) -> list[dict]:
    """The job's summary.json, or those of its shards and single-run resumes."""
    return [json.loads((p / "summary.json").read_text()) for p in job_folders(folder)]


def fmt(runs: list[dict], key: str, digits: int = 2) -> str:
    if not runs:
        return "–"
    mean, std = mean_std(r[key] for r in runs)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def pooled(folder: Path) -> Optional[dict]:
    """The job's summaries as one: ``runs`` pooled over shards, the first shard's other keys
    (the error and divergence record of the first shard that stopped on one), ``seconds``
    summed; None if nothing has finished."""
    parts = summaries(folder)
    if not parts:
        return None
    failed = next((p for p in parts if p.get("error")), {})
    return {**parts[0], "runs": [r for p in parts for r in p["runs"]],
            "seconds": sum(p["seconds"] for p in parts),
            **{key: failed[key] for key in ("error", "diverged") if key in failed}}


def on_common_runs(*groups: list[dict]) -> list[list[dict]]:
    """Each group of runs restricted to the run indices (seeds/folds) that every non-empty
    group has, so unfinished jobs are compared like with like."""
    indices = [{r["run"] for r in runs} for runs in groups if runs]
    common = set.intersection(*indices) if indices else set()
    return [[r for r in runs if r["run"] in common] for runs in groups]


def pooled_runs(folder: Path) -> list[dict]:
    job = pooled(folder)
    return job["runs"] if job else []


def machine(folders: Iterable[Path]) -> str:
    for folder in folders:
        for summary in summaries(folder):
            m = summary["machine"]
            return f"torch {m['torch']}, Python {m['python']}"
    return "no runs yet"
