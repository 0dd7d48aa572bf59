"""Graph-level models: convs, a global readout and a two-layer quantized MLP head.

Layer specs are named after module paths: ``convs.k`` (and ``convs.k.nn.p`` for the linears
of a GIN MLP, which share their conv's ``index``), then ``head.0`` and ``head.1`` with
indices ``layers`` and ``layers + 1``. ``num_layers`` counts the convs and the two head
linears, so ``index == num_layers - 1`` is the output layer. The optional input embedding
(categorical node features such as ZINC atom types) stays FP32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool
from torch_geometric.nn.inits import reset

from gnnq.models.gcn_conv import QGCNConv
from gnnq.models.gin_conv import QGINConv
from gnnq.models.mlp import quantized_mlp
from gnnq.models.qlinear import QLinear
from gnnq.models.utils import spec_quantizers
from gnnq.quant.base import QuantizerFactory, RoleQuantizers

POOLINGS = {"sum": global_add_pool, "mean": global_mean_pool, "max": global_max_pool}


class _GraphModel(nn.Module):
    """Embedding (optional) - convs - readout - ``QLinear - ReLU - dropout - QLinear``.

    Subclasses fill :attr:`convs` (and what runs after each conv, in :meth:`_layer`), then
    call :meth:`_add_head`.
    A single output (regression) is returned as ``[B]``, otherwise ``[B, C]``.
    """

    head: nn.ModuleList

    def __init__(self, out_channels: int, hidden: int, dropout: float, pooling: str,
                 num_embeddings: Optional[int]) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {sorted(POOLINGS)}")
        self.out_channels = out_channels
        self.dropout = dropout
        self.pooling = pooling
        self.embedding = nn.Embedding(num_embeddings, hidden) if num_embeddings else None
        self.convs = nn.ModuleList()

    def _add_head(self, make: Callable[..., RoleQuantizers], hidden: int, layers: int) -> None:
        # Built after the convs, so the factory sees the layers in forward order.
        self.head = nn.ModuleList(
            QLinear(i, o, quantizers=make(f"head.{k}", "linear", layers + k, i, o))
            for k, (i, o) in enumerate([(hidden, hidden), (hidden, self.out_channels)]))

    def reset_parameters(self) -> None:
        if self.embedding is not None:
            self.embedding.reset_parameters()
        reset(self.convs)
        reset(self.head)

    def _layer(self, k: int, x: Tensor, edge_index: Tensor,
               batch: Optional[Tensor]) -> Tensor:
        return self.convs[k](x, edge_index, batch)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        if self.embedding is not None:
            x = self.embedding(x.view(-1))  # categorical features: [N] or [N, 1] indices
        for k in range(len(self.convs)):
            x = self._layer(k, x, edge_index, batch)
        x = POOLINGS[self.pooling](x, batch)
        x = F.relu(self.head[0](x))
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.head[1](x)
        return x.squeeze(-1) if self.out_channels == 1 else x


class GraphGIN(_GraphModel):
    """The Degree-Quant / A²Q graph-level GIN (5 layers × 64 on REDDIT-BINARY).

    Each layer's MLP is ``QLinear - ReLU - ... - QLinear - ReLU`` (``mlp_layers`` linears)
    followed by BatchNorm when ``batch_norm`` is set.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, layers: int = 5,
                 mlp_layers: int = 2, dropout: float = 0.5, pooling: str = "sum",
                 batch_norm: bool = True, train_eps: bool = False,
                 num_embeddings: Optional[int] = None,
                 quantizers: Optional[QuantizerFactory] = None) -> None:
        make = spec_quantizers(quantizers, level="graph", num_layers=layers + 2)
        super().__init__(out_channels, hidden, dropout, pooling, num_embeddings)
        width = hidden if num_embeddings else in_channels
        for k in range(layers):
            mlp = quantized_mlp(
                [width] + [hidden] * mlp_layers,
                lambda pos, a, b, k=k: make(f"convs.{k}.nn.{pos}", "linear", k, a, b),
                act_last=True, batch_norm=batch_norm)
            self.convs.append(QGINConv(mlp, quantizers=make(f"convs.{k}", "gin", k, width,
                                                            hidden),
                                       train_eps=train_eps))
            width = hidden
        self._add_head(make, hidden, layers)


class GraphGCN(_GraphModel):
    """Graph-level GCN: ``conv - BatchNorm (if batch_norm) - ReLU`` per layer."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, layers: int = 4,
                 dropout: float = 0.5, pooling: str = "mean", batch_norm: bool = True,
                 num_embeddings: Optional[int] = None,
                 quantizers: Optional[QuantizerFactory] = None) -> None:
        make = spec_quantizers(quantizers, level="graph", num_layers=layers + 2)
        super().__init__(out_channels, hidden, dropout, pooling, num_embeddings)
        width = hidden if num_embeddings else in_channels
        for k in range(layers):
            # Mini-batches change the graph on every call: nothing is cached.
            self.convs.append(QGCNConv(
                width, hidden, quantizers=make(f"convs.{k}", "gcn", k, width, hidden)))
            width = hidden
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(hidden) if batch_norm else nn.Identity() for _ in range(layers))
        self._add_head(make, hidden, layers)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset(self.norms)

    def _layer(self, k: int, x: Tensor, edge_index: Tensor,
               batch: Optional[Tensor]) -> Tensor:
        return F.relu(self.norms[k](self.convs[k](x, edge_index, batch)))
