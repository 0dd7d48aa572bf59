"""The packed integer models (GCN and the smoothness-aware SMP model): graph, layers, and
inference on any backend.

One layer computes, with ``Ĝ = D^{-1/2} (A + I) D^{-1/2}`` and the quantizer grids of the
trained model (:mod:`gnnq.kernels.grid`)::

    X_q  = Q_input(X)                     codes, one scale (and bitwidth) per node
    H    = X_q W_q^T                      integer products, scaled per node and per channel
    H_q  = Q_feature(H)                   codes, one scale per channel (or per node)
    Y    = Ĝ H_q + b                      packed SpMM; D^{-1/2} folded into per-node factors
    [Y   = Q_aggregate / Q_update(Y)]     requantized where the model has those quantizers
    ReLU between layers (fused into the SpMM epilogue where nothing sits in between)

The SMP model (:class:`PackedSMPProp`) is two such transforms without aggregation
(:class:`PackedLinear`), then ``K`` propagation steps whose products with ``Ĝ`` are requantized
by each step's own grids. A role without a quantizer stays FP32 (the raw first-layer input: ``H = X W_q^T`` in float;
no feature quantizer: an FP32 SpMM). Row grids may mix bitwidths; those rows are packed in
groups of equal bitwidth (:mod:`gnnq.kernels.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor

from gnnq.kernels.grid import Grid
from gnnq.kernels.packing import PackedRows, layout, unpack

ROLES = ("input", "weight", "feature", "message", "aggregate", "update")
# Edges per chunk of the per-edge message requantization (bounds its [edges, F] buffers).
MESSAGE_CHUNK = 1 << 18


@dataclass
class PackedGraph:
    """The transposed adjacency with self-loops as CSR: row ``i`` lists the sources ``j`` of
    its in-edges (sorted), int32 column indices, and ``D^{-1/2}`` per node."""

    rowptr: Tensor        # int64 [N + 1]
    col: Tensor           # int32 [nnz]
    deg_inv_sqrt: Tensor  # float32 [N]

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @cached_property
    def destinations(self) -> Tensor:
        """The destination node of every stored edge, ``[nnz]`` (the CSR rows expanded)."""
        return torch.repeat_interleave(torch.arange(self.num_nodes, device=self.col.device),
                                       self.rowptr[1:] - self.rowptr[:-1])

    @cached_property
    def edge_weight(self) -> Tensor:
        """``d_j^{-1/2} d_i^{-1/2}`` of every stored edge ``j -> i``: the GCN normalisation,
        multiplied in the order :func:`gnnq.models.gcn_conv.gcn_norm` uses."""
        return self.deg_inv_sqrt[self.col.long()] * self.deg_inv_sqrt[self.destinations]

    def to(self, device) -> "PackedGraph":
        return PackedGraph(self.rowptr.to(device), self.col.to(device),
                           self.deg_inv_sqrt.to(device))

    @staticmethod
    def from_csr(rowptr: Tensor, col: Tensor) -> "PackedGraph":
        deg = (rowptr[1:] - rowptr[:-1]).to(torch.float32)
        dinv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
        return PackedGraph(rowptr.to(torch.int64), col.to(torch.int32), dinv)

    @staticmethod
    def gcn(edge_index: Tensor, num_nodes: int, self_loops: bool = True) -> "PackedGraph":
        """The graph of :func:`gnnq.models.gcn_conv.gcn_norm`: missing self-loops added,
        degrees counted at the destination, duplicate edges kept (they sum)."""
        if self_loops:
            from torch_geometric.utils import add_remaining_self_loops

            edge_index, _ = add_remaining_self_loops(edge_index, num_nodes=num_nodes)
        return csr_from_edges(edge_index[0], edge_index[1], num_nodes)


def csr_from_edges(src: Tensor, dst: Tensor, num_nodes: int) -> PackedGraph:
    """CSR over destinations of the edges ``src -> dst`` (sources sorted within a row)."""
    src, dst = src.to(torch.int64), dst.to(torch.int64)
    order = torch.argsort(dst * num_nodes + src)
    col = src[order].to(torch.int32)
    counts = torch.bincount(dst, minlength=num_nodes)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.int64)
    rowptr[1:] = counts.cumsum(0)
    return PackedGraph.from_csr(rowptr, col)


def sort_within_rows(rowptr: Tensor, col: Tensor) -> Tensor:
    """``col`` with each CSR row's entries sorted (sums do not depend on the order; the mixed
    kernels decode one run per bitwidth group when sources are sorted in grouped numbering)."""
    rows = rowptr.numel() - 1
    row = torch.repeat_interleave(torch.arange(rows, device=col.device), rowptr[1:] - rowptr[:-1])
    key = row.to(torch.int64) * max(rows, int(col.max()) + 1 if col.numel() else 1) + col.long()
    return col[torch.argsort(key)].to(torch.int32)


def _requantize(y: Tensor, grid: Optional[Grid]) -> Tensor:
    if grid is None:
        return y
    g = grid.to(y.device)
    return g.dequantize(g.quantize(y))


def message_sum(h: Tensor, graph: PackedGraph, grid: Grid) -> Tensor:
    """``sum_j Q_message(d_i^{-1/2} d_j^{-1/2} h_j)``: every edge's product is requantized on
    the message grid (what Degree-Quant and the smoothness-aware quantizer train with), the
    codes are summed as integers per destination, and one scale turns each sum into a value.
    PyTorch ops on any device, in edge chunks (no packed kernel computes per-edge
    requantization)."""
    dev = h.device
    col = graph.col.to(dev).long()
    dst, weight = graph.destinations.to(dev), graph.edge_weight.to(dev)
    g = grid.to(dev)
    zero = g.zero_point.to(torch.int64).view(1, -1)
    sums = torch.zeros(graph.num_nodes, h.size(1), dtype=torch.int64, device=dev)
    for start in range(0, col.numel(), MESSAGE_CHUNK):
        chunk = slice(start, start + MESSAGE_CHUNK)
        # The same float32 product as the fake-quantized layer: (d_j^-1/2 d_i^-1/2) h_j.
        m = weight[chunk].view(-1, 1) * h[col[chunk]]
        sums.index_add_(0, dst[chunk], g.quantize(m).to(torch.int64) - zero)
    return (sums.to(torch.float64) * g.scale.to(torch.float64).view(1, -1)).to(torch.float32)


@dataclass
class PackedLinear:
    """``ReLU?(Q_feature(Q_input(X) W_q^T) + b)``: a quantized linear map on its own (the SMP
    model's MLP); :class:`PackedGCNLayer` adds the aggregation."""

    in_features: int
    out_features: int
    weight_words: Tensor                # int32 [out, words per row], codes along in_features
    weight: Grid                        # one group per output channel (or one)
    input: Optional[Grid] = None        # row (node) or tensor grid
    feature: Optional[Grid] = None      # column (channel), tensor or row grid
    bias: Optional[Tensor] = None
    relu: bool = False                  # ReLU on this layer's output
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def weight_codes(self) -> Tensor:
        return unpack(self.weight_words, int(self.weight.uniform_bits), self.in_features)

    def dequantized_weight(self, device=None) -> Tensor:
        key = ("weight", str(device))
        if key not in self._cache:
            self._cache[key] = self.weight.dequantize(self.weight_codes()).to(device)
        return self._cache[key]

    def _layout(self, grid: Grid, rows: int, cols: int, role: str) -> PackedRows:
        key = ("layout", role, rows)
        if key not in self._cache:
            self._cache[key] = layout(grid.row_bits(rows), rows, cols)
        return self._cache[key]

    def transform(self, h: Tensor, backend) -> Tensor:
        """``H = Q_input(X) W_q^T`` (or ``X W_q^T`` for an FP32 input)."""
        if self.input is None:
            if backend.name == "reference":
                w = self.weight_codes().to(torch.float64) - self.weight.zero_point.view(-1, 1)
                out = (h.to(torch.float64) @ w.t()) * self.weight.scale.to(torch.float64)
                return out.to(torch.float32)
            return h.to(backend.device) @ self.dequantized_weight(backend.device).t()
        lay = self._layout(self.input, h.size(0), self.in_features, "input")
        packed = backend.quantize_pack(h, self.input, lay)
        return backend.linear(packed, self.input, self.weight_words, self.weight)

    def grids(self) -> dict[str, Optional[Grid]]:
        return {role: getattr(self, role, None) for role in ROLES}

    def forward(self, h: Tensor, graph: "PackedGraph", backend) -> Tensor:
        out = _requantize(self.transform(h, backend), self.feature)
        if self.bias is not None:
            out = out + self.bias.to(out.device)
        return out.clamp_min(0) if self.relu else out


@dataclass
class PackedGCNLayer(PackedLinear):
    """One GCN layer: :class:`PackedLinear`'s transform (without its bias), then the
    aggregation with the layer's message / aggregate / update grids and the bias."""

    message: Optional[Grid] = None      # column or tensor grid, applied to every edge
    aggregate: Optional[Grid] = None
    update: Optional[Grid] = None

    def aggregate_step(self, y: Tensor, graph: PackedGraph, backend) -> Tensor:
        """``Ĝ Q_feature(H) + b`` with the layer's requantizers and ReLU."""
        fuse = self.aggregate is None and self.update is None and self.message is None
        bias = self.bias if fuse else None
        relu = self.relu and fuse
        dinv = graph.deg_inv_sqrt
        if self.message is not None:
            out = message_sum(_requantize(y, self.feature), graph, self.message)
        elif self.feature is None:
            out = backend.spmm_f32(graph.rowptr, graph.col, y, src_scale=dinv, dst_scale=dinv,
                                   bias=bias, relu=relu)
        else:
            grid = self.feature
            lay = self._layout(grid, y.size(0), self.out_features, "feature")
            packed = backend.quantize_pack(y, grid, lay)
            kw = dict(dst_scale=dinv, bias=bias, relu=relu)
            col = graph.col
            if grid.axis == "row":
                # Per-node scales join D^{-1/2} in the per-source factor; sources are
                # renumbered into the grouped (by bitwidth) order of the packed rows.
                dev = dinv.device
                order = None if packed.order is None else packed.order.to(dev)
                scale, zero = grid.scale.to(dev), grid.zero_point.to(dev)
                if order is not None:
                    scale, zero, src = scale[order], zero[order], dinv[order]
                else:
                    src = dinv
                kw.update(src_scale=src * scale, src_zero=zero.to(torch.float32))
                if order is not None:
                    key = ("col", "feature", str(dev))
                    if key not in self._cache:
                        position = packed.inverse_order().to(dev)
                        self._cache[key] = sort_within_rows(
                            graph.rowptr, position[graph.col.long()].to(torch.int32))
                    col = self._cache[key]
            else:
                n = self.out_features
                scale = grid.scale.expand(n) if grid.scale.numel() == 1 else grid.scale
                zero = grid.zero_point.expand(n) if grid.zero_point.numel() == 1 \
                    else grid.zero_point
                kw.update(src_scale=dinv, col_scale=scale, col_zero=zero)
            out = backend.spmm(graph.rowptr, col, packed, **kw)
        if not fuse:
            out = _requantize(out, self.aggregate)
            if self.bias is not None:
                out = out + self.bias.to(out.device)
            out = _requantize(out, self.update)
            if self.relu:
                out = out.clamp_min(0)
        return out

    def forward(self, h: Tensor, graph: PackedGraph, backend) -> Tensor:
        return self.aggregate_step(self.transform(h, backend), graph, backend)


PROP_ROLES = ("message", "aggregate", "update")


@dataclass
class PackedSMPProp:
    """``steps`` propagation steps of the SMP model (:class:`gnnq.models.smp_prop.SMPProp`,
    ``propagation="smp"`` or ``"appnp"``) on the trained grids: each step's products with
    ``Ĝ`` (the base one and, for SMP, the correction's) requantized by its own message /
    aggregate / update grids (messages edge by edge, :func:`message_sum`); the teleport, the
    correction, the change energy, slack and multiplier in FP32, with the model's own
    functions, as the trained model computes them."""

    steps: int
    alpha: float
    propagation: str
    correction: str
    threshold: float
    multiplier_lr: float
    slack_lr: float
    multiplier_init: float
    slack_init: float
    multiplier_bound: Optional[float]
    base: list[dict[str, Grid]]   # per step: the grids of the roles that are quantized
    gap: list[dict[str, Grid]]    # per step (SMP only)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def constants(self) -> dict:
        return {k: getattr(self, k) for k in (
            "steps", "alpha", "propagation", "correction", "threshold", "multiplier_lr",
            "slack_lr", "multiplier_init", "slack_init", "multiplier_bound")}

    def product(self, x: Tensor, graph: PackedGraph, grids: dict[str, Grid], backend) -> Tensor:
        if "message" in grids:
            out = message_sum(x, graph, grids["message"])
        else:
            dinv = graph.deg_inv_sqrt
            out = backend.spmm_f32(graph.rowptr, graph.col, x, src_scale=dinv, dst_scale=dinv)
        return _requantize(_requantize(out, grids.get("aggregate")), grids.get("update"))

    def incidence(self, graph: PackedGraph) -> Tensor:
        key = ("incidence", str(graph.col.device))
        if key not in self._cache:
            from gnnq.models.smp_prop import normalized_incidence

            edges = torch.stack([graph.col.long(), graph.destinations])
            self._cache[key] = normalized_incidence(edges, graph.num_nodes)
        return self._cache[key]

    def forward(self, h: Tensor, graph: PackedGraph, backend) -> Tensor:
        from gnnq.models.smp_prop import change_energy, multiplier_step

        a, x = self.alpha, h
        if self.propagation == "appnp":
            for k in range(self.steps):
                x = (1 - a) * self.product(x, graph, self.base[k], backend) + a * h
            return x
        incidence = self.incidence(graph)
        budget = self.threshold * graph.num_edges
        multiplier, slack = h.new_tensor(self.multiplier_init), h.new_tensor(self.slack_init)
        for k in range(self.steps):
            x_tilde = (1 - a) * self.product(x, graph, self.base[k], backend) + a * h
            delta = x_tilde - x
            gap = self.product(delta, graph, self.gap[k], backend)
            direction = gap if self.correction == "adjacency" else delta - gap
            x_next = x_tilde + 2 * a * multiplier * direction
            energy = change_energy(delta, incidence.to(delta.device))
            multiplier, slack = multiplier_step(multiplier, slack, energy, budget,
                                                self.multiplier_lr, self.slack_lr,
                                                self.multiplier_bound)
            x = x_next
        return x

    def all_grids(self) -> list[Grid]:
        return [g for step in (*self.base, *self.gap) for g in step.values()]


@dataclass
class PackedModel:
    """A packed node-level model and the graph it runs on: a GCN (``layers``) or the SMP
    model (an MLP of ``layers``, then ``propagation``); ``header`` holds the provenance
    (source run, method, verification numbers) written into the file."""

    graph: PackedGraph
    layers: list[PackedLinear]    # PackedGCNLayer for "gcn"; the MLP's PackedLinear for "smp"
    header: dict = field(default_factory=dict)
    architecture: str = "gcn"
    propagation: Optional[PackedSMPProp] = None   # "smp": after the layers

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    _device_graphs: dict = field(default_factory=dict, repr=False, compare=False)

    def graph_on(self, device: torch.device) -> PackedGraph:
        if device.type == "cpu":
            return self.graph
        key = str(device)
        if key not in self._device_graphs:
            self._device_graphs[key] = self.graph.to(device)
        return self._device_graphs[key]

    @torch.no_grad()
    def forward(self, x: Tensor, backend, to_cpu: bool = True) -> Tensor:
        """Logits ``[N, C]`` for node features ``x`` on ``backend`` (moved to the CPU unless
        ``to_cpu`` is false)."""
        if x.shape != (self.graph.num_nodes, self.in_features):
            raise ValueError(f"the packed model expects features of shape "
                             f"({self.graph.num_nodes}, {self.in_features}), got {tuple(x.shape)}")
        graph = self.graph_on(backend.device)
        h = x.to(torch.float32).to(backend.device)
        for layer in self.layers:
            h = layer.forward(h, graph, backend)
        if self.propagation is not None:
            h = self.propagation.forward(h, graph, backend)
        return h.cpu() if to_cpu else h

    __call__ = forward

    def packed_bytes(self) -> dict[str, int]:
        """Bytes of the stored model: weights, grids and biases, and the graph."""
        weights = sum(layer.weight_words.numel() * 4 for layer in self.layers)
        all_grids = [g for layer in self.layers for g in layer.grids().values() if g is not None]
        if self.propagation is not None:
            all_grids += self.propagation.all_grids()
        grids = sum(t.numel() * t.element_size() for g in all_grids for t in g.tensors().values())
        biases = sum(0 if layer.bias is None else layer.bias.numel() * 4 for layer in self.layers)
        graph = (self.graph.rowptr.numel() * 8 + self.graph.col.numel() * 4
                 + self.graph.deg_inv_sqrt.numel() * 4)
        return {"weights": weights, "grids": grids, "biases": biases, "graph": graph}
