"""Training strategies: how a step turns the task loss into parameter gradients.

The trainer does not know which quantizer it trains; a strategy may (A²Q's Local Gradient
is one). Every strategy also decides the optimizer's parameter groups, so quantizer
parameters can get their own learning rates without the trainer knowing about them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from gnnq.config import StrategyConfig, TrainerConfig
from gnnq.errors import choice_error
from gnnq.quant.base import Quantizer


class TaskGradient:
    """Plain back-propagation of the task loss plus the quantization method's penalty."""

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

    def backward(self, loss: torch.Tensor, model: nn.Module,
                 penalty: Optional[torch.Tensor] = None) -> None:
        """Gradients of ``loss`` (the task's) and ``penalty`` (the method's, e.g. A²Q's
        memory term; kept apart because a strategy may route the two differently)."""
        (loss if penalty is None else loss + penalty).backward()


class LocalGradient(TaskGradient):
    """A²Q's Local Gradient (Zhu et al. 2023, §3.2): a quantizer that defines
    ``local_error()`` trains its own parameters (step sizes, bits) on that error instead of
    the task loss, since in semi-supervised node tasks most nodes get next to no task
    gradient. The penalty still reaches every parameter it depends on, and all other
    parameters, inputs' gradients included, see exactly the task gradient."""

    def backward(self, loss: torch.Tensor, model: nn.Module,
                 penalty: Optional[torch.Tensor] = None) -> None:
        local_loss, local_params = penalty, set()
        for module in model.modules():
            error = module.local_error() if isinstance(module, Quantizer) and hasattr(
                module, "local_error") else None
            if error is not None:
                local_loss = error if local_loss is None else local_loss + error
                local_params.update(id(p) for p in module.parameters())
        task_params = [p for p in model.parameters()
                       if p.requires_grad and id(p) not in local_params]
        loss.backward(inputs=task_params)
        if local_loss is not None:
            local_loss.backward()


STRATEGIES = {"task_gradient": TaskGradient, "local_gradient": LocalGradient}


def build_strategy(cfg: StrategyConfig) -> TaskGradient:
    if cfg.name not in STRATEGIES:
        raise choice_error("strategy", cfg.name, STRATEGIES)
    return STRATEGIES[cfg.name](cfg)
