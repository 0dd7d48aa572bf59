"""The packed integer GCN: graph, layers, and inference on any backend.

One layer computes, with ``Ĝ = D^{-1/2} (A + I) D^{-1/2}`` and the quantizer grids of the
trained model (:mod:`gnnq.kernels.grid`)::

    X_q  = Q_input(X)                     codes, one scale (and bitwidth) per node
    H    = X_q W_q^T                      integer products, scaled per node and per channel
    H_q  = Q_feature(H)                   codes, one scale per channel (or per node)
    Y    = Ĝ H_q + b                      packed SpMM; D^{-1/2} folded into per-node factors
    [Y   = Q_aggregate / Q_update(Y)]     requantized where the model has those quantizers
    ReLU between layers (fused into the SpMM epilogue where nothing sits in between)

A role without a quantizer stays FP32 (the raw first-layer input: ``H = X W_q^T`` in float;
no feature quantizer: an FP32 SpMM). Row grids may mix bitwidths; those rows are packed in
groups of equal bitwidth (:mod:`gnnq.kernels.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    g = Grid(grid.axis, grid.bits, grid.scale.to(y.device), grid.zero_point.to(y.device),
             grid.umin.to(y.device), grid.umax.to(y.device), grid.rounding)
    return g.dequantize(g.quantize(y))


@dataclass
class PackedGCNLayer:
    in_features: int
    out_features: int
    weight_words: Tensor                # int32 [out, words per row], codes along in_features
    weight: Grid                        # one group per output channel (or one)
    input: Optional[Grid] = None        # row (node) or tensor grid
    feature: Optional[Grid] = None      # column (channel), tensor or row grid
    message: Optional[Grid] = None      # column or tensor grid, applied to every edge
    aggregate: Optional[Grid] = None
    update: Optional[Grid] = None
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

    def message_aggregate(self, y: Tensor, graph: PackedGraph) -> Tensor:
        """``sum_j Q_message(d_i^{-1/2} d_j^{-1/2} h_j)`` with ``h = Q_feature(y)``: every
        edge's product is requantized on the message grid (what Degree-Quant and the
        smoothness-aware quantizer train with), the codes are summed as integers per
        destination, and one scale turns each sum into a value. Runs as PyTorch ops on any
        device (no packed kernel computes per-edge requantization)."""
        grid, dev = self.message, y.device
        h = _requantize(y, self.feature)
        rowptr, col = graph.rowptr.to(dev), graph.col.to(dev).long()
        dinv = graph.deg_inv_sqrt.to(dev)
        n = rowptr.numel() - 1
        dst = torch.repeat_interleave(torch.arange(n, device=dev), rowptr[1:] - rowptr[:-1])
        g = Grid(grid.axis, grid.bits, grid.scale.to(dev), grid.zero_point.to(dev),
                 grid.umin.to(dev), grid.umax.to(dev), grid.rounding)
        zero = g.zero_point.to(torch.int64).view(1, -1)
        sums = torch.zeros(n, h.size(1), dtype=torch.int64, device=dev)
        for start in range(0, col.numel(), MESSAGE_CHUNK):
            j, i = col[start:start + MESSAGE_CHUNK], dst[start:start + MESSAGE_CHUNK]
            # The same float32 product as the fake-quantized layer: (d_j^-1/2 d_i^-1/2) h_j.
            m = (dinv[j] * dinv[i]).view(-1, 1) * h[j]
            sums.index_add_(0, i, g.quantize(m).to(torch.int64) - zero)
        return (sums.to(torch.float64) * g.scale.to(torch.float64).view(1, -1)).to(torch.float32)

    def aggregate_step(self, y: Tensor, graph: PackedGraph, backend) -> Tensor:
        """``Ĝ Q_feature(H) + b`` with the layer's requantizers and ReLU."""
        fuse = self.aggregate is None and self.update is None and self.message is None
        bias = self.bias if fuse else None
        relu = self.relu and fuse
        dinv = graph.deg_inv_sqrt
        if self.message is not None:
            out = self.message_aggregate(y, graph)
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


@dataclass
class PackedModel:
    """A packed node-level GCN and the graph it runs on; ``header`` holds the provenance
    (source run, method, verification numbers) written into the file."""

    graph: PackedGraph
    layers: list[PackedGCNLayer]
    header: dict = field(default_factory=dict)
    architecture: str = "gcn"

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
        return h.cpu() if to_cpu else h

    __call__ = forward

    def packed_bytes(self) -> dict[str, int]:
        """Bytes of the stored model: weights, grids and biases, and the graph."""
        weights = sum(layer.weight_words.numel() * 4 for layer in self.layers)
        grids = 0
        for layer in self.layers:
            for role in ROLES:
                grid = getattr(layer, role)
                if grid is not None:
                    grids += sum(t.numel() * t.element_size() for t in grid.tensors().values())
        biases = sum(0 if layer.bias is None else layer.bias.numel() * 4 for layer in self.layers)
        graph = (self.graph.rowptr.numel() * 8 + self.graph.col.numel() * 4
                 + self.graph.deg_inv_sqrt.numel() * 4)
        return {"weights": weights, "grids": grids, "biases": biases, "graph": graph}
