"""The quantized MLP of a GIN layer: QLinear layers with ReLU between them."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from gnnq.models.qlinear import QLinear
from gnnq.quant.base import RoleQuantizers


def quantized_mlp(channels: Sequence[int],
                  quantizers: Callable[[int, int, int], RoleQuantizers],
                  act_last: bool = False, batch_norm: bool = False) -> nn.Sequential:
    """``QLinear(c0, c1) - ReLU - ... - QLinear(c_{n-1}, c_n)``.

    ``quantizers(position, in_dim, out_dim)`` gives the role quantizers of the linear at
    ``position`` in the returned ``Sequential`` (so a model can name its ``LayerSpec`` after
    the module path). ``act_last`` appends a ReLU after the last linear and ``batch_norm`` a
    BatchNorm after everything (the Degree-Quant / A²Q graph-level GIN block).
    """
    modules: list[nn.Module] = []
    for k, (in_dim, out_dim) in enumerate(zip(channels[:-1], channels[1:])):
        if k > 0:
            modules.append(nn.ReLU())
        modules.append(QLinear(in_dim, out_dim, quantizers=quantizers(len(modules), in_dim,
                                                                      out_dim)))
    if act_last:
        modules.append(nn.ReLU())
    if batch_norm:
        modules.append(nn.BatchNorm1d(channels[-1]))
    return nn.Sequential(*modules)
