"""Integer grids: how a float tensor becomes unsigned codes, and back.

A :class:`Grid` is what every quantizer exports, whatever the method (A²Q, smoothness-aware
QLR, Degree-Quant): per group ``g`` a scale ``s_g``, an integer zero point ``z_g``, the range
``umin_g .. umax_g`` of stored codes and their storage bits ``b_g``. A value ``x`` of group
``g`` is stored as

    u = clamp(round(x / s_g), umin_g - z_g, umax_g - z_g) + z_g,      x̂ = s_g (u - z_g),

with ``round`` half away from zero, computed as ``sign(v) * floor(|v| + 0.5)`` in float32
(``half_away``, A²Q's exact expression), half to even (``half_even``, ``torch.round``), or
half to even after adding the zero point, ``round(x / s + z) - z`` (``half_even_zero``, the
smoothness-aware QLR quantizer's order of operations; with a tie the parity of ``z`` matters).
Examples:

- A²Q signed ``b``-bit grid ``{-Q..Q}``, ``Q = 2^(b-1) - 1``: ``z = 2^(b-1)``, ``u in 1 .. 2^b - 1``.
- A²Q unsigned (post-ReLU) ``b``-bit grid ``{0..2^b - 1}``: ``z = 0``.
- Asymmetric min/max (QLR, Degree-Quant): ``z = round(-min / s)``, ``u in 0 .. 2^b - 1``.

Groups run along an axis: ``row`` (one per node of a feature matrix, or per output channel of
a weight ``[out, in]``), ``column`` (one per feature channel) or ``tensor`` (one group).
Codes are packed along the feature dimension (:mod:`gnnq.kernels.packing`), so a ``column``
or ``tensor`` grid must use one bitwidth; ``row`` grids may mix bitwidths (A²Q).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

AXES = ("row", "column", "tensor")
ROUNDING = ("half_away", "half_even", "half_even_zero")
ROUNDING_CODE = {"half_away": 0, "half_even": 1, "half_even_zero": 2}


@dataclass
class Grid:
    axis: str
    bits: Tensor        # int32 [G], storage bits 1..8
    scale: Tensor       # float32 [G], > 0
    zero_point: Tensor  # int32 [G]
    umin: Tensor        # int32 [G]
    umax: Tensor        # int32 [G]
    rounding: str = "half_away"

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"grid axis {self.axis!r} is not one of {AXES}")
        if self.rounding not in ROUNDING:
            raise ValueError(f"grid rounding {self.rounding!r} is not one of {ROUNDING}")
        self.bits = self.bits.to(torch.int32).reshape(-1)
        self.scale = self.scale.to(torch.float32).reshape(-1)
        self.zero_point = self.zero_point.to(torch.int32).reshape(-1)
        self.umin = self.umin.to(torch.int32).reshape(-1)
        self.umax = self.umax.to(torch.int32).reshape(-1)
        sizes = {t.numel() for t in (self.bits, self.scale, self.zero_point, self.umin, self.umax)}
        if len(sizes) != 1:
            raise ValueError(f"grid tensors disagree on the number of groups: {sorted(sizes)}")

    @property
    def groups(self) -> int:
        return self.scale.numel()

    @property
    def uniform_bits(self) -> int | None:
        values = torch.unique(self.bits)
        return int(values[0]) if values.numel() == 1 else None

    def _expand(self, t: Tensor, shape: torch.Size) -> Tensor:
        if self.axis == "row":
            return t.view(-1, 1)
        if self.axis == "column":
            return t.view(1, -1)
        return t.view(1, 1)

    def check_shape(self, shape: torch.Size) -> None:
        want = {"row": shape[0], "column": shape[1], "tensor": 1}[self.axis]
        if self.groups != want:
            raise ValueError(f"a {self.axis} grid of {self.groups} groups does not fit a tensor "
                             f"of shape {tuple(shape)}")

    def quantize(self, x: Tensor) -> Tensor:
        """Codes (int32, same shape as ``x``) of a 2-D float tensor."""
        self.check_shape(x.shape)
        scale = self._expand(self.scale, x.shape)
        zero = self._expand(self.zero_point, x.shape).to(torch.float32)
        v = x.to(torch.float32) / scale
        if self.rounding == "half_away":
            q = torch.sign(v) * torch.floor(v.abs() + 0.5)
        elif self.rounding == "half_even":
            q = torch.round(v)
        else:
            q = torch.round(v + zero) - zero
        low = self._expand(self.umin, x.shape).to(torch.float32) - zero
        high = self._expand(self.umax, x.shape).to(torch.float32) - zero
        q = torch.minimum(torch.maximum(q, low), high)
        q = torch.nan_to_num(q, nan=0.0)
        return (q + zero).to(torch.int32)

    def dequantize(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``s (u - z)`` for codes of a 2-D tensor."""
        self.check_shape(codes.shape)
        zero = self._expand(self.zero_point, codes.shape).to(dtype)
        return self._expand(self.scale, codes.shape).to(dtype) * (codes.to(dtype) - zero)

    def to(self, device) -> "Grid":
        """This grid with its tensors on ``device`` (itself when they are there already)."""
        if self.scale.device == torch.device(device):
            return self
        return Grid(self.axis, self.bits.to(device), self.scale.to(device),
                    self.zero_point.to(device), self.umin.to(device), self.umax.to(device),
                    self.rounding)

    def row_bits(self, rows: int) -> Tensor | int:
        """Bits per row for packing: an int (uniform) or an int32 ``[rows]``."""
        uniform = self.uniform_bits
        if uniform is not None:
            return uniform
        if self.axis != "row":
            raise ValueError("only row grids may mix bitwidths (codes are packed along columns)")
        return self.bits

    def select(self, index: Tensor) -> "Grid":
        """The grid of a subset (or permutation) of the rows of a row grid."""
        if self.axis != "row":
            return self
        return Grid(self.axis, self.bits[index], self.scale[index], self.zero_point[index],
                    self.umin[index], self.umax[index], self.rounding)

    def tensors(self) -> dict[str, Tensor]:
        return {"bits": self.bits.to(torch.uint8), "scale": self.scale,
                "zero_point": self.zero_point, "umin": self.umin, "umax": self.umax}

    @staticmethod
    def from_tensors(axis: str, rounding: str, tensors: dict[str, Tensor]) -> "Grid":
        return Grid(axis, tensors["bits"].to(torch.int32), tensors["scale"],
                    tensors["zero_point"], tensors["umin"], tensors["umax"], rounding)


