"""A²Q's bit analysis of a trained model: per-layer bit histograms and bits vs in-degree.

The paper's claim is that learned bits follow the aggregation: nodes with a larger in-degree
get more bits. For every learned-bit quantizer this writes

- ``bit_histograms.png``: nodes per effective bitwidth, one panel per layer;
- ``bits_vs_degree.png``: each node's bits against its in-degree, with the mean in-degree
  per bitwidth (the official ``analysis_bit`` table) and Spearman's rank correlation;
- ``bit_analysis.json``: the same numbers.

Graph-level models are analysed on one batch of the task's first ``GRAPHS`` graphs (their
NNS selections); quantizers whose rows are not nodes (readout over pooled graphs) get a
histogram only.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import degree

from gnnq.data.task import Task
from gnnq.quant.a2q import A2QQuantizer

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

GRAPHS = 256


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN if either is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
    return (first + (counts - 1) / 2)[inverse]


@torch.no_grad()
def node_bits(model: nn.Module, task: Task) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Effective bits per row of each learned-bit quantizer (by module path) after one
    evaluation pass, and the in-degree of every node of that pass."""
    model.eval()
    if task.level == "node":
        data = task.graph
        model(data.x, data.edge_index)
    else:
        data = Batch.from_data_list(list(task.graphs[:GRAPHS]))
        model(data.x, data.edge_index, data.batch)
    in_degree = degree(data.edge_index[1], data.num_nodes).numpy()
    bits = {name: q.effective_bits().numpy() for name, q in model.named_modules()
            if isinstance(q, A2QQuantizer) and q.learn_bits and q.seen}
    return bits, in_degree


def write_bit_analysis(model: nn.Module, task: Task, folder: Path) -> list[Path]:
    bits, in_degree = node_bits(model, task)
    if not bits:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, b in bits.items():
        levels = np.unique(b)
        layer = {"mean_bits": float(b.mean()),
                 "nodes_per_bits": {int(k): int((b == k).sum()) for k in levels}}
        if b.size == in_degree.size:
            layer["mean_in_degree_per_bits"] = {int(k): float(in_degree[b == k].mean())
                                                for k in levels}
            layer["spearman_bits_in_degree"] = spearman(b, in_degree)
        stats[name] = layer
    paths = [folder / "bit_analysis.json", folder / "bit_histograms.png"]
    paths[0].write_text(json.dumps(stats, indent=2))

    fig, axes = plt.subplots(1, len(bits), figsize=(4 * len(bits), 3.2), squeeze=False)
    for ax, (name, b) in zip(axes[0], bits.items()):
        counts = stats[name]["nodes_per_bits"]
        ax.bar(list(counts), list(counts.values()), color="tab:blue")
        ax.set(title=f"{name}\nmean {b.mean():.2f} bits", xlabel="effective bits",
               ylabel="rows (nodes)")
    _save(fig, paths[1])

    with_degree = [name for name in bits if "spearman_bits_in_degree" in stats[name]]
    if with_degree:
        fig, axes = plt.subplots(1, len(with_degree), figsize=(4 * len(with_degree), 3.2),
                                 squeeze=False)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, in_degree.size)
        for ax, name in zip(axes[0], with_degree):
            per_bits = stats[name]["mean_in_degree_per_bits"]
            ax.scatter(in_degree + 1, bits[name] + jitter, s=3, alpha=0.3, color="tab:gray")
            ax.plot(np.array(list(per_bits.values())) + 1, list(per_bits), "o-",
                    color="tab:red", label="mean in-degree")
            ax.set(xscale="log", xlabel="in-degree + 1", ylabel="effective bits",
                   title=f"{name}\nSpearman {stats[name]['spearman_bits_in_degree']:.2f}")
            ax.legend(loc="lower right", fontsize=7)
        paths.append(folder / "bits_vs_degree.png")
        _save(fig, paths[-1])
    return paths


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
