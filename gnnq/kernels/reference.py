"""The integer reference: the exact arithmetic of a packed model, in plain PyTorch.

Every kernel (CPU, CUDA) is tested against these functions. Integer parts are computed
exactly (int64 or float64 on integers below 2^53), scaled parts in float64, so a float32
kernel is compared with a value whose own rounding error is negligible.

**Aggregation** (``spmm``), row ``i`` of the CSR (its in-edges ``j -> i``, self-loops
included, duplicates summed)::

    out[i, c] = d_i * s_c * ( sum_j a_j u[j, c]  -  sum_j a_j z_j  -  zc_c * sum_j a_j ) + bias_c

with ``u`` the stored codes of the source rows, ``a_j`` a per-source-node factor, ``d_i`` a
per-destination factor, ``s_c``/``zc_c`` per-column scale/zero point and ``z_j`` a per-row
zero point. For a GCN layer, ``a_j = d_j^{-1/2}`` (times the node's scale when the features
have one scale per node) and ``d_i = d_i^{-1/2}``: the symmetric normalisation is folded into
per-node factors, so the kernels read no edge values, only int32 column indices.

Why float accumulation of ``a_j * u`` and not int32: with per-node factors there is no
common integer scale to pull out of the sum; the codes are exact small integers and each
product ``a_j * u`` is one float rounding, the same as the fake-quantized model's own
float32 arithmetic. Where the factors are all 1 (sum aggregation, GIN) ``spmm_codes`` gives
the exact int32 sums.

**Dense transform** (``linear``), input row ``r`` and output channel ``o``::

    acc = sum_f u_x[r, f] u_w[o, f]                         (exact integer)
    out = s_r * s_o * (acc - zw_o sum_f u_x - zx_r sum_f u_w + K zx_r zw_o) + bias_o

i.e. ``sum_f (u_x - zx)(u_w - zw)`` without ever storing signed codes.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from gnnq.kernels.grid import Grid
from gnnq.kernels.packing import PackedRows, pack_rows, unpack


def _grouped_codes(packed: PackedRows) -> Tensor:
    """All codes in grouped row order (the numbering column indices refer to)."""
    parts = [unpack(packed.group_words(g), int(packed.bits[g]), packed.num_features)
             for g in range(packed.num_groups)]
    return torch.cat(parts) if parts else torch.zeros(0, packed.num_features, dtype=torch.int32)


def _csr(rowptr: Tensor, col: Tensor, values: Tensor, cols: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(rowptr.to(torch.int64), col.to(torch.int64), values,
                                       (rowptr.numel() - 1, cols))


def _aggregate64(rowptr: Tensor, col: Tensor, a: Optional[Tensor], dense: Tensor) -> Tensor:
    """``sum_j a_j dense[j]`` over each CSR row, in float64."""
    values = (torch.ones(col.numel(), dtype=torch.float64) if a is None
              else a.to(torch.float64)[col.long()])
    if col.numel() == 0:
        return torch.zeros(rowptr.numel() - 1, dense.size(1), dtype=torch.float64)
    return _csr(rowptr, col, values, dense.size(0)) @ dense.to(torch.float64)


def spmm_codes(rowptr: Tensor, col: Tensor, packed: PackedRows) -> Tensor:
    """Exact sums of the stored codes over each row's in-edges, int64 ``[N, F]``."""
    codes = _grouped_codes(packed)
    sums = _aggregate64(rowptr, col, None, codes)  # integers < 2^53: exact
    return sums.round().to(torch.int64)


def spmm(rowptr: Tensor, col: Tensor, packed: PackedRows, *, src_scale: Optional[Tensor] = None,
         dst_scale: Optional[Tensor] = None, src_zero: Optional[Tensor] = None,
         col_scale: Optional[Tensor] = None, col_zero: Optional[Tensor] = None,
         bias: Optional[Tensor] = None, relu: bool = False, dtype=torch.float32) -> Tensor:
    """The packed aggregation (module docstring), computed in float64, returned as ``dtype``.
    ``col``, ``src_scale`` and ``src_zero`` are in the grouped numbering of ``packed``."""
    codes = _grouped_codes(packed)
    acc = _aggregate64(rowptr, col, src_scale, codes)
    ones = torch.ones(codes.size(0), 1, dtype=torch.float64)
    asum = _aggregate64(rowptr, col, src_scale, ones)
    if src_zero is not None:
        acc = acc - _aggregate64(rowptr, col, src_scale, src_zero.to(torch.float64).view(-1, 1))
    if col_zero is not None:
        acc = acc - asum * col_zero.to(torch.float64).view(1, -1)
    if dst_scale is not None:
        acc = acc * dst_scale.to(torch.float64).view(-1, 1)
    if col_scale is not None:
        acc = acc * col_scale.to(torch.float64).view(1, -1)
    if bias is not None:
        acc = acc + bias.to(torch.float64)
    if relu:
        acc = acc.clamp_min(0)
    return acc.to(dtype)