def symmetric_grid(axis: str, scale: Tensor, bits: Tensor, unsigned: bool,
                   rounding: str = "half_away") -> Grid:
    """A²Q's grids: signed ``{-(2^(b-1)-1) .. 2^(b-1)-1}`` or unsigned ``{0 .. 2^b - 1}``."""
    bits = bits.to(torch.int32).reshape(-1)
    scale = scale.to(torch.float32).reshape(-1)
    if unsigned:
        zero = torch.zeros_like(bits)
        umin = torch.zeros_like(bits)
    else:
        zero = 2 ** (bits - 1)
        umin = torch.ones_like(bits)
    umax = 2 ** bits - 1
    return Grid(axis, bits, scale, zero, umin, umax, rounding)


def affine_grid(axis: str, scale: Tensor, zero_point: Tensor, bits: Tensor | int,
                rounding: str = "half_even") -> Grid:
    """An asymmetric (min/max) grid over all ``2^b`` codes."""
    scale = scale.to(torch.float32).reshape(-1)
    bits = torch.as_tensor(bits, dtype=torch.int32).reshape(-1).expand(scale.numel()).clone()
    return Grid(axis, bits, scale, torch.as_tensor(zero_point).reshape(-1).expand(
        scale.numel()).clone(), torch.zeros_like(bits), 2 ** bits - 1, rounding)
