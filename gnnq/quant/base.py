"""The quantizer interface every layer and every method shares.

Layers receive quantizers by *tensor role*, not by method. A method is a factory: given a
:class:`LayerSpec` it returns ``{role: Quantizer}`` for that layer; a role it leaves out is
the identity, so a model never crashes on a missing role. Each quantizer reports what it
spends (:class:`BitCost`), so average bits and compression are computed in one place
(:mod:`gnnq.quant.cost`) for every method alike.

**Graph context.** Most quantizers see only their tensor. A method whose quantizers depend on
the graph (Degree-Quant protects rows by their node's in-degree) sets ``uses_graph = True``
on them; then, and only then:

- every conv calls :func:`share_graph` at the start of its ``forward``, which hands one
  :class:`GraphContext` (the graph of this pass: ``edge_index``, ``num_nodes``, a per-pass
  cache) to each such quantizer inside the conv, its linear maps and GIN MLP included. What
  is derived from the graph once per pass and layer (a degree, a sampled mask) lives in that
  context's cache, so all quantizers of a layer share it;
- :meth:`RoleQuantizers.forward` passes such a quantizer the row -> node ``index`` of the
  tensor as a second argument: the target node of each row for per-edge tensors
  (``message``, ``score``), ``None`` where the rows are the graph's nodes. Quantizers
  outside every conv (the graph-level head, whose rows are graphs) never get a context.

Quantizers without the flag are called as before, ``quantizer(x)``, and never see a context.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Protocol

import torch
from torch import nn

#: The tensor roles a layer exposes, in the order data flows through a message-passing layer.
#: ``attention`` is GAT's attention vectors (a parameter, like ``weight``); ``score`` is its
#: per-edge logits before LeakyReLU (A²Q quantizes both, separately).
ROLES = ("input", "weight", "feature", "message", "aggregate", "update", "attention", "score")

# Inputs this large and at most this dense are worth carrying on their nonzeros only
# (:func:`mostly_zeros`): bag-of-words features of large graphs (Coauthor CS: 125M entries,
# 99 % zero). The size keeps Cora and CiteSeer (4M and 12M entries) on the dense path, where
# sums run in another order and their published tables rerun bit for bit.
SPARSE_MIN_ELEMENTS = 1 << 24
SPARSE_MAX_DENSITY = 0.25


def mostly_zeros(x: torch.Tensor) -> bool:
    """Whether dense ``x`` is large and sparse enough to be handled on its nonzeros only."""
    if x.numel() < SPARSE_MIN_ELEMENTS:
        return False
    # Counted, not indexed: indexing a large dense input (ogbn-arxiv) would allocate 8 bytes
    # an entry.
    return 0 < int(torch.count_nonzero(x)) <= SPARSE_MAX_DENSITY * x.numel()


def _csr(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # PyTorch warns on every CSR construction; only sparse @ dense is used, long supported.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(like.crow_indices(), like.col_indices(), values,
                                       like.shape)


class _WithValues(torch.autograd.Function):
    """``values`` on ``like``'s CSR pattern. PyTorch's own constructor backward densifies the
    incoming gradient (125M entries on Coauthor CS) to mask it; a gradient on the same
    pattern only needs its values."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(like)
        return _csr(like, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if grad.layout == torch.sparse_csr:
            return grad.values(), None
        (like,) = ctx.saved_tensors
        rows = torch.repeat_interleave(torch.arange(like.size(0), device=grad.device),
                                       like.crow_indices().diff())
        return grad[rows, like.col_indices()], None


class _ValuesOf(torch.autograd.Function):
    """The stored values of a CSR tensor, with the gradient sent back on its pattern."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.values().detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _csr(x, grad)


def csr_with_values(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The sparse CSR tensor of ``like``'s pattern holding ``values`` (autograd reaches them
    without densifying)."""
    return _WithValues.apply(values, like) if values.requires_grad else _csr(like, values)


def csr_values(x: torch.Tensor) -> torch.Tensor:
    """The stored values of the sparse CSR ``x`` (autograd reaches ``x`` without
    densifying)."""
    return _ValuesOf.apply(x) if x.requires_grad else x.values()


def to_csr(x: torch.Tensor) -> torch.Tensor:
    """Dense ``x`` as a sparse CSR tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return x.detach().to_sparse_csr()


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

    @property
    def reads_raw_features(self) -> bool:
        """The first message-passing layer, whose input is the raw node features (what the
        methods' ``quant.quantize_raw_input`` switches)."""
        return self.kind in ("gcn", "gin", "gat") and self.index == 0


@dataclass(frozen=True)
class BitCost:
    """Storage of the last tensor a quantizer saw: ``elements`` values in ``bits`` bits."""

    elements: float
    bits: float

    def __add__(self, other: "BitCost") -> "BitCost":
        return BitCost(self.elements + other.elements, self.bits + other.bits)


class Quantizer(nn.Module):
    """A fake quantizer: ``forward`` returns a tensor of the input's shape on the quantized grid.

    ``counts_in_average`` marks the quantizers whose bits define a method's ``avg_bits``
    (for A²Q: the learned per-node feature bits); all quantizers count toward compression.
    """

    counts_in_average: bool = True
    #: Receives the layer's :class:`GraphContext` (:meth:`set_graph`) and is called as
    #: ``quantizer(x, index)`` (see the module docstring). ``False``: ``quantizer(x)``.
    uses_graph: bool = False
    #: ``forward`` also takes a sparse CSR tensor: it quantizes the stored values, with the
    #: implicit zeros in the range (they stay 0), and returns the same pattern.
    accepts_sparse: bool = False

    def bit_cost(self) -> Optional[BitCost]:
        """Bits spent on the tensor of the last forward pass; ``None`` before any."""
        raise NotImplementedError

    def set_graph(self, graph: "GraphContext") -> None:
        """The graph of the current forward pass (only called when ``uses_graph``)."""


class GraphContext:
    """The graph one layer's forward pass runs on, shared by that layer's quantizers.

    ``edge_index`` is the graph as the conv received it (``[2, E]``, messages flow from
    ``edge_index[0]`` to ``edge_index[1]``), ``num_nodes`` its node count, ``batch`` the graph
    of every node when a mini-batch holds several graphs (``None``: one graph). A new context
    is built for every pass of every conv, so :meth:`cached` values are per pass and per layer.
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int,
                 batch: Optional[torch.Tensor] = None) -> None:
        self.edge_index = edge_index
        self.num_nodes = num_nodes
        self.batch = batch
        self._cache: dict[str, Any] = {}

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed on the first call with ``key`` in this pass, then reused."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def in_degree(self) -> torch.Tensor:
        """In-degree of every node, ``[num_nodes]`` (edges counted as given, self-loops too)."""
        return self.cached("in_degree", lambda: torch.bincount(
            self.edge_index[1], minlength=self.num_nodes)[: self.num_nodes])


def share_graph(module: nn.Module, edge_index: torch.Tensor, num_nodes: int,
                batch: Optional[torch.Tensor] = None) -> None:
    """Hand one :class:`GraphContext` for this pass to every quantizer under ``module`` that
    ``uses_graph`` (a conv calls it on itself at the start of ``forward``); without such
    quantizers nothing is built."""
    graph: Optional[GraphContext] = None
    for child in module.modules():
        if isinstance(child, Quantizer) and child.uses_graph:
            graph = graph or GraphContext(edge_index, num_nodes, batch)
            child.set_graph(graph)


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

    def forward(self, role: str, x: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` through the ``role`` quantizer. ``index``: the node of each row of a
        per-edge tensor (its target), handed only to quantizers that ``uses_graph``."""
        quantizer = self._modules.get(role)
        if quantizer is None:
            return x
        return quantizer(x, index) if quantizer.uses_graph else quantizer(x)


def layer_quantizers(factory: Optional[QuantizerFactory], spec: LayerSpec) -> RoleQuantizers:
    """The quantizers ``factory`` gives the layer ``spec`` (identity everywhere without one)."""
    return RoleQuantizers(factory(spec) if factory is not None else None)
