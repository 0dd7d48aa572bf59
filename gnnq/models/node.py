"""Node-level models: full-batch GCN, GIN and GAT that return raw logits ``[N, C]``.

Each model asks the quantizer factory for every layer's quantizers with a
:class:`~gnnq.quant.base.LayerSpec` named after the layer's module path (``convs.k``, and
``convs.k.nn.p`` for the linears inside a GIN MLP, which share their conv's ``index``).
``num_layers`` is the number of convs, so ``index == num_layers - 1`` is the output layer.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from gnnq.models.gat_conv import QGATConv
from gnnq.models.gcn_conv import QGCNConv
from gnnq.models.gin_conv import QGINConv
from gnnq.models.mlp import quantized_mlp
from gnnq.models.utils import spec_quantizers
from gnnq.quant.base import QuantizerFactory


def _widths(in_channels: int, hidden: int, out_channels: int, layers: int) -> list[int]:
    return [in_channels] + [hidden] * (layers - 1) + [out_channels]


class _ConvStack(nn.Module):
    """``convs`` with ReLU and dropout between them; the last conv's output is returned.

    ``quantize_before_dropout`` (GCN, GAT): each conv drops its input after its input
    quantizer instead of the model before the conv (``QLinear.input_dropout``), so the
    quantizer learns its grid on the values it meets in evaluation, not on values scaled by
    ``1/(1-p)``. The same computation without an input quantizer; the official A²Q code
    drops first.
    """

    convs: nn.ModuleList
    dropout: float
    # Dropout that runs inside the convs (after their input quantizers) instead of here.
    dropout_in_convs: bool = False

    def reset_parameters(self) -> None:
        for conv in self.convs:
            conv.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for k, conv in enumerate(self.convs):
            if k > 0:
                x = F.relu(x)
                if not self.dropout_in_convs:
                    x = F.dropout(x, p=self.dropout, training=self.training)
            x = conv(x, edge_index)
        return x


class GCN(_ConvStack):
    """Kipf & Welling's GCN: ``conv - ReLU - dropout - ... - conv``.

    The defaults (2 layers, 16 hidden, dropout 0.5) are the paper's Cora model: with Adam
    (lr 0.01, weight decay 5e-4, 200 epochs) and row-normalised features it reaches
    81.5 ± 0.8 % test accuracy at the best validation epoch (10 seeds; paper: 81.5).
    ``cached`` keeps each layer's normalised adjacency: the graph must be the same on every
    call (full-batch, transductive).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, layers: int = 2,
                 dropout: float = 0.5, quantizers: Optional[QuantizerFactory] = None,
                 num_nodes: Optional[int] = None, cached: bool = True,
                 quantize_before_dropout: bool = False) -> None:
        super().__init__()
        self.dropout, self.dropout_in_convs = dropout, quantize_before_dropout
        make = spec_quantizers(quantizers, level="node", num_layers=layers, num_nodes=num_nodes)
        widths = _widths(in_channels, hidden, out_channels, layers)
        self.convs = nn.ModuleList(
            QGCNConv(i, o, quantizers=make(f"convs.{k}", "gcn", k, i, o), cached=cached,
                     input_dropout=dropout if quantize_before_dropout and k > 0 else 0.0)
            for k, (i, o) in enumerate(zip(widths[:-1], widths[1:])))


class GIN(_ConvStack):
    """GIN for node classification: ``conv - ReLU - dropout - ... - conv``.

    Each conv's MLP has ``mlp_layers`` QLinear layers (ReLU between, none after the last),
    the inner ones ``hidden`` wide.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, layers: int = 2,
                 dropout: float = 0.5, mlp_layers: int = 2, train_eps: bool = False,
                 quantizers: Optional[QuantizerFactory] = None,
                 num_nodes: Optional[int] = None, cached: bool = True) -> None:
        super().__init__()
        self.dropout = dropout
        make = spec_quantizers(quantizers, level="node", num_layers=layers, num_nodes=num_nodes)
        widths = _widths(in_channels, hidden, out_channels, layers)
        self.convs = nn.ModuleList()
        for k, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
            mlp = quantized_mlp(
                [i] + [hidden] * (mlp_layers - 1) + [o],
                lambda pos, a, b, k=k: make(f"convs.{k}.nn.{pos}", "linear", k, a, b))
            self.convs.append(QGINConv(mlp, quantizers=make(f"convs.{k}", "gin", k, i, o),
                                       train_eps=train_eps, cached=cached))


class GAT(_ConvStack):
    """Veličković et al.'s GAT: ``dropout - conv - ELU - dropout - ... - conv``.

    Hidden layers concatenate ``heads`` heads of ``hidden`` channels; the output layer
    averages ``out_heads`` heads. The defaults (8 × 8 hidden, 1 output head, dropout and
    attention dropout 0.6) are the paper's Cora model: with Adam (lr 0.005, weight decay
    5e-4, 200 epochs) and row-normalised features it reaches 82.6 ± 1.0 % test accuracy at
    the best validation epoch (10 seeds; paper: 83.0 ± 0.7). ``LayerSpec.out_dim`` is per
    head.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 8, layers: int = 2,
                 heads: int = 8, out_heads: int = 1, dropout: float = 0.6,
                 attn_dropout: float = 0.6, quantizers: Optional[QuantizerFactory] = None,
                 num_nodes: Optional[int] = None, quantize_before_dropout: bool = False) -> None:
        super().__init__()
        self.dropout, self.dropout_in_convs = dropout, quantize_before_dropout
        make = spec_quantizers(quantizers, level="node", num_layers=layers, num_nodes=num_nodes)
        self.convs = nn.ModuleList()
        width = in_channels
        for k in range(layers):
            last = k == layers - 1
            out, n_heads = (out_channels, out_heads) if last else (hidden, heads)
            self.convs.append(QGATConv(
                width, out, heads=n_heads, concat=not last, dropout=attn_dropout,
                quantizers=make(f"convs.{k}", "gat", k, width, out, heads=n_heads),
                input_dropout=dropout if quantize_before_dropout else 0.0))
            width = out * n_heads

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for k, conv in enumerate(self.convs):
            if k > 0:
                x = F.elu(x)
            # Dropout on every layer's input, the raw features included (as in the paper).
            if not self.dropout_in_convs:
                x = F.dropout(x, p=self.dropout, training=self.training)
            x = conv(x, edge_index)
        return x