def spmm_abs_bound(rowptr: Tensor, col: Tensor, packed: PackedRows, *,
                   src_scale: Optional[Tensor] = None, dst_scale: Optional[Tensor] = None,
                   src_zero: Optional[Tensor] = None, col_scale: Optional[Tensor] = None,
                   col_zero: Optional[Tensor] = None) -> Tensor:
    """``|d_i s_c| * sum_j |a_j| (|u| + |z_j| + |zc_c|)``: the magnitude float errors scale with."""
    codes = _grouped_codes(packed).abs().to(torch.float64)
    a = None if src_scale is None else src_scale.abs()
    acc = _aggregate64(rowptr, col, a, codes)
    ones = torch.ones(codes.size(0), 1, dtype=torch.float64)
    asum = _aggregate64(rowptr, col, a, ones)
    if src_zero is not None:
        acc = acc + _aggregate64(rowptr, col, a, src_zero.abs().to(torch.float64).view(-1, 1))
    if col_zero is not None:
        acc = acc + asum * col_zero.abs().to(torch.float64).view(1, -1)
    if dst_scale is not None:
        acc = acc * dst_scale.abs().to(torch.float64).view(-1, 1)
    if col_scale is not None:
        acc = acc * col_scale.abs().to(torch.float64).view(1, -1)
    return acc


def spmm_f32(rowptr: Tensor, col: Tensor, x: Tensor, *, src_scale: Optional[Tensor] = None,
             dst_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
             relu: bool = False) -> Tensor:
    """``d_i sum_j a_j x[j] + bias`` for float features (no quantized aggregation input)."""
    acc = _aggregate64(rowptr, col, src_scale, x)
    if dst_scale is not None:
        acc = acc * dst_scale.to(torch.float64).view(-1, 1)
    if bias is not None:
        acc = acc + bias.to(torch.float64)
    if relu:
        acc = acc.clamp_min(0)
    return acc.to(torch.float32)


def linear_codes(packed: PackedRows, w_words: Tensor, w_bits: int) -> Tensor:
    """Exact ``sum_f u_x[r, f] u_w[o, f]``, int64 ``[R, O]`` in the original row order."""
    ux = packed.unpack().to(torch.float64)
    uw = unpack(w_words, w_bits, packed.num_features).to(torch.float64)
    return (ux @ uw.t()).round().to(torch.int64)  # integers < 2^53: exact


def linear(packed: PackedRows, x_grid: Grid, w_words: Tensor, w_grid: Grid,
           bias: Optional[Tensor] = None, relu: bool = False, dtype=torch.float32) -> Tensor:
    """The packed dense transform (module docstring); ``x_grid`` is a row (or tensor) grid in
    the original row order, ``w_grid`` one per output channel (or tensor)."""
    ux = packed.unpack().to(torch.float64)
    w_bits = w_grid.uniform_bits
    uw = unpack(w_words, w_bits, packed.num_features).to(torch.float64)
    x_values = ux - _as_column(x_grid.zero_point, ux.size(0))
    w_values = uw - _as_column(w_grid.zero_point, uw.size(0))
    out = (x_values @ w_values.t()) * _as_column(x_grid.scale, ux.size(0)) \
        * _as_column(w_grid.scale, uw.size(0)).view(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float64)
    if relu:
        out = out.clamp_min(0)
    return out.to(dtype)


def _as_column(t: Tensor, rows: int) -> Tensor:
    t = t.to(torch.float64).view(-1, 1)
    return t.expand(rows, 1) if t.size(0) == 1 else t


def quantize_pack(x: Tensor, grid: Grid) -> PackedRows:
    """Codes of ``x`` on ``grid``, packed (rows grouped by bitwidth for a mixed row grid)."""
    return pack_rows(grid.quantize(x), grid.row_bits(x.size(0)))
