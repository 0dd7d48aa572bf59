"""Graph attention (Veličković et al.) with quantized features, attention and messages."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import add_self_loops, remove_self_loops, softmax

from gnnq.models.qlinear import QLinear
from gnnq.models.utils import LINEAR_ROLES, reset_quantizers, split_roles
from gnnq.quant.base import RoleQuantizers, share_graph


class QGATConv(MessagePassing):
    r"""The graph attention operator from `"Graph Attention Networks"
    <https://arxiv.org/abs/1710.10903>`_, quantized stage by stage. Per head, with
    :math:`\mathbf{h} = Q_{\text{feature}}(Q_{\text{input}}(\mathbf{X})\,
    Q_{\text{weight}}(\mathbf{W})^{\top})` and
    :math:`[\hat{\mathbf{a}}_s \,\|\, \hat{\mathbf{a}}_d] =
    Q_{\text{attention}}([\mathbf{a}_s \,\|\, \mathbf{a}_d])`:

    .. math::
        \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)\cup\{i\}}\Big(
        \mathrm{LeakyReLU}_{0.2}\big(Q_{\text{score}}(
        \hat{\mathbf{a}}_s^{\top}\mathbf{h}_j + \hat{\mathbf{a}}_d^{\top}\mathbf{h}_i)\big)\Big)

    .. math::
        \mathbf{x}^{\prime}_i = Q_{\text{update}}\Big(\mathop{\Big\Vert}_{k=1}^{K}
        Q_{\text{aggregate}}\big(\textstyle\sum_{j} Q_{\text{message}}(
        \alpha^{k}_{ij}\mathbf{h}^{k}_j)\big) + \mathbf{b}\Big)

    (the mean over heads instead of :math:`\Vert` when ``concat=False``).

    Two roles carry the head on dimension 1: ``attention``, the attention vectors
    :math:`[\mathbf{a}_s\|\mathbf{a}_d]` as one :math:`(K, 2C)` tensor, and ``score``, the
    edge logits :math:`(|\mathcal{E}|, K)` before the LeakyReLU (A²Q's ``q_gat_attn`` and
    ``q_gat_edge``). Softmax and attention dropout stay FP32. Quantizers that ``uses_graph``
    get this pass's graph (:func:`~gnnq.quant.base.share_graph`) and, for ``message`` and
    ``score``, each row's target node. Node-wise:

    - :meth:`edge_update`: the attention coefficients :math:`\alpha_{ij}`
    - :meth:`message`: :math:`Q_{\text{message}}(\alpha_{ij}\mathbf{h}_j)`
    - :meth:`aggregate`: :math:`Q_{\text{aggregate}}(\sum_j \cdot)`
    - :meth:`update`: concatenate (or average) the heads, add the bias,
      :math:`Q_{\text{update}}`

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each head's output.
        heads (int, optional): Number of attention heads :math:`K`. (default: :obj:`1`)
        concat (bool, optional): Concatenate the heads; if :obj:`False`, average them (the
            GAT output layer). (default: :obj:`True`)
        negative_slope (float, optional): LeakyReLU slope. (default: :obj:`0.2`)
        dropout (float, optional): Dropout on the attention coefficients.
            (default: :obj:`0.`)
        bias (bool, optional): Learn an additive bias. (default: :obj:`True`)
        quantizers (RoleQuantizers, optional): The layer's quantizers by role.
            (default: :obj:`None`, FP32)
        input_dropout (float, optional): Dropout on the input after its quantizer, in
            training (:class:`~gnnq.models.qlinear.QLinear`). (default: :obj:`0.`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}|, K \cdot C)` or
          :math:`(|\mathcal{V}|, C)` when ``concat=False``
        - **quantizers see:** input :math:`(|\mathcal{V}|, F_{in})`; weight
          :math:`(K C, F_{in})`; feature, aggregate :math:`(|\mathcal{V}|, K C)`; attention
          :math:`(K, 2C)` and :math:`(|\mathcal{E}|+|\mathcal{V}|, K)`; message
          :math:`(|\mathcal{E}|+|\mathcal{V}|, K C)` (edges with self-loops); update the
          output shape
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1,
                 concat: bool = True, negative_slope: float = 0.2, dropout: float = 0.0,
                 bias: bool = True, quantizers: Optional[RoleQuantizers] = None,
                 input_dropout: float = 0.0) -> None:
        super().__init__(aggr="add", node_dim=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = concat
        self.negative_slope = negative_slope
        self.dropout = dropout
        lin_quantizers, self.q = split_roles(quantizers, LINEAR_ROLES)
        self.lin = QLinear(in_channels, heads * out_channels, bias=False,
                           quantizers=lin_quantizers, weight_initializer="glorot",
                           input_dropout=input_dropout)
        self.att_src = nn.Parameter(torch.empty(heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(heads, out_channels))
        if bias:
            self.bias = nn.Parameter(torch.empty(heads * out_channels if concat else out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        reset_quantizers(self.q)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        H, C = self.heads, self.out_channels
        share_graph(self, edge_index, x.size(0), batch)
        h = self.lin(x).view(-1, H, C)
        att = self.q("attention", torch.cat([self.att_src, self.att_dst], dim=-1))
        att_src, att_dst = att.split(C, dim=-1)
        # a^T [h_i || h_j] splits into a per-node source and target score, gathered per edge.
        score_src = (h * att_src).sum(dim=-1)
        score_dst = (h * att_dst).sum(dim=-1)

        edge_index, _ = remove_self_loops(edge_index)
        edge_index, _ = add_self_loops(edge_index, num_nodes=h.size(0))
        alpha = self.edge_updater(edge_index, score=(score_src, score_dst))
        return self.propagate(edge_index, x=h, alpha=alpha)

    def edge_update(self, score_j: Tensor, score_i: Tensor, index: Tensor,
                    ptr: Optional[Tensor], dim_size: Optional[int]) -> Tensor:
        logits = self.q("score", score_j + score_i, index=index)
        alpha = softmax(F.leaky_relu(logits, self.negative_slope), index, ptr, dim_size)
        return F.dropout(alpha, p=self.dropout, training=self.training)

    def message(self, x_j: Tensor, alpha: Tensor, index: Tensor) -> Tensor:
        # Heads are flattened so every quantizer sees a 2-D (rows, features) tensor.
        return self.q("message", (alpha.unsqueeze(-1) * x_j).flatten(1), index=index)

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Optional[Tensor] = None,
                  dim_size: Optional[int] = None) -> Tensor:
        return self.q("aggregate", super().aggregate(inputs, index, ptr, dim_size))

    def update(self, inputs: Tensor) -> Tensor:
        if not self.concat:
            inputs = inputs.view(-1, self.heads, self.out_channels).mean(dim=1)
        if self.bias is not None:
            inputs = inputs + self.bias
        return self.q("update", inputs)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads})")
