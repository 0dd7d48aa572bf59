"""``gnnq report``: comparison tables and plots from any MLflow store's gnnq runs.

One job (an MLflow run with final metrics) already holds the mean ± std over its seeds or
folds. Jobs are grouped by dataset, model, method and bit setting; a group of several jobs
is pooled exactly (the mean and sample std of all their runs together, from each job's
mean, std and run count), so ten one-seed jobs and one ten-seed job give the same row.
"""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gnnq.errors import GnnqError
from gnnq.tracking.mlflow_tracker import PARENT_RUN_FILE, RUN_ID, open_client

RULES = ("test", "best_test", "val")
# What names a job's precision, first match wins (A²Q's KB target overrides its bit budget).
BIT_PARAMS = ("quant.bits", "quant.memory_target_kb", "quant.bit_budget", "quant.weight_bits")


@dataclass
class Stat:
    """Runs pooled so far: count, mean and sum of squared deviations (Chan et al.)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, n: int, mean: float, std: float) -> None:
        if n <= 0 or not math.isfinite(mean):
            return
        m2 = (std ** 2) * (n - 1) if n > 1 and math.isfinite(std) else 0.0
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    def __str__(self) -> str:
        return "–" if self.n == 0 else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class Group:
    dataset: str
    model: str
    method: str
    bits: str
    config: str  # task_name: pinned experiments with other settings get their own row
    metric: str = "acc"
    jobs: int = 0
    stats: dict[str, Stat] = field(default_factory=lambda: {r: Stat() for r in RULES})
    avg_bits: Stat = field(default_factory=Stat)
    compression: Stat = field(default_factory=Stat)


def _metric_kind(metrics: dict[str, float]) -> Optional[str]:
    for kind in ("acc", "mae"):
        if f"test_{kind}" in metrics:
            return kind
    return None


def group_runs(runs) -> list[Group]:
    """Group MLflow ``Run`` objects (finished gnnq jobs) into table rows."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        kind = _metric_kind(metrics)
        if kind is None or tags.get("gnnq.kind") == "sweep":
            continue
        bits = next((f"{p.split('.')[-1]}={params[p]}" for p in BIT_PARAMS
                     if params.get(p, "None") != "None"), "fp32")
        key = (tags.get("dataset", params.get("dataset.name", "?")),
               tags.get("model", params.get("model.name", "?")),
               tags.get("method", "fp32"), bits, params.get("task_name", "-"), kind)
        group = groups.setdefault(key, Group(*key))
        n = int(metrics.get("runs_completed", 1))
        group.jobs += 1
        for rule in RULES:
            group.stats[rule].add(n, metrics.get(f"{rule}_{kind}", math.nan),
                                  metrics.get(f"{rule}_{kind}_std", 0.0))
        group.avg_bits.add(n, metrics.get("avg_bits", math.nan), metrics.get("avg_bits_std", 0.0))
        group.compression.add(n, metrics.get("compression_ratio", math.nan), 0.0)
    return sorted(groups.values(), key=lambda g: (g.dataset, g.model, -g.avg_bits.mean, g.method))


def markdown(groups: list[Group], title: str, command: str) -> str:
    lines = [f"# {title}", "", f"Regenerate: `{command}`", "",
             "Mean ± sample std over every run (seed or fold) of the grouped jobs. "
             "*test* is the test metric at the best validation epoch (primary protocol); "
             "*best test* is the best test metric over epochs (the A²Q code's protocol); "
             "accuracies in %, MAE raw. `avg_bits`/`compression` as defined in "
             "`gnnq/quant/cost.py`.", "",
             "| dataset | model | method | bits | config | metric | runs | test | best test | "
             "val | avg_bits | compression | jobs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        lines.append(
            f"| {g.dataset} | {g.model} | {g.method} | {g.bits} | {g.config} | {g.metric} | "
            f"{g.stats['test'].n} | {g.stats['test']} | {g.stats['best_test']} | "
            f"{g.stats['val']} | {g.avg_bits.mean:.2f} | {g.compression.mean:.2f}x | {g.jobs} |")
    return "\n".join(lines) + "\n"


