"""A linear layer whose input, weight and output pass through fake quantizers."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnnq.models.utils import dropout, reset_quantizers
from gnnq.quant.base import RoleQuantizers


class _SparseProduct(torch.autograd.Function):
    """``X Wᵀ`` for a sparse CSR ``X``. PyTorch's own backward forms the dense ``∂L/∂X``
    (125M entries on Coauthor CS) and then masks it; this one computes it at ``X``'s
    nonzeros only, the only entries a gradient can reach."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # beta=0: x's values are ignored, only its pattern is used
            grad_x = torch.sparse.sampled_addmm(x, grad, weight, beta=0.0)
        if ctx.needs_input_grad[1]:
            grad_weight = (x.t() @ grad).t()
        return grad_x, grad_weight


class QLinear(nn.Module):
    r"""Applies a linear transform with quantized operands,

    .. math::
        \mathbf{Y} = Q_{\text{feature}}\!\left(Q_{\text{input}}(\mathbf{X})\,
        Q_{\text{weight}}(\mathbf{W})^{\top}\right) + \mathbf{b}.

    The weight is quantized inside :meth:`forward`, so a fake quantizer's straight-through
    gradient reaches the full-precision ``W``. The bias stays FP32 and is added after the
    ``feature`` quantizer. Roles other than ``input``, ``weight`` and ``feature`` are
    ignored.

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        bias (bool, optional): Learn an additive bias. (default: :obj:`True`)
        quantizers (RoleQuantizers, optional): The layer's quantizers by role; missing roles
            are the identity. (default: :obj:`None`, FP32)
        weight_initializer (str, optional): ``"glorot"`` (with a zero bias; GCN/GAT) or
            ``"kaiming_uniform"`` (the :class:`torch.nn.Linear` default; MLPs).
            (default: :obj:`"kaiming_uniform"`)
        input_dropout (float, optional): Dropout on the *quantized* input, in training. A
            model's usual dropout before the layer scales the kept values by ``1/(1-p)``, so
            the input quantizer learns its grid on values larger than those it meets in
            evaluation; dropping after quantizing keeps the two the same. (default: :obj:`0.`)

    Shapes:
        - **input:** :math:`(*, F_{in})`; the ``input`` quantizer sees this tensor. A 2-D
          sparse CSR input (large bag-of-words features) needs an ``input`` quantizer that
          ``accepts_sparse``, or none; the product is then a sparse one.
        - **weight:** :math:`(F_{out}, F_{in})`, one row per output channel.
        - **output:** :math:`(*, F_{out})`; the ``feature`` quantizer sees it before the bias.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True,
                 quantizers: Optional[RoleQuantizers] = None,
                 weight_initializer: str = "kaiming_uniform",
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        if weight_initializer not in ("glorot", "kaiming_uniform"):
            raise ValueError(f"unknown weight_initializer {weight_initializer!r}; "
                             "use 'glorot' or 'kaiming_uniform'")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight_initializer = weight_initializer
        self.input_dropout = input_dropout
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.q = quantizers if quantizers is not None else RoleQuantizers()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight_initializer == "glorot":
            nn.init.xavier_uniform_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            # Same draw as torch.nn.Linear, so FP32 MLPs train as the reference models do.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_channels) if self.in_channels > 0 else 0.0
                nn.init.uniform_(self.bias, -bound, bound)
        reset_quantizers(self.q)

    def forward(self, x: Tensor) -> Tensor:
        x = self.q("input", x)
        if self.input_dropout > 0:
            x = dropout(x, self.input_dropout, self.training)
        weight = self.q("weight", self.weight)
        sparse = x.layout == torch.sparse_csr
        out = _SparseProduct.apply(x, weight) if sparse else F.linear(x, weight)
        out = self.q("feature", out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        drop = f", input_dropout={self.input_dropout:g}" if self.input_dropout > 0 else ""
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}{drop}"
