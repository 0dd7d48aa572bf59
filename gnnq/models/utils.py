"""Small pieces the layers and models share: role bookkeeping, layer specs, sparse adjacency
and sparse features."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import to_torch_csr_tensor

from gnnq.quant.base import (LayerSpec, QuantizerFactory, RoleQuantizers, csr_values,
                             csr_with_values, layer_quantizers)

#: The roles a :class:`~gnnq.models.qlinear.QLinear` applies.
LINEAR_ROLES = ("input", "weight", "feature")


def split_roles(quantizers: Optional[RoleQuantizers],
                roles: Iterable[str]) -> tuple[RoleQuantizers, RoleQuantizers]:
    """Split a layer's quantizers into those of ``roles`` and the rest.

    A conv hands its linear-transform roles to its :class:`QLinear` and keeps the
    message-passing roles, so every quantizer module has exactly one owner: one path in the
    module tree, one ``state_dict`` entry, one bit cost.
    """
    roles = set(roles)
    owned = dict(quantizers.by_role.items()) if quantizers is not None else {}
    picked = {role: q for role, q in owned.items() if role in roles}
    rest = {role: q for role, q in owned.items() if role not in roles}
    return RoleQuantizers(picked), RoleQuantizers(rest)


def reset_quantizers(quantizers: RoleQuantizers) -> None:
    """Re-initialise the quantizers that carry state of their own (learned scales, bits)."""
    for quantizer in quantizers.by_role.values():
        if hasattr(quantizer, "reset_parameters"):
            quantizer.reset_parameters()


def sparse_adj_t(edge_index: Tensor, weight: Optional[Tensor], num_nodes: int,
                 dtype: torch.dtype) -> Tensor:
    """The transposed adjacency as a CSR tensor: row ``i`` holds the in-edges ``j -> i``.

    ``adj_t @ x`` is then the sum aggregation ``sum_j w_ji x_j`` in one sparse product,
    without materialising per-edge messages. Duplicate edges are summed.
    """
    if weight is None:
        weight = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    with warnings.catch_warnings():
        # PyTorch warns on every CSR construction; only sparse @ dense is used, long supported.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return to_torch_csr_tensor(edge_index.flip(0), weight.to(dtype), size=num_nodes)


def spec_quantizers(factory: Optional[QuantizerFactory], *, level: Literal["node", "graph"],
                    num_layers: int,
                    num_nodes: Optional[int] = None) -> Callable[..., RoleQuantizers]:
    """A model's shorthand for ``layer_quantizers(factory, LayerSpec(...))``.

    The returned ``make(name, kind, index, in_dim, out_dim, heads=1)`` fills in what is the
    same for every layer of the model (level, depth, node count).
    """
    def make(name: str, kind: str, index: int, in_dim: int, out_dim: int,
             heads: int = 1) -> RoleQuantizers:
        spec = LayerSpec(name=name, kind=kind, index=index, num_layers=num_layers,
                         in_dim=in_dim, out_dim=out_dim, level=level, num_nodes=num_nodes,
                         heads=heads)
        return layer_quantizers(factory, spec)

    return make


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """:func:`torch.nn.functional.dropout`, also on a sparse CSR tensor, whose stored values
    it drops (a zero stays zero either way, so only the random draws differ)."""
    if x.layout != torch.sparse_csr:
        return F.dropout(x, p=p, training=training)
    return csr_with_values(x, F.dropout(csr_values(x), p=p, training=training))
