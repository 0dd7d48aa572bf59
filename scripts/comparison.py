"""Regenerate results/comparison.md and results/comparison.png: FP32, Degree-Quant, A²Q and the
smoothness-aware quantizer side by side under one protocol.

    python scripts/comparison.py                  # every job (finished ones are kept), then the report
    python scripts/comparison.py --parallel 2     # two jobs at a time
    python scripts/comparison.py --skip-reddit    # leave out GIN-REDDIT-BINARY (hours per method)
    python scripts/comparison.py --rows gin_reddit_binary --methods DQ-INT4 --parallel 2
    python scripts/comparison.py --report-only

Every cell is one `gnnq train` job of 10 runs (or its parts: shards, single-run resumes),
sent to its own MLflow store (outputs/comparison/mlflow.db) with `gnnq log` once it has
finished; the table and plot are then `gnnq report` over that store, exactly as a user builds
a comparison from their own runs, followed by the checks below. Logging finished folders
rather than tracking live lets the store be rebuilt from the job records kept in results/jobs/
on any machine (`gnnq log` never logs a folder twice).
Same protocol for every method: seeds 0-9 on the public Planetoid split (Cora, CiteSeer),
folds 0-9 of the fixed 10-fold CV (REDDIT-BINARY); test accuracy at the best validation epoch
is the primary rule. Each method runs its pinned preset (its released hyperparameters):
fp32_*, dq_int8_*, dq_int4_*, a2q_*; the smoothness-aware rows are the FP32 preset with
`+quant=smoothness` (QLR on every stage of the same GCN/GAT/GIN), on GIN-REDDIT-BINARY with the
mean pooling and FP32 degree feature every other quantized row has (QLR_MODEL). Nothing is
chosen on test.

The FP32 and A²Q cells are the jobs that scripts/baselines.py and scripts/a2q.py run with the
same presets on the same seeds and folds (common.SAME_JOBS): whichever script began one holds
its folder and record, and the other links to it instead of training it again (on
GIN-REDDIT-BINARY about 4 and 7 core-hours).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from common import (COMPARISON_ROWS as ROWS, OUTPUTS, ROOT, RUN_SHARDS, fmt, gnnq_command,
                    job_folders, on_common_runs, pooled_runs, restore_jobs, run_all, summaries)

from gnnq.train.metrics import mean_std

OUT = OUTPUTS / "comparison"
STORE = f"sqlite:///{OUT / 'mlflow.db'}"
RESULTS = ROOT / "results"
# The FP32 GIN sums its nodes before the readout. Quantized, that input spans graphs of 6 to
# 3782 nodes: DQ-INT4 stalled on it (results/comparison_notes.md) and both quantized presets
# pool by mean, as their authors' models do, and keep the degree feature FP32; QLR gets the
# same model and input as they.
QLR_MODEL = {"gin_reddit_binary": ["model.pooling=mean", "quant.quantize_raw_input=false"]}
# method -> overrides, given the row (model_dataset)
METHODS = {
    "FP32": lambda row: [f"+experiment=fp32_{row}"],
    "DQ-INT8": lambda row: [f"+experiment=dq_int8_{row}"],
    "DQ-INT4": lambda row: [f"+experiment=dq_int4_{row}"],
    "A²Q": lambda row: [f"+experiment=a2q_{row}"],
    "QLR-INT4": lambda row: [f"+experiment=fp32_{row}", "+quant=smoothness", "quant.bits=4",
                             *QLR_MODEL.get(row, [])],
    "QLR-INT2-BT*": lambda row: [f"+experiment=fp32_{row}", "+quant=smoothness", "quant.bits=2",
                                 "quant.truncation=btstar", *QLR_MODEL.get(row, [])],
}
DQ8_MAX_DROP = 1.5   # DQ-INT8 within this many pp of FP32 on every row
DQ4_REDDIT_MIN = 85.0


def folder(row: str, method: str) -> Path:
    return OUT / row / method.lower().replace("²", "2").replace("*", "star")


def jobs(rows: list[str], methods: list[str]) -> list[tuple[Path, list[str], int]]:
    return [(folder(row, method), [*METHODS[method](row), "tracking=none"],
             RUN_SHARDS if "reddit" in row else 1)
            for row in rows for method in methods]


def log_jobs(rows: list[str]) -> None:
    """Send every part of every cell that finished a run to this store, each cell under its
    own run name (a folder logged before is skipped by `gnnq log`)."""
    for row in rows:
        for method in METHODS:
            cell = folder(row, method)
            parts = [p for p, s in zip(job_folders(cell), summaries(cell)) if s["runs"]]
            if parts:
                subprocess.run([*gnnq_command(), "log", *map(str, parts), "--uri", STORE,
                                "--experiment", "comparison", "--run-name",
                                f"{row}_{cell.name}"], cwd=ROOT, check=True)


def _mean(runs: list[dict], key: str = "test") -> float:
    return mean_std(r[key] for r in runs)[0]


def _provisional(runs: list[dict]) -> str:
    """On fewer than 10 runs, which ones the verdict rests on."""
    if len(runs) >= 10:
        return ""
    kept = ", ".join(str(k) for k in sorted(r["run"] for r in runs))
    return f" (provisional: run{'s' if len(runs) > 1 else ''} {kept} of 10)"


def dq8_check(row: str) -> str:
    fp32, dq8 = on_common_runs(*(pooled_runs(folder(row, m)) for m in ("FP32", "DQ-INT8")))
    if not fp32 or not dq8:
        return "not run yet"
    drop = _mean(dq8) - _mean(fp32)
    return f"{drop:+.2f} {'✅' if drop >= -DQ8_MAX_DROP else '❌'}{_provisional(dq8)}"


def a2q_check(row: str) -> tuple[str, str, str, str]:
    """DQ-INT4 bits, A²Q bits, A²Q − DQ-INT4 and the verdict, on their common runs."""
    dq4, a2q = on_common_runs(*(pooled_runs(folder(row, m)) for m in ("DQ-INT4", "A²Q")))
    if not dq4 or not a2q:
        return "", "", "", "not run yet"
    dq4_bits, a2q_bits = _mean(dq4, "avg_bits"), _mean(a2q, "avg_bits")
    better = a2q_bits < dq4_bits and _mean(a2q) >= _mean(dq4)
    return (f"{dq4_bits:.2f}", f"{a2q_bits:.2f}", f"{_mean(a2q) - _mean(dq4):+.2f}",
            f"{'✅' if better else '❌ (see notes)'}{_provisional(a2q)}")


def checks() -> str:
    """The acceptance checks, each row's verdict in a sentence; jobs still running are
    compared on the runs (seeds/folds) they have in common, marked provisional."""
    lines = ["## Checks", "",
             "| row | DQ-INT8 − FP32 (pp) | DQ-INT4 bits | A²Q bits | A²Q − DQ-INT4 (pp) | "
             "A²Q: fewer bits and at least as accurate as DQ-INT4 |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        lines.append(f"| {row} | {dq8_check(row)} | {' | '.join(a2q_check(row))} |")
    lines += ["", f"DQ-INT4 GIN-REDDIT-BINARY: {dq4_reddit()}."]
    return "\n".join(lines)


def dq4_reddit() -> str:
    """The DQ-INT4 GIN-REDDIT-BINARY floor's verdict; on fewer than 10 folds, which ones."""
    runs = pooled_runs(folder("gin_reddit_binary", "DQ-INT4"))
    if not runs:
        return "not run yet"
    ok = _mean(runs) >= DQ4_REDDIT_MIN
    return (f"{fmt(runs, 'test')} (floor {DQ4_REDDIT_MIN}: {'✅' if ok else '❌'})"
            f"{_provisional(runs)}")


