"""One interface over the three implementations of the packed operations.

``get_backend("reference" | "cpu" | "cuda" | "auto")`` returns an object with the same
methods for each: ``quantize_pack``, ``spmm``, ``spmm_codes``, ``spmm_f32``, ``linear``,
``linear_codes``. ``auto`` is CUDA where it is available and otherwise the CPU extension,
after a one-line notice. The packed model (:mod:`gnnq.kernels.model`) and the benchmark run on
any of them; the tests compare them with each other.

Column indices given to ``spmm`` refer to the grouped numbering of the packed rows (the same as
the original numbering for a tensor of one bitwidth); ``src_scale`` / ``src_zero`` too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from gnnq.errors import GnnqError, choice_error
from gnnq.kernels import reference
from gnnq.kernels.grid import ROUNDING_CODE, Grid
from gnnq.kernels.packing import PackedRows, layout

BACKENDS = ("auto", "cpu", "cuda", "reference")


def _grid_args(grid: Grid, rows: int, cols: int, device) -> tuple[int, list[Tensor]]:
    """(axis, [scale, zero, umin, umax]) for the kernels: row grids per row, column and
    tensor grids per column."""
    if grid.axis == "row":
        axis, size = 0, rows
    else:
        axis, size = 1, cols
    out = []
    for t in (grid.scale, grid.zero_point, grid.umin, grid.umax):
        if t.numel() == 1 and size != 1:
            t = t.expand(size)
        out.append(t.contiguous().to(device))
    return axis, out


def _per_row(t: Tensor, rows: int, device) -> Tensor:
    return (t.expand(rows) if t.numel() == 1 and rows != 1 else t).contiguous().to(device)


class ReferenceBackend:
    """The integer reference (:mod:`gnnq.kernels.reference`), float64 inside."""

    name = "reference"
    device = torch.device("cpu")

    def quantize_pack(self, x: Tensor, grid: Grid, lay: Optional[PackedRows] = None) -> PackedRows:
        return reference.quantize_pack(x, grid)

    def spmm(self, rowptr, col, packed, **kw) -> Tensor:
        return reference.spmm(rowptr, col, packed, **kw)

    def spmm_codes(self, rowptr, col, packed) -> Tensor:
        return reference.spmm_codes(rowptr, col, packed).to(torch.int32)

    def spmm_f32(self, rowptr, col, x, **kw) -> Tensor:
        return reference.spmm_f32(rowptr, col, x, **kw)

    def linear(self, packed, x_grid, w_words, w_grid, bias=None, relu=False) -> Tensor:
        return reference.linear(packed, x_grid, w_words, w_grid, bias, relu)

    def linear_codes(self, packed, w_words, w_bits) -> Tensor:
        return reference.linear_codes(packed, w_words, w_bits).to(torch.int32)

    def synchronize(self) -> None:
        pass


class ExtensionBackend:
    """The compiled kernels (CPU extension or CUDA extension): same calls, own device."""

    def __init__(self, name: str, module, device: torch.device) -> None:
        self.name, self.ext, self.device = name, module, device

    def _dev(self, t: Optional[Tensor], dtype=None) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.to(self.device)
        return (t if dtype is None else t.to(dtype)).contiguous()

    def _packed(self, packed: PackedRows) -> tuple:
        return (self._dev(packed.words, torch.int32), packed.bits.cpu().to(torch.int32),
                packed.row_start.cpu().to(torch.int64), packed.word_start.cpu().to(torch.int64))

    def quantize_pack(self, x: Tensor, grid: Grid, lay: Optional[PackedRows] = None) -> PackedRows:
        rows, cols = x.shape
        if lay is None:
            lay = layout(grid.row_bits(rows), rows, cols)
        axis, (scale, zero, umin, umax) = _grid_args(grid, rows, cols, self.device)
        words = self.ext.quantize_pack(
            self._dev(x, torch.float32), lay.bits.cpu(), lay.row_start.cpu(),
            lay.word_start.cpu(), self._dev(lay.order), lay.words.numel(), axis, scale, zero,
            umin, umax, ROUNDING_CODE[grid.rounding])
        return PackedRows(words, lay.bits, lay.row_start, lay.word_start, cols, lay.order)

    def spmm(self, rowptr, col, packed, *, src_scale=None, dst_scale=None, src_zero=None,
             col_scale=None, col_zero=None, bias=None, relu=False) -> Tensor:
        f32 = torch.float32
        return self.ext.spmm(
            self._dev(rowptr, torch.int64), self._dev(col, torch.int32), *self._packed(packed),
            packed.num_features, self._dev(src_scale, f32), self._dev(dst_scale, f32),
            self._dev(src_zero, f32), self._dev(col_scale, f32),
            self._dev(col_zero, torch.int32), self._dev(bias, f32), relu)

    def spmm_codes(self, rowptr, col, packed) -> Tensor:
        return self.ext.spmm_codes(self._dev(rowptr, torch.int64), self._dev(col, torch.int32),
                                   *self._packed(packed), packed.num_features)

    def spmm_f32(self, rowptr, col, x, *, src_scale=None, dst_scale=None, bias=None,
                 relu=False) -> Tensor:
        f32 = torch.float32
        return self.ext.spmm_f32(self._dev(rowptr, torch.int64), self._dev(col, torch.int32),
                                 self._dev(x, f32), self._dev(src_scale, f32),
                                 self._dev(dst_scale, f32), self._dev(bias, f32), relu)

    def linear(self, packed, x_grid: Grid, w_words, w_grid: Grid, bias=None,
               relu=False) -> Tensor:
        if x_grid.axis == "column":
            raise GnnqError("The integer dense transform needs one input scale per row (node) "
                            "or per tensor; a per-channel input grid cannot be factored out "
                            "of the dot product.")
        rows, out = packed.num_rows, w_words.size(0)
        f32 = torch.float32
        return self.ext.linear(
            *self._packed(packed), self._dev(packed.order), packed.num_features,
            self._dev(w_words, torch.int32), int(w_grid.uniform_bits),
            _per_row(x_grid.scale, rows, self.device), _per_row(x_grid.zero_point, rows,
                                                                self.device),
            _per_row(w_grid.scale, out, self.device), _per_row(w_grid.zero_point, out,
                                                               self.device),
            self._dev(bias, f32), relu)

    def linear_codes(self, packed, w_words, w_bits) -> Tensor:
        return self.ext.linear_codes(*self._packed(packed), self._dev(packed.order),
                                     packed.num_features, self._dev(w_words, torch.int32),
                                     int(w_bits))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


_cache: dict[str, object] = {}


def get_backend(name: str = "auto"):
    """The backend ``name`` (see the module docstring); extensions build on first use."""
    if name not in BACKENDS:
        raise choice_error("kernel backend", name, BACKENDS)
    if name == "auto":
        from gnnq.kernels import cuda

        if cuda.available():
            name = "cuda"
        else:
            cuda.notice()
            name = "cpu"
    if name not in _cache:
        if name == "reference":
            _cache[name] = ReferenceBackend()
        elif name == "cpu":
            from gnnq.kernels import cpu

            _cache[name] = ExtensionBackend("cpu", cpu.load(), torch.device("cpu"))
        else:
            from gnnq.kernels import cuda

            _cache[name] = ExtensionBackend("cuda", cuda.load(), torch.device("cuda"))
    return _cache[name]
