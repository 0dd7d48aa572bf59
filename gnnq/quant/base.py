"""The quantizer interface every layer and every method shares.

Layers receive quantizers by *tensor role*, not by method. A method is a factory: given a
:class:`LayerSpec` it returns ``{role: Quantizer}`` for that layer; a role it leaves out is
the identity, so a model never crashes on a missing role. Each quantizer reports what it
spends (:class:`BitCost`), so average bits and compression are computed in one place
(:mod:`gnnq.quant.cost`) for every method alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Protocol

import torch
from torch import nn

#: The tensor roles a layer exposes, in the order data flows through a message-passing layer.
#: ``attention`` is GAT's attention vectors (a parameter, like ``weight``); ``score`` is its
#: per-edge logits before LeakyReLU (A²Q quantizes both, separately).
ROLES = ("input", "weight", "feature", "message", "aggregate", "update", "attention", "score")


@dataclass(frozen=True)
class LayerSpec:
    """What a quantization method needs to know to build one layer's quantizers."""

    name: str                       # module path in the model, e.g. "convs.1"
    kind: str                       # "gcn", "gin", "gat" or "linear"
    index: int                      # position among the model's layers
    num_layers: int
    in_dim: int
    out_dim: int
    level: Literal["node", "graph"]
    num_nodes: Optional[int] = None  # node level: nodes of the (single) graph
    heads: int = 1


@dataclass(frozen=True)
class BitCost:
    """Storage of the last tensor a quantizer saw: ``elements`` values in ``bits`` bits."""

    elements: float
    bits: float


class Quantizer(nn.Module):
    """A fake quantizer: ``forward`` returns a tensor of the input's shape on the quantized grid.

    ``counts_in_average`` marks the quantizers whose bits define a method's ``avg_bits``
    (for A²Q: the learned per-node feature bits); all quantizers count toward compression.
    """

    counts_in_average: bool = True

    def bit_cost(self) -> Optional[BitCost]:
        """Bits spent on the tensor of the last forward pass; ``None`` before any."""
        raise NotImplementedError


class QuantizerFactory(Protocol):
    def __call__(self, layer: LayerSpec) -> Mapping[str, Quantizer]: ...


class RoleQuantizers(nn.Module):
    """A layer's quantizers by role; a role without one passes its tensor through unchanged."""

    def __init__(self, quantizers: Optional[Mapping[str, Quantizer]] = None) -> None:
        super().__init__()
        quantizers = dict(quantizers or {})
        unknown = set(quantizers) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown quantizer roles {sorted(unknown)}; roles are {ROLES}")
        # Children named by role (not an nn.ModuleDict: its ``update`` method shadows a role).
        for role, quantizer in quantizers.items():
            self.add_module(role, quantizer)

    @property
    def by_role(self) -> dict[str, Quantizer]:
        return dict(self.named_children())

    def has(self, role: str) -> bool:
        return role in self._modules

    def forward(self, role: str, x: torch.Tensor) -> torch.Tensor:
        quantizer = self._modules.get(role)
        return x if quantizer is None else quantizer(x)


def layer_quantizers(factory: Optional[QuantizerFactory], spec: LayerSpec) -> RoleQuantizers:
    """The quantizers ``factory`` gives the layer ``spec`` (identity everywhere without one)."""
    return RoleQuantizers(factory(spec) if factory is not None else None)