def folds_table(row: str) -> str:
    """Every kept record of the row, fold by fold: test at the best validation epoch / best
    test, per method; "–" where a fold has not finished. Built from the job records, so it
    says exactly what the row's means rest on while its cells are still running."""
    runs = {m: pooled_runs(folder(row, m)) for m in METHODS}
    by_fold = {m: {r["run"]: r for r in runs[m]} for m in METHODS}

    def line(label, cells) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [f"## {row}, fold by fold", "",
             "test @ best val / best test, %. Each fold's record is in "
             f"`results/jobs/comparison/{row}/<method>/`.", "",
             line("fold", METHODS), "|---|" + "---|" * len(METHODS)]
    for fold in range(10):
        lines.append(line(fold, (f"{r['test']:.2f} / {r['best_test']:.2f}"
                                 if (r := by_fold[m].get(fold)) else "–" for m in METHODS)))
    lines += [line("folds kept", (str(len(runs[m])) for m in METHODS)),
              line("test @ best val", (fmt(runs[m], "test") for m in METHODS)),
              line("avg bits", (fmt(runs[m], "avg_bits") for m in METHODS))]
    return "\n".join(lines)


def report() -> None:
    """`gnnq report` over the comparison's store (paths relative to the repository, so the
    command the report prints is the one to type), then the checks and the notes."""
    store = STORE.replace(f"{ROOT}/", "")
    subprocess.run([*gnnq_command(), "report", "--uri", store, "--experiment", "comparison",
                    "--out", "results/comparison", "--title",
                    "FP32, Degree-Quant, A²Q and smoothness-aware QLR under one protocol"],
                   cwd=ROOT, check=True)
    md = RESULTS / "comparison.md"
    text = (md.read_text() + "\n" + checks() + "\n\n"
            + folds_table("gin_reddit_binary") + "\n")
    text += ("\nThe jobs behind this table: `python scripts/comparison.py` (it runs the missing "
             "ones, then the command above).\n")
    notes = RESULTS / "comparison_notes.md"
    if notes.exists():
        text += "\n" + notes.read_text()
    md.write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--skip-reddit", action="store_true",
                        help="leave out GIN-REDDIT-BINARY (several core-hours per method)")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at a time")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    rows = [r for r in args.rows if not (args.skip_reddit and "reddit" in r)]
    restore_jobs()
    if not args.report_only:
        run_all(jobs(rows, args.methods), args.parallel)
    log_jobs(list(ROWS))
    report()


if __name__ == "__main__":
    main()
