"""Training strategies: how a step turns the task loss into parameter gradients.

The trainer does not know which quantizer it trains; a strategy may (A²Q's Local Gradient
is one). Every strategy also decides the optimizer's parameter groups, so quantizer
parameters can get their own learning rates without the trainer knowing about them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gnnq.config import StrategyConfig, TrainerConfig
from gnnq.errors import choice_error
from gnnq.quant.base import Quantizer


class TaskGradient:
    """Plain back-propagation of the task loss (plus any penalty the model's quantizers add)."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    def param_groups(self, model: nn.Module, trainer: TrainerConfig) -> list[dict[str, Any]]:
        """Model weights at ``trainer.lr``/``weight_decay``; each quantizer may ask for its own
        groups through ``param_groups()``, otherwise its parameters train at ``trainer.lr``
        with no weight decay (decaying a step size or bitwidth toward 0 is never intended)."""
        quantizer_params: set[int] = set()
        groups: list[dict[str, Any]] = []
        for module in model.modules():
            if isinstance(module, Quantizer):
                params = list(module.parameters(recurse=False))
                quantizer_params.update(id(p) for p in params)
                own = getattr(module, "param_groups", None)
                groups.extend(own() if own else [{"params": params, "weight_decay": 0.0}])
        weights = [p for p in model.parameters() if id(p) not in quantizer_params]
        groups.insert(0, {"params": weights, "weight_decay": trainer.weight_decay})
        return [g for g in groups if g["params"]]

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        loss.backward()


STRATEGIES = {"task_gradient": TaskGradient}


def build_strategy(cfg: StrategyConfig) -> TaskGradient:
    if cfg.name not in STRATEGIES:
        raise choice_error("strategy", cfg.name, STRATEGIES)
    return STRATEGIES[cfg.name](cfg)
