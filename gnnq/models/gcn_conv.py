"""Graph convolution (Kipf & Welling) with a fake quantizer at every stage."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import add_remaining_self_loops, degree, spmm

from gnnq.models.qlinear import QLinear
from gnnq.models.utils import LINEAR_ROLES, reset_quantizers, sparse_adj_t, split_roles
from gnnq.quant.base import RoleQuantizers, share_graph


def gcn_norm(edge_index: Tensor, num_nodes: int,
             dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    r"""Adds missing self-loops and returns the edge weights
    :math:`\hat{d}_j^{-1/2}\hat{d}_i^{-1/2}` of :math:`\hat{D}^{-1/2}\hat{A}\hat{D}^{-1/2}`."""
    edge_index, _ = add_remaining_self_loops(edge_index, num_nodes=num_nodes)
    src, dst = edge_index
    # Every node has its self-loop, so no degree is zero.
    deg_inv_sqrt = degree(dst, num_nodes, dtype=dtype).pow(-0.5)
    return edge_index, deg_inv_sqrt[src] * deg_inv_sqrt[dst]


class QGCNConv(MessagePassing):
    r"""The graph convolution from `"Semi-supervised Classification with Graph Convolutional
    Networks" <https://arxiv.org/abs/1609.02907>`_, quantized stage by stage,

    .. math::
        \mathbf{X}^{\prime} = Q_{\text{update}}\Big(Q_{\text{aggregate}}\big(
        \hat{\mathbf{D}}^{-1/2}\hat{\mathbf{A}}\hat{\mathbf{D}}^{-1/2}\,
        Q_{\text{feature}}(Q_{\text{input}}(\mathbf{X})\,Q_{\text{weight}}(\mathbf{W})^{\top})
        \big) + \mathbf{b}\Big),

    with :math:`\hat{\mathbf{A}} = \mathbf{A} + \mathbf{I}`. Node-wise, with
    :math:`\mathbf{h} = Q_{\text{feature}}(\cdot)` the transformed features:

    - :meth:`message`: :math:`\mathbf{m}_{j\to i} = Q_{\text{message}}\big(
      \hat{d}_j^{-1/2}\hat{d}_i^{-1/2}\,\mathbf{h}_j\big)`
    - :meth:`aggregate`: :math:`\mathbf{a}_i = Q_{\text{aggregate}}\big(\sum_{j \in
      \mathcal{N}(i)\cup\{i\}} \mathbf{m}_{j\to i}\big)`
    - :meth:`update`: :math:`\mathbf{x}^{\prime}_i = Q_{\text{update}}(\mathbf{a}_i +
      \mathbf{b})`

    The ``input``, ``weight`` and ``feature`` roles live in :attr:`lin`. Per-edge messages
    are only built when a ``message`` quantizer needs them; otherwise message and aggregate
    are one sparse product (:meth:`message_and_aggregate`). The normalisation coefficients
    stay FP32. Quantizers that ``uses_graph`` get this pass's graph
    (:func:`~gnnq.quant.base.share_graph`) and, for ``message``, each row's target node.

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        quantizers (RoleQuantizers, optional): The layer's quantizers by role.
            (default: :obj:`None`, FP32)
        cached (bool, optional): Compute the normalised adjacency on the first call and reuse
            it. Only for a fixed full-batch graph (transductive node tasks).
            (default: :obj:`False`)
        bias (bool, optional): Learn an additive bias. (default: :obj:`True`)
        input_dropout (float, optional): Dropout on the input after its quantizer, in
            training (:class:`~gnnq.models.qlinear.QLinear`). (default: :obj:`0.`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})`
        - **quantizers see:** input :math:`(|\mathcal{V}|, F_{in})`; weight
          :math:`(F_{out}, F_{in})`; feature, aggregate, update
          :math:`(|\mathcal{V}|, F_{out})`; message :math:`(|\mathcal{E}| + |\mathcal{V}|,
          F_{out})` (edges with self-loops)
    """

    # (edge_index, weights) for per-edge messages, or (CSR adj_t, None) for the fused product.
    _cached_graph: Optional[tuple[Tensor, Optional[Tensor]]]

    def __init__(self, in_channels: int, out_channels: int,
                 quantizers: Optional[RoleQuantizers] = None, cached: bool = False,
                 bias: bool = True, input_dropout: float = 0.0) -> None:
        super().__init__(aggr="add")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.cached = cached
        lin_quantizers, self.q = split_roles(quantizers, LINEAR_ROLES)
        self.lin = QLinear(in_channels, out_channels, bias=False, quantizers=lin_quantizers,
                           weight_initializer="glorot", input_dropout=input_dropout)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self._cached_graph = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        reset_quantizers(self.q)
        self._cached_graph = None

    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        share_graph(self, edge_index, x.size(0), batch)
        adj, weight = self._normalized_graph(edge_index, x.size(0), x.dtype)
        h = self.lin(x)
        return self.propagate(adj, x=h, weight=weight)

    def _normalized_graph(self, edge_index: Tensor, num_nodes: int,
                          dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
        if self._cached_graph is not None:
            return self._cached_graph
        edge_index, weight = gcn_norm(edge_index, num_nodes, dtype)
        if self.q.has("message"):
            graph = (edge_index, weight)
        else:
            graph = (sparse_adj_t(edge_index, weight, num_nodes, dtype), None)
        if self.cached:
            self._cached_graph = graph
        return graph

    def __getstate__(self) -> dict:
        # Copies and pickles drop the cache: it is derived data, and CSR tensors can't be copied.
        return {**super().__getstate__(), "_cached_graph": None}

    def message(self, x_j: Tensor, weight: Tensor, index: Tensor) -> Tensor:
        return self.q("message", weight.view(-1, 1) * x_j, index=index)

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Optional[Tensor] = None,
                  dim_size: Optional[int] = None) -> Tensor:
        return self.q("aggregate", super().aggregate(inputs, index, ptr, dim_size))

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor) -> Tensor:
        return self.q("aggregate", spmm(adj_t, x, reduce="sum"))

    def update(self, inputs: Tensor) -> Tensor:
        if self.bias is not None:
            inputs = inputs + self.bias
        return self.q("update", inputs)
