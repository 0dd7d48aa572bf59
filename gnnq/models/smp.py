"""The SMP model of Wang et al. (CIKM 2023): a two-layer quantized MLP, then K steps of
smoothness-aware message propagation (spec ``docs/smoothness.md`` §1).

Layer specs, named after module paths: ``lin1`` and ``lin2`` (kind ``linear``, indices 0
and 1), then ``prop.base.k`` and, for SMP, ``prop.gap.k`` (kind ``prop``, index ``2 + k``:
the base and the correction product of step ``k``), so ``num_layers = 2 + steps``.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from gnnq.models.qlinear import QLinear
from gnnq.models.smp_prop import SMPProp
from gnnq.models.utils import dropout, spec_quantizers
from gnnq.quant.base import QuantizerFactory, mostly_zeros, to_csr


class SMP(nn.Module):
    r"""``dropout - QLinear - ReLU - dropout - QLinear - SMPProp(K)``, returning raw logits.

    The official model ends in ``log_softmax`` and trains on NLL; the trainer's
    cross-entropy on raw logits is the same loss (``log_softmax`` is idempotent), so the
    logits are returned as they are. The defaults (hidden 64, K = 10, teleport 0.1) are the
    released configuration. See :class:`~gnnq.models.smp_prop.SMPProp` for the propagation
    options; ``propagation="appnp"`` is the same model with plain APPNP propagation.

    Large, mostly-zero input features (:func:`~gnnq.quant.base.mostly_zeros`: Coauthor
    CS/Physics) enter as a sparse CSR tensor, converted once per feature tensor: the input
    dropout, the input quantizer and the first product then touch the nonzeros only, not
    125M (CS) or 290M (Physics) dense entries. The result is the dense model's up to the
    order of sums and the dropout's random draws. It needs ``lin1``'s input quantizer, if
    any, to accept sparse input (QLR does; where BT/BT* truncation moves 0, its output is
    dense again).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64,
                 dropout: float = 0.5, steps: int = 10, alpha: float = 0.1,
                 propagation: str = "smp", correction: str = "laplacian",
                 threshold: float = 0.1, multiplier_lr: float = 1e-5, slack_lr: float = 1e-5,
                 multiplier_bound: Optional[float] = None,
                 quantizers: Optional[QuantizerFactory] = None,
                 num_nodes: Optional[int] = None, cached: bool = True) -> None:
        super().__init__()
        self.dropout = dropout
        make = spec_quantizers(quantizers, level="node", num_layers=2 + steps,
                               num_nodes=num_nodes)
        self.lin1 = QLinear(in_channels, hidden,
                            quantizers=make("lin1", "linear", 0, in_channels, hidden))
        self.lin2 = QLinear(hidden, out_channels,
                            quantizers=make("lin2", "linear", 1, hidden, out_channels))
        base, gap = [], []
        for k in range(steps):
            base.append(make(f"prop.base.{k}", "prop", 2 + k, out_channels, out_channels))
            if propagation == "smp":
                gap.append(make(f"prop.gap.{k}", "prop", 2 + k, out_channels, out_channels))
        self.prop = SMPProp(steps, alpha=alpha, propagation=propagation, correction=correction,
                            threshold=threshold, multiplier_lr=multiplier_lr,
                            slack_lr=slack_lr, multiplier_bound=multiplier_bound,
                            base_quantizers=base, gap_quantizers=gap,
                            cached=cached)
        # The sparse features of the last dense input seen, and that input (weakly).
        self._sparse_source: Optional[weakref.ref] = None
        self._sparse_version = -1
        self._sparse_features: Optional[Tensor] = None

    def reset_parameters(self) -> None:
        self.lin1.reset_parameters()
        self.lin2.reset_parameters()
        self.prop.reset_parameters()

    def features(self, x: Tensor) -> Tensor:
        """``x`` as the first layer takes it: sparse CSR when it is large and mostly zeros
        and the input quantizer accepts that, else ``x`` itself."""
        source = self._sparse_source() if self._sparse_source is not None else None
        if source is not x or self._sparse_version != x._version:
            quantizer = self.lin1.q.by_role.get("input")
            sparse = (not x.requires_grad and x.dim() == 2
                      and (quantizer is None or quantizer.accepts_sparse) and mostly_zeros(x))
            self._sparse_features = to_csr(x) if sparse else None
            self._sparse_source, self._sparse_version = weakref.ref(x), x._version
        return x if self._sparse_features is None else self._sparse_features

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = dropout(self.features(x), self.dropout, self.training)
        x = F.relu(self.lin1(x))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.prop(self.lin2(x), edge_index)
