"""Task metrics and the mean ± std summary over runs (or folds)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F


def task_loss(out: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "mae":
        return F.l1_loss(out.view(-1), y.view(-1).float())
    return F.cross_entropy(out, y.view(-1))


@torch.no_grad()
def metric_sums(out: torch.Tensor, y: torch.Tensor, metric: str) -> tuple[float, int]:
    """Sum of the per-example metric and the example count (so batches combine exactly)."""
    y = y.view(-1)
    if metric == "mae":
        return (out.view(-1) - y.float()).abs().sum().item(), y.numel()
    return (out.argmax(dim=-1) == y).sum().item(), y.numel()


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as the OGB logger reports."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
