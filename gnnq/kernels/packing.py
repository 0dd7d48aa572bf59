"""Bit packing along the feature dimension, and rows grouped by bitwidth.

**Layout.** A row of ``F`` unsigned ``b``-bit codes (``1 <= b <= 8``) is stored in
``W = ceil(F / P)`` 32-bit words with ``P = 32 // b`` codes per word (INT8: 4, INT4: 8,
INT2: 16, INT1: 32; INT3: 10, INT5: 6, INT6: 5, INT7: 4). Code ``f`` of the row sits in
word ``f // P`` at bits ``[(f % P) * b, (f % P) * b + b)`` (least significant first); a
code never straddles two words, so unpacking a word is ``(word >> (k * b)) & (2^b - 1)``.
Padding codes (``f >= F``) are 0. Words are stored as ``int32`` (their bit pattern is the
``uint32`` one), row-major, so one row is one contiguous gather of ``4 W`` bytes.

**Mixed bitwidths** (A²Q's per-node bits): rows are grouped by bitwidth. ``order`` lists
the original row of every grouped row (a stable sort by bits, so rows keep their relative
order within a group); group ``g`` covers grouped rows ``row_start[g] .. row_start[g+1]``
at ``bits[g]``, its words start at ``word_start[g]`` of one flat word buffer. A uniform
tensor is the one-group case with ``order = None`` (the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 1, 8
MAX_GROUPS = 8  # distinct bitwidths of one mixed tensor (1..8)


def codes_per_word(bits: int) -> int:
    """Codes of ``bits`` bits in one 32-bit word (no code straddles two words)."""
    _check_bits(bits)
    return 32 // bits


def words_per_row(num_features: int, bits: int) -> int:
    per = codes_per_word(bits)
    return (num_features + per - 1) // per


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bitwidth {bits} is outside {MIN_BITS}..{MAX_BITS}")


def _to_int32_bits(values: Tensor) -> Tensor:
    """int64 values in [0, 2^32) as int32 with the same bit pattern."""
    return torch.where(values >= 2 ** 31, values - 2 ** 32, values).to(torch.int32)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes ``[R, F]`` (each in ``0 .. 2^bits - 1``) into int32 words ``[R, W]``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    rows, num_features = codes.shape
    per = 32 // bits
    width = words_per_row(num_features, bits)
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in 0..{2 ** bits - 1} to pack at {bits} bits")
    padded = torch.zeros(rows, width * per, dtype=torch.int64, device=codes.device)
    padded[:, :num_features] = codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(rows, width, per) << shifts).sum(-1)
    return _to_int32_bits(words)


def unpack(words: Tensor, bits: int, num_features: int) -> Tensor:
    """Inverse of :func:`pack`: int32 words ``[R, W]`` to codes ``[R, F]`` (int32)."""
    _check_bits(bits)
    per = 32 // bits
    rows, width = words.shape
    if width != words_per_row(num_features, bits):
        raise ValueError(f"{width} words per row do not hold {num_features} codes of {bits} bits")
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, width * per)[:, :num_features].contiguous()


@dataclass
class PackedRows:
    """Rows of codes packed at one bitwidth per group (see the module docstring).

    ``words`` is flat int32; ``bits`` int32 ``[G]``; ``row_start`` int64 ``[G + 1]``;
    ``word_start`` int64 ``[G]``; ``order`` int64 ``[R]`` or ``None`` (identity).
    """

    words: Tensor
    bits: Tensor
    row_start: Tensor
    word_start: Tensor
    num_features: int
    order: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return int(self.row_start[-1])

    @property
    def num_groups(self) -> int:
        return int(self.bits.numel())

    @property
    def uniform_bits(self) -> Optional[int]:
        """The bitwidth when all rows share one (``None`` for a mixed tensor)."""
        return int(self.bits[0]) if self.num_groups == 1 else None

    def group_words(self, g: int) -> Tensor:
        """Group ``g``'s words as ``[rows, W]``."""
        bits = int(self.bits[g])
        rows = int(self.row_start[g + 1] - self.row_start[g])
        width = words_per_row(self.num_features, bits)
        start = int(self.word_start[g])
        return self.words[start:start + rows * width].view(rows, width)

    def inverse_order(self) -> Optional[Tensor]:
        """``position[r]``: the grouped row of original row ``r`` (``None``: identity)."""
        if self.order is None:
            return None
        position = torch.empty_like(self.order)
        position[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return position

    def unpack(self) -> Tensor:
        """All codes ``[R, F]`` (int32) in the original row order."""
        parts = [unpack(self.group_words(g), int(self.bits[g]), self.num_features)
                 for g in range(self.num_groups)]
        grouped = torch.cat(parts) if parts else torch.zeros(0, self.num_features,
                                                             dtype=torch.int32)
        if self.order is None:
            return grouped
        codes = torch.empty_like(grouped)
        codes[self.order] = grouped
        return codes

    def row_bits(self) -> Tensor:
        """Bitwidth of every row, in the original order (int32 ``[R]``)."""
        counts = self.row_start[1:] - self.row_start[:-1]
        grouped = torch.repeat_interleave(self.bits, counts)
        if self.order is None:
            return grouped
        out = torch.empty_like(grouped)
        out[self.order] = grouped
        return out


def layout(bits: Tensor | int, rows: int, num_features: int) -> PackedRows:
    """The grouping of ``rows`` rows at one bitwidth (an int) or one per row (``[rows]``):
    a :class:`PackedRows` whose ``words`` is an empty buffer of the right size."""
    if isinstance(bits, int) or (isinstance(bits, Tensor) and bits.numel() == 1
                                 and bits.dim() == 0):
        bits = int(bits)
        _check_bits(bits)
        total = rows * words_per_row(num_features, bits)
        return PackedRows(torch.zeros(total, dtype=torch.int32),
                          torch.tensor([bits], dtype=torch.int32),
                          torch.tensor([0, rows], dtype=torch.int64),
                          torch.zeros(1, dtype=torch.int64), num_features)
    bits = bits.to(torch.int64).view(-1).cpu()
    if bits.numel() != rows:
        raise ValueError(f"{bits.numel()} bitwidths for {rows} rows")
    values = torch.unique(bits)
    if values.numel() == 1:
        return layout(int(values[0]), rows, num_features)
    if values.numel() > MAX_GROUPS:
        raise ValueError(f"at most {MAX_GROUPS} distinct bitwidths, got {values.tolist()}")
    for value in values.tolist():
        _check_bits(value)
    order = torch.sort(bits, stable=True).indices
    counts = torch.stack([(bits == v).sum() for v in values])
    row_start = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    widths = torch.tensor([words_per_row(num_features, v) for v in values.tolist()])
    sizes = counts * widths
    word_start = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    return PackedRows(torch.zeros(int(sizes.sum()), dtype=torch.int32), values.to(torch.int32),
                      row_start, word_start, num_features, order)


def pack_rows(codes: Tensor, bits: Tensor | int) -> PackedRows:
    """Pack ``codes [R, F]`` with one bitwidth (an int) or one per row (``[R]``), grouping
    rows by bitwidth in ascending order."""
    rows, num_features = codes.shape
    packed = layout(bits, rows, num_features)
    for g in range(packed.num_groups):
        lo, hi = int(packed.row_start[g]), int(packed.row_start[g + 1])
        part = codes[lo:hi] if packed.order is None else codes[packed.order[lo:hi]]
        packed.group_words(g).copy_(pack(part, int(packed.bits[g])))
    return packed