def plot(groups: list[Group], path: Path, title: str) -> None:
    """Accuracy (primary protocol) against average bits, one panel per dataset/model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(g.dataset, g.model) for g in groups})
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    methods = sorted({g.method for g in groups})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (dataset, model) in zip(axes.flat, panels):
        for g in (g for g in groups if (g.dataset, g.model) == (dataset, model)):
            test = g.stats["test"]
            if g.method == "fp32":
                ax.axhline(test.mean, color=colors[g.method], ls="--", label="fp32")
                continue
            ax.errorbar(g.avg_bits.mean, test.mean, yerr=test.std, fmt="o", capsize=3,
                        color=colors[g.method], label=f"{g.method} {g.bits}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("average bits")
        ax.set_ylabel("test (at best val)")
        ax.set_title(f"{model} on {dataset}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search(uri: str, experiments: list[str], parent: Optional[str], tags: list[str]) -> list:
    client = open_client(uri, 10.0, must_exist=True)
    found = {e.name: e.experiment_id for e in client.search_experiments()}
    names = experiments or list(found)
    missing = [n for n in names if n not in found]
    if missing:
        raise GnnqError(f"Unknown MLflow experiment(s) {', '.join(map(repr, missing))} in "
                        f"{uri}. Experiments there: {', '.join(sorted(found)) or 'none'}.")
    clauses = ["attributes.status = 'FINISHED'"]
    if parent:
        if not RUN_ID.match(parent):
            raise GnnqError(f"Invalid --parent {parent!r}: an MLflow run id is 32 hex digits (a "
                            f"sweep's is in its folder's {PARENT_RUN_FILE} and in the UI).")
        clauses.append(f"tags.mlflow.parentRunId = '{parent}'")
    for tag in tags:
        if "=" not in tag:
            raise GnnqError(f"Invalid --tag {tag!r}: write it as KEY=VALUE (e.g. dataset=cora).")
        key, value = tag.split("=", 1)
        quote = next((q for q in ("'", '"') if q not in value), None)
        if "`" in key or quote is None:
            raise GnnqError(f"Invalid --tag {tag!r}: MLflow's filter syntax takes no backtick in "
                            f"the key and a value with single or double quotes, not both.")
        clauses.append(f"tags.`{key}` = {quote}{value}{quote}")
    runs, token = [], None
    while True:
        page = client.search_runs([found[n] for n in names], " and ".join(clauses),
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gnnq report", description="Table (Markdown) and plot (PNG) of gnnq runs, "
        "grouped by dataset/model/method/bits, from any MLflow tracking store.")
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--experiment", action="append", default=[],
                        help="MLflow experiment name (repeatable; default: all)")
    parser.add_argument("--parent", help="only the child runs of this sweep's parent run id")
    parser.add_argument("--tag", action="append", default=[], help="KEY=VALUE filter (repeatable)")
    parser.add_argument("--out", default="report", help="output path without suffix: writes "
                        "OUT.md and OUT.png")
    parser.add_argument("--title", default="gnnq comparison")
    options = parser.parse_args(args)
    runs = search(options.uri, options.experiment, options.parent, options.tag)
    groups = group_runs(runs)
    if not groups:
        raise GnnqError(f"No finished gnnq runs matched in {options.uri} (experiments: "
                        f"{options.experiment or 'all'}, parent: {options.parent or 'any'}, "
                        f"tags: {options.tag or 'none'}).")
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["gnnq", "report", *args])
    out.with_suffix(".md").write_text(markdown(groups, options.title, command))
    plot(groups, out.with_suffix(".png"), options.title)
    print(f"gnnq: {len(groups)} rows from {sum(g.jobs for g in groups)} jobs -> "
          f"{out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0
