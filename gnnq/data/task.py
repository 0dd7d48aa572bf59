"""What a loaded dataset hands the trainer: the graph(s), how to split them, and the metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch_geometric.data import Data


def tested_fold(run: int, folds: int) -> int:
    """The fold repeat ``run`` tests on: runs cycle through the folds."""
    return run % folds


@dataclass
class Split:
    """Index tensors (long) into the task's nodes (node level) or graphs (graph level)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


@dataclass
class Task:
    """One dataset, ready to train on.

    ``level`` is ``"node"`` (``graph`` is the single graph, full-batch) or ``"graph"``
    (``graphs`` is a sequence of ``Data``, mini-batched). ``split(run, seed)`` gives the
    split of repeat ``run`` (a fixed split, a seeded random split or a CV fold).
    ``metric`` is ``"acc"`` (classification, higher is better) or ``"mae"`` (regression,
    lower is better). ``num_embeddings`` is set when node features are categorical indices
    (ZINC atom types) that the model must embed instead of a dense ``x``.
    """

    name: str
    level: Literal["node", "graph"]
    num_features: int
    num_classes: int
    metric: Literal["acc", "mae"]
    split: Callable[[int, int], Split]
    graph: Optional[Data] = None
    graphs: Optional[Sequence[Data]] = None
    num_embeddings: Optional[int] = None
    num_folds: Optional[int] = None

    def fold(self, run: int) -> Optional[int]:
        """The CV fold repeat ``run`` tests on (``None`` without cross-validation)."""
        return tested_fold(run, self.num_folds) if self.num_folds else None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "acc"
