"""What the result scripts share: run `gnnq train` jobs into fixed folders and read back
their summary.json files.

Each job is the `gnnq` command exactly as a user types it, logged to the project's MLflow
store unless `tracking=none` is among the overrides. A job whose repeats are split into
`shards` parallel jobs (`first_run`/`runs`) writes `shard<k>/summary.json`, a run added to an
unfinished job `run<k>/summary.json`; readers pool them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

from gnnq.train.metrics import mean_std

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"


def gnnq_command() -> list[str]:
    """`gnnq` from the running interpreter's environment, even when it is not on PATH."""
    script = Path(sys.executable).with_name("gnnq")
    return [str(script)] if script.exists() else [shutil.which("gnnq") or "gnnq"]


def launch(folder: Path, overrides: Sequence[str], shards: int = 1, runs: int = 10,
           first_run: int = 0) -> list[subprocess.Popen]:
    """Start the job(s) writing into ``folder``; one process per shard, single-threaded."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    per_shard = runs // shards
    jobs = []
    for shard in range(shards):
        target = folder / f"shard{shard}" if shards > 1 else folder
        cmd = [*gnnq_command(), "train", *overrides, f"hydra.run.dir={target}",
               "trainer.progress=log", f"runs={per_shard}"]
        if shards > 1 or first_run:
            cmd.append(f"first_run={first_run + shard * per_shard}")
        print("+ gnnq", " ".join(cmd[1:]), flush=True)
        jobs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
    return jobs


def missing_runs(folder: Path, runs: int) -> list[int]:
    """Run indices below ``runs`` that no summary in ``folder`` holds. None once a summary
    records an error: a diverged job is a result (delete its folder to rerun it)."""
    parts = summaries(folder)
    if any(p.get("error") for p in parts):
        return []
    done = {r["run"] for p in parts for r in p["runs"]}
    return [k for k in range(runs) if k not in done]


def run_all(jobs: Iterable[tuple], parallel: int = 1) -> None:
    """Run ``(folder, overrides, shards[, runs])`` jobs (10 runs unless given), up to
    ``parallel`` processes at a time. A folder that has all its runs is skipped; one that
    has some gets each missing run as its own job in ``run<k>/``."""
    pending = []
    for folder, overrides, shards, *runs in jobs:
        total = runs[0] if runs else 10
        missing = missing_runs(folder, total)
        if len(missing) == total:
            pending.append((folder, overrides, shards, total, 0))
        else:
            pending += [(folder / f"run{k}", overrides, 1, 1, k) for k in missing]
    running: list[subprocess.Popen] = []
    failed = []
    while pending or running:
        while pending and len(running) < parallel:
            running += launch(*pending.pop(0))
        finished = running.pop(0)
        if finished.wait() != 0:
            failed.append(" ".join(finished.args[1:]))
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
    """The job's summaries as one: ``runs`` pooled over shards, the first shard's other keys,
    ``seconds`` summed; None if nothing has finished."""
    parts = summaries(folder)
    if not parts:
        return None
    return {**parts[0], "runs": [r for p in parts for r in p["runs"]],
            "seconds": sum(p["seconds"] for p in parts)}


def on_common_runs(*groups: list[dict]) -> list[list[dict]]:
    """Each group of runs restricted to the run indices (seeds/folds) that every non-empty
    group has, so unfinished jobs are compared like with like."""
    common = set.intersection(*({r["run"] for r in runs} for runs in groups if runs)
                              or [set()])
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
