"""Graph isomorphism convolution (Xu et al.) with quantized message passing."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.inits import reset
from torch_geometric.utils import remove_self_loops, spmm

from gnnq.models.utils import reset_quantizers, sparse_adj_t
from gnnq.quant.base import RoleQuantizers, share_graph


class QGINConv(MessagePassing):
    r"""The graph isomorphism operator from `"How Powerful are Graph Neural Networks?"
    <https://arxiv.org/abs/1810.00826>`_, quantized stage by stage,

    .. math::
        \mathbf{x}^{\prime}_i = h_{\mathbf{\Theta}}\Big(Q_{\text{update}}\big(
        (1 + \epsilon)\,\tilde{\mathbf{x}}_i + Q_{\text{aggregate}}\big(\textstyle
        \sum_{j \in \mathcal{N}(i)} Q_{\text{message}}(\tilde{\mathbf{x}}_j)\big)\big)\Big),
        \qquad \tilde{\mathbf{x}} = Q_{\text{input}}(\mathbf{x}),

    where :math:`\mathcal{N}(i)` excludes :math:`i` (self-loops in ``edge_index`` are
    dropped; the node enters through the :math:`(1+\epsilon)` term instead). Node-wise:

    - :meth:`message`: :math:`Q_{\text{message}}(\tilde{\mathbf{x}}_j)`
    - :meth:`aggregate`: :math:`Q_{\text{aggregate}}(\sum_j \cdot)`
    - :meth:`update`: :math:`Q_{\text{update}}((1+\epsilon)\tilde{\mathbf{x}}_i + \cdot)`,
      the tensor fed to the MLP :math:`h_{\mathbf{\Theta}}`

    The MLP's :class:`~gnnq.models.qlinear.QLinear` layers carry their own ``input``,
    ``weight`` and ``feature`` quantizers. Per-edge messages are only built when a
    ``message`` quantizer needs them; otherwise the neighbour sum is one sparse product.
    Quantizers that ``uses_graph`` (the MLP's included) get this pass's graph
    (:func:`~gnnq.quant.base.share_graph`) and, for ``message``, each row's target node.

    Args:
        nn (torch.nn.Module): The MLP :math:`h_{\mathbf{\Theta}}`, mapping
            :math:`(*, F_{in})` to :math:`(*, F_{out})`.
        quantizers (RoleQuantizers, optional): The layer's quantizers by role (``input``,
            ``message``, ``aggregate``, ``update``). (default: :obj:`None`, FP32)
        eps (float, optional): (Initial) :math:`\epsilon`. (default: :obj:`0.`)
        train_eps (bool, optional): Learn :math:`\epsilon`. (default: :obj:`False`)
        cached (bool, optional): Build the sparse adjacency on the first call and reuse it.
            Only for a fixed full-batch graph. (default: :obj:`False`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})`
        - **quantizers see:** input, aggregate, update :math:`(|\mathcal{V}|, F_{in})`;
          message :math:`(|\mathcal{E}|, F_{in})` (edges without self-loops)
    """

    # The neighbour graph without self-loops: edge_index, or the CSR adj_t for the fused sum.
    _cached_adj: Optional[Tensor]

    def __init__(self, nn: nn.Module, quantizers: Optional[RoleQuantizers] = None,
                 eps: float = 0.0, train_eps: bool = False, cached: bool = False) -> None:
        super().__init__(aggr="add")
        self.nn = nn
        self.q = quantizers if quantizers is not None else RoleQuantizers()
        self.initial_eps = eps
        self.cached = cached
        if train_eps:
            self.eps = torch.nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("eps", torch.empty(1))
        self._cached_adj = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset(self.nn)
        self.eps.data.fill_(self.initial_eps)
        reset_quantizers(self.q)
        self._cached_adj = None

    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        share_graph(self, edge_index, x.size(0), batch)
        x = self.q("input", x)
        adj = self._neighbour_graph(edge_index, x.size(0), x.dtype)
        return self.nn(self.propagate(adj, x=x))

    def _neighbour_graph(self, edge_index: Tensor, num_nodes: int,
                         dtype: torch.dtype) -> Tensor:
        if self._cached_adj is not None:
            return self._cached_adj
        edge_index, _ = remove_self_loops(edge_index)
        if not self.q.has("message"):
            edge_index = sparse_adj_t(edge_index, None, num_nodes, dtype)
        if self.cached:
            self._cached_adj = edge_index
        return edge_index

    def __getstate__(self) -> dict:
        # Copies and pickles drop the cache: it is derived data, and CSR tensors can't be copied.
        return {**super().__getstate__(), "_cached_adj": None}

    def message(self, x_j: Tensor, index: Tensor) -> Tensor:
        return self.q("message", x_j, index=index)

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Optional[Tensor] = None,
                  dim_size: Optional[int] = None) -> Tensor:
        return self.q("aggregate", super().aggregate(inputs, index, ptr, dim_size))

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor) -> Tensor:
        return self.q("aggregate", spmm(adj_t, x, reduce="sum"))

    def update(self, inputs: Tensor, x: Tensor) -> Tensor:
        return self.q("update", inputs + (1 + self.eps) * x)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(nn={self.nn})"
