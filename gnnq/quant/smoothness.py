"""Smoothness-aware low-bit quantization (Wang et al., CIKM 2023): the QLR quantizer with
BT/BT* truncation. Spec: ``docs/smoothness.md`` §2; the SMP propagation that goes with it is
:mod:`gnnq.models.smp_prop`.

**QLR** (quantization with learnable ranges, spec §2.1). Per tensor, asymmetric, unsigned
codes ``{0 .. 2^b - 1}``. In training each call observes ``m = min(x)`` and ``M = max(x)``
(kept in buffers: evaluation reuses the last training range). One learnable scalar ``α``
scales the range, ``[min(0, α m), max(0, α M)]``; then

    s = (M_c - m_c) / (2^b - 1),   z = clamp(round(-m_c / s), 0, 2^b - 1),
    q = clamp(round(x / s + z), 0, 2^b - 1),   x̂ = (q - z) s.

``α`` starts at the value of a grid that minimises the mean ``|x̂ - x|`` on the first tensor
the quantizer sees (``0.1..1.0`` for 2 bits, ``0.02..1.0`` otherwise), plus 0.1 when it is
below 0.1 (below 0.5 for BT*), as the official code does (spec §2.2).

**BT / BT*** (2 bits only, spec §2.6): 8-bit codes of the same range, truncated to the four
levels ``{0, 85, 170, 255}`` (``round(q8 / 85) * 85``) and dequantized on the 8-bit grid. BT*
adds the tensor's integer-rounded sample skewness (taken when ``α`` is initialised) to the
8-bit code before truncating, which moves the rounding thresholds toward the tail.

**Gradients.** The input gradient is straight-through: passed to every element
(``ste="identity"``, default) or zero where the code was clipped (``ste="masked"``). The
official code means to mask but, computing the mask on its output, passes nearly everything;
on Cora INT2-BT* the identity form validates clearly better (results/smoothness.md). The
range gradient, with ``s ∝ α`` and ``z`` independent of ``α``:

- ``alpha_grad="lsq"`` (default, the design's intent): on the raw input,
  ``∂x̂/∂α = (x̂ - 1_inside · x) / α``, i.e. ``(s/α)(q - z)`` on clipped elements (≈ ``m``
  below the range, ``M`` above) and the LSQ residual ``(s/α)(round(v) - v)``, ``v = x/s + z``,
  inside it (rounding taken straight through).
- ``alpha_grad="code"``: the official backward (spec §2.3). It saves the *dequantized output*,
  so its masks (``x̂ < m_c``, ``x̂ > M_c``, also used for the input gradient) catch only
  extreme levels pushed out by the rounding of ``z``, its inside term ``round(v) - v`` is
  float noise, and it drops the ``s/α`` factor: ``Σ g (1_below m_c + 1_above M_c +
  1_inside (round(v) - v))``. This form also uses the official input-gradient mask.

**Placement** (spec §2.5): every role of every layer gets its own QLR quantizer at
``quant.bits``: linear inputs (the raw features too), weights and outputs; at every SMP
propagation step the messages, aggregates and updates of both the base and the correction
propagation; GCN/GIN/GAT get theirs through the same roles (GAT's attention vectors and edge
logits included). ``share_prop_alpha`` reproduces the official code's single ``α`` per role
shared by all propagation steps (each step keeps its own observer; every site's
initialisation overwrites the shared value, the last one wins).

**Metrics** (:mod:`gnnq.quant.cost`): ``avg_bits`` counts the activation quantizers (the
feature path: inputs, linear outputs, messages, aggregates, updates, GAT edge logits), all at
``quant.bits``, so it equals ``quant.bits``; weights and GAT attention vectors are parameters
and count toward ``compression_ratio`` only. ``compression_ratio`` is ``32 / bits`` over all
of them (the per-tensor ``α``, scale and zero-point, and the FP32 biases, are not counted).
BT and BT* codes take 2 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gnnq.config import check_choice, check_range, parse_method_config
from gnnq.errors import GnnqError
from gnnq.kernels.cpu import training_ops_for
from gnnq.quant.base import (BitCost, LayerSpec, Quantizer, csr_values, csr_with_values,
                             mostly_zeros)

BITS = (2, 4, 8)
TRUNCATIONS = ("none", "bt", "btstar")
ALPHA_GRADS = ("lsq", "code")
STE_MODES = ("identity", "masked")
BT_LEVELS = 85          # 255 / 3: the 8-bit distance between two 2-bit levels
ALPHA_MIN = 1e-3        # α is clamped here in forward (a zero range has no gradient)
SCALE_EPS = torch.finfo(torch.float32).eps
#: Roles of activations (the feature path, counted in ``avg_bits``); the others are parameters.
ACTIVATION_ROLES = ("input", "feature", "message", "aggregate", "update", "score")
#: The roles each kind of layer uses (``prop``: one SMP/APPNP propagation step).
KIND_ROLES = {
    "linear": ("input", "weight", "feature"),
    "gcn": ("input", "weight", "feature", "message", "aggregate", "update"),
    "gin": ("input", "message", "aggregate", "update"),
    "gat": ("input", "weight", "feature", "attention", "score", "message", "aggregate",
            "update"),
    "prop": ("message", "aggregate", "update"),
}


# -- configuration -------------------------------------------------------------------------
@dataclass
class SmoothnessConfig:
    """The options of ``+quant=smoothness``; ``conf/quant/smoothness.yaml`` documents each."""

    name: str = "smoothness"
    bits: int = 4
    truncation: str = "none"
    alpha_grad: str = "lsq"
    ste: str = "identity"
    share_prop_alpha: bool = False
    reinit_every: int = 0
    lr: float = 1e-4
    weight_decay: float = 1e-5
    quantize_raw_input: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise GnnqError(f"Invalid value for quant.bits: {self.bits!r}. Valid choices: "
                            f"{', '.join(map(str, BITS))} (smoothness-aware QLR).")
        check_choice("quant.truncation", self.truncation, TRUNCATIONS)
        check_choice("quant.alpha_grad", self.alpha_grad, ALPHA_GRADS)
        check_choice("quant.ste", self.ste, STE_MODES)
        if self.truncation != "none" and self.bits != 2:
            raise GnnqError(f"quant.truncation={self.truncation} (bitwise truncation) works on "
                            f"2-bit codes only, but quant.bits={self.bits}. Set quant.bits=2 "
                            f"or quant.truncation=none.")
        check_range("quant.reinit_every", self.reinit_every, 0)
        check_range("quant.lr", self.lr, 0.0)
        check_range("quant.weight_decay", self.weight_decay, 0.0)


def parse_config(quant: dict[str, Any]) -> SmoothnessConfig:
    """``quant`` checked against :class:`SmoothnessConfig`; errors name the key and what is
    valid."""
    return parse_method_config(SmoothnessConfig, quant, "smoothness")


# -- the grid --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """One tensor's quantization grid: dequantized value ``(q - zero) * scale``."""

    scale: Tensor      # 0-d
    zero: Tensor       # 0-d, an integer value
    qmax: int          # top code of the grid codes are computed on (255 for BT/BT*)
    low: Tensor        # m_c, the scaled range (0 forced inside)
    high: Tensor       # M_c
    degenerate: bool   # empty range: scale 1, zero 0, no range gradient


def make_grid(low: Tensor, high: Tensor, alpha: Tensor, qmax: int) -> Grid:
    """The grid of the range ``[alpha * low, alpha * high]`` widened to contain 0."""
    low_c = torch.clamp(alpha * low, max=0.0)
    high_c = torch.clamp(alpha * high, min=0.0)
    degenerate = bool(high_c <= low_c)
    if degenerate:
        one = torch.ones((), dtype=low.dtype, device=low.device)
        return Grid(one, one * 0, qmax, low_c, high_c, True)
    scale = torch.clamp((high_c - low_c) / qmax, min=SCALE_EPS)
    zero = torch.clamp(torch.round(-low_c / scale), 0, qmax)
    return Grid(scale, zero, qmax, low_c, high_c, False)


def quantize_codes(x: Tensor, grid: Grid, truncation: str = "none", skew: int = 0,
                   with_mask: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Integer codes of ``x`` on ``grid`` (as floats) and the mask of elements whose code was
    not clipped (``None`` without ``with_mask``). BT/BT* truncate 8-bit codes to
    ``{0, 85, 170, 255}``."""
    raw = (x / grid.scale).add_(grid.zero).round_()
    if with_mask:
        code = raw.clamp(0, grid.qmax)
        inside = code.eq(raw)
    else:
        code, inside = raw.clamp_(0, grid.qmax), None
    if truncation != "none":
        shift = skew if truncation == "btstar" else 0
        code.add_(shift).div_(BT_LEVELS).round_().mul_(BT_LEVELS).clamp_(0, grid.qmax)
    return code, inside


def fake_quantize(x: Tensor, grid: Grid, truncation: str = "none", skew: int = 0,
                  with_mask: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``(q - z) s`` on ``grid`` and the not-clipped mask (see :func:`quantize_codes`)."""
    ops = training_ops_for(x)
    if ops is not None:  # one pass instead of up to twelve, the same float32 operations
        shift = skew if truncation == "btstar" else 0
        out, inside = ops.qlr_fake_quantize(
            x, float(grid.scale), float(grid.zero), float(grid.qmax), truncation != "none",
            float(shift), float(BT_LEVELS), with_mask)
        return out, inside if with_mask else None
    code, inside = quantize_codes(x, grid, truncation, skew, with_mask)
    return code.sub_(grid.zero).mul_(grid.scale), inside


def sparse_support(x: Tensor, truncation: str) -> Optional[Tensor]:
    """The flat indices of dense ``x``'s nonzeros when quantizing only those gives the dense
    result, and is worth it (:func:`~gnnq.quant.base.mostly_zeros`); ``None`` otherwise.

    Every grid contains 0 with an integer zero point, so a zero stays exactly 0, inside the
    range, with no range gradient (``x̂ - x = 0``; the official form's ``round(v) - v = 0``).
    Truncation can move it off 0, and an input gradient would have to reach the zeros too, so
    those take the dense path."""
    if truncation != "none" or x.requires_grad or not mostly_zeros(x):
        return None
    return x.reshape(-1).nonzero().squeeze(1)


def sample_skewness(x: Tensor, numel: Optional[int] = None) -> int:
    """The biased sample skewness ``m3 / m2^1.5`` (scipy's default), rounded to an integer;
    0 for a constant tensor. ``numel``: ``x`` holds the nonzeros of a tensor of this many
    elements, the rest zeros."""
    x = x.detach().double().flatten()
    n = x.numel() if numel is None else numel
    zeros = n - x.numel()
    if zeros == 0:
        centred = x - x.mean()
        m2, m3 = centred.pow(2).mean(), centred.pow(3).mean()
    else:
        mean = x.sum() / n
        centred = x - mean
        m2 = (centred.pow(2).sum() + zeros * mean.pow(2)) / n
        m3 = (centred.pow(3).sum() - zeros * mean.pow(3)) / n
    if n < 2 or m2 <= 0:
        return 0
    value = (m3 / m2.pow(1.5)).item()
    return int(round(value)) if math.isfinite(value) else 0


class _QLRFunction(torch.autograd.Function):
    """Fake quantization on a given grid with QLR's gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, grid: Grid, truncation: str, skew: int,
                alpha_grad: str, masked: bool) -> Tensor:
        ctx.grid, ctx.alpha_grad, ctx.masked = grid, alpha_grad, masked
        if alpha_grad == "code":
            out, _ = fake_quantize(x, grid, truncation, skew, with_mask=False)
            ctx.save_for_backward(out, alpha)   # the official code keeps the output only
        else:
            out, inside = fake_quantize(x, grid, truncation, skew)
            ctx.save_for_backward(x, out, inside, alpha)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grid = ctx.grid
        grad_x = grad_alpha = None
        if ctx.alpha_grad == "code":
            out, alpha = ctx.saved_tensors
            below, above = out < grid.low, out > grid.high
            inside = ~(below | above)
            if ctx.needs_input_grad[1] and not grid.degenerate:
                v = out / grid.scale + grid.zero
                d_alpha = torch.where(below, grid.low,
                                      torch.where(above, grid.high, torch.round(v) - v))
                grad_alpha = (grad * d_alpha).sum().reshape(alpha.shape)
        else:
            x, out, inside, alpha = ctx.saved_tensors
            if ctx.needs_input_grad[1] and not grid.degenerate:
                # (x̂ - 1_inside x) / α, summed against the incoming gradient
                ops = training_ops_for(grad, x, out, inside)
                if ops is not None:  # both element-wise terms in one pass; the sum as below
                    d_alpha, grad_x = ops.qlr_backward_terms(
                        grad, x, out, inside, ctx.needs_input_grad[0] and ctx.masked)
                else:
                    d_alpha = torch.where(inside, out - x, out)
                grad_alpha = (torch.dot(grad.flatten(), d_alpha.flatten()) / alpha
                              ).reshape(alpha.shape)
        if ctx.needs_input_grad[0] and grad_x is None:
            # The official form always masks (on the output); lsq masks clipped values
            # unless the STE is the identity.
            masked = ctx.masked or ctx.alpha_grad == "code"
            grad_x = torch.where(inside, grad, 0.0) if masked else grad  # no bool->float
        if grad_alpha is None and ctx.needs_input_grad[1]:
            grad_alpha = torch.zeros_like(alpha)
        return grad_x, grad_alpha, None, None, None, None, None


# -- the quantizer ---------------------------------------------------------------------------
class QLRQuantizer(Quantizer):
    """A per-tensor asymmetric fake quantizer with a learnable range multiplier ``α``.

    Args:
        bits: Stored bits, 2, 4 or 8.
        truncation: ``"none"``, ``"bt"`` or ``"btstar"`` (2 bits only).
        alpha_grad: ``"lsq"`` (on the raw input) or ``"code"`` (the official backward,
            input gradient included).
        ste: Input gradient with ``alpha_grad="lsq"``: ``"identity"`` (passed everywhere)
            or ``"masked"`` (zero where the code was clipped).
        reinit_every: Re-run the ``α`` grid search every this many training calls (the
            official CiteSeer setting is 100); 0: only at the first call.
        lr: ``(lr, weight_decay)`` of ``α`` for :meth:`param_groups`.
        counts_in_average: The tensor is an activation counted in ``avg_bits``.
        alpha: A shared ``α`` parameter (``share_prop_alpha``); ``None``: its own.
        owns_alpha: This quantizer puts the shared ``α`` in the optimizer (exactly one of
            the quantizers sharing it does).

    A sparse CSR input is quantized on its stored values, its implicit zeros counted in the
    range, the range search and the skewness; the output keeps the pattern unless
    truncation moves 0 to another level, when it is dense.
    """

    accepts_sparse = True

    def __init__(self, bits: int = 4, truncation: str = "none", alpha_grad: str = "lsq",
                 ste: str = "identity", reinit_every: int = 0, lr: tuple[float, float] = (1e-4, 1e-5),
                 counts_in_average: bool = True, alpha: Optional[nn.Parameter] = None,
                 owns_alpha: bool = True) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if truncation not in TRUNCATIONS or (truncation != "none" and bits != 2):
            raise ValueError(f"truncation {truncation!r} needs bits=2 (got {bits})")
        if alpha_grad not in ALPHA_GRADS:
            raise ValueError(f"alpha_grad must be one of {ALPHA_GRADS}, got {alpha_grad!r}")
        if ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
        self.bits, self.truncation, self.alpha_grad = bits, truncation, alpha_grad
        self.ste = ste
        self.reinit_every, self.lr = reinit_every, lr
        self.counts_in_average = counts_in_average
        self.owns_alpha = owns_alpha
        self.alpha = alpha if alpha is not None else nn.Parameter(torch.ones(()))
        # Observer and initialisation state (saved with the model, restored with the
        # selected epoch): last training range, init flag, skewness, training calls.
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("observed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("skew", torch.tensor(0))
        self.calls = 0
        self._elements: Optional[int] = None

    @property
    def grid_qmax(self) -> int:
        """Top code of the grid codes are computed on (the 8-bit one for BT/BT*)."""
        return 255 if self.truncation != "none" else 2 ** self.bits - 1

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(1.0)
        for name in ("low", "high"):
            getattr(self, name).zero_()
        self.observed.fill_(False)
        self.initialized.fill_(False)
        self.skew.zero_()
        self.calls = 0
        self._elements = None

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.owns_alpha:
            return []
        lr, weight_decay = self.lr
        return [{"params": [self.alpha], "lr": lr, "weight_decay": weight_decay}]

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        sparse = x.layout == torch.sparse_csr
        if sparse:
            values, support = csr_values(x), None
        else:
            support = sparse_support(x, self.truncation)
            values = x if support is None else x.reshape(-1)[support]
        if self.training or not bool(self.observed):
            with torch.no_grad():
                low, high = torch.aminmax(values.detach())
                if values.numel() < x.numel():  # the zeros left out are in the range
                    low, high = low.clamp(max=0), high.clamp(min=0)
                self.low.copy_(low)
                self.high.copy_(high)
                self.observed.fill_(True)
        if self.training:
            self.calls += 1
        reinit = (self.training and self.reinit_every > 0 and self.calls > 1
                  and (self.calls - 1) % self.reinit_every == 0)
        if not bool(self.initialized) or reinit:
            self.initialize(values, x.numel())
        self._elements = x.numel()
        # clamp(min) written as where(): it keeps no reference to the parameter, whose
        # value a shared α's later initialisation overwrites within the same pass.
        alpha = torch.where(self.alpha.detach() >= ALPHA_MIN, self.alpha,
                            self.alpha.new_tensor(ALPHA_MIN))
        grid = make_grid(self.low.to(x.dtype), self.high.to(x.dtype), alpha.detach(),
                         self.grid_qmax)
        if sparse and self.zero_image(grid, int(self.skew)) != 0:
            # BT/BT* can send 0 to another level: the zeros are not zeros in the output
            sparse, values = False, x.to_dense()
        if not (torch.is_grad_enabled() and (values.requires_grad or alpha.requires_grad)):
            out = fake_quantize(values, grid, self.truncation, int(self.skew),
                                with_mask=False)[0]
        else:
            out = _QLRFunction.apply(values, alpha, grid, self.truncation, int(self.skew),
                                     self.alpha_grad, self.ste == "masked")
        if sparse:
            return csr_with_values(x, out)
        if support is None:
            return out
        # In place on fresh zeros: an out-of-place scatter would copy them first.
        return x.new_zeros(x.numel()).index_put_((support,), out).view_as(x)

    def candidates(self) -> list[float]:
        """The ``α`` grid of the initial range search (spec §2.2)."""
        if self.bits == 2:
            return [round(0.1 * k, 2) for k in range(1, 11)]
        return [round(0.02 * k, 2) for k in range(1, 51)]

    def zero_image(self, grid: Grid, skew: int) -> Tensor:
        """What 0 dequantizes to on ``grid``: 0 itself unless truncation moves it."""
        zero = torch.zeros(1, dtype=grid.scale.dtype)
        return fake_quantize(zero, grid, self.truncation, skew, with_mask=False)[0][0]

    @torch.no_grad()
    def initialize(self, x: Tensor, numel: Optional[int] = None) -> None:
        """Grid search for the ``α`` with the smallest mean ``|x̂ - x|`` over the observed
        range, then the official post-rule (+0.1 below 0.1; below 0.5 for BT*); records the
        skewness. ``numel``: ``x`` holds the nonzeros of a tensor of this many elements; the
        zeros' error is counted without materialising them."""
        x = x.detach()
        numel = x.numel() if numel is None else numel
        zeros = numel - x.numel()
        skew = sample_skewness(x, numel) if self.truncation == "btstar" else 0
        low, high = self.low.to(x.dtype), self.high.to(x.dtype)
        best, best_err = 1.0, math.inf
        for candidate in self.candidates():
            grid = make_grid(low, high, torch.tensor(candidate, dtype=x.dtype), self.grid_qmax)
            out, _ = fake_quantize(x, grid, self.truncation, skew, with_mask=False)
            if zeros == 0:
                err = out.sub_(x).abs_().mean().item()
            else:
                zero_error = self.zero_image(grid, skew).abs()
                err = (out.sub_(x).abs_().sum() + zeros * zero_error).item() / numel
            if err < best_err:
                best, best_err = candidate, err
        if best < (0.5 if self.truncation == "btstar" else 0.1):
            best += 0.1
        self.alpha.fill_(best)
        self.skew.fill_(skew)
        self.initialized.fill_(True)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Integer codes of ``x`` on the current (evaluation) grid, without observing it."""
        grid = make_grid(self.low.to(x.dtype), self.high.to(x.dtype),
                         self.alpha.clamp(min=ALPHA_MIN), self.grid_qmax)
        return quantize_codes(x, grid, self.truncation, int(self.skew), with_mask=False)[0]

    # -- what it reports -------------------------------------------------------------------
    def bit_cost(self) -> Optional[BitCost]:
        if self._elements is None:
            return None
        return BitCost(elements=float(self._elements), bits=float(self._elements * self.bits))

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, truncation={self.truncation}, "
                f"alpha_grad={self.alpha_grad}, ste={self.ste}")


# -- the factory -----------------------------------------------------------------------------
class Smoothness:
    """The method's factory: one :class:`QLRQuantizer` per role a layer uses (``KIND_ROLES``),
    all at ``quant.bits``."""

    def __init__(self, cfg: SmoothnessConfig) -> None:
        self.cfg = cfg
        # share_prop_alpha: the shared α of each role and the propagation sites that have
        # used it; a site name seen twice means a new model is being built.
        self._shared: dict[str, nn.Parameter] = {}
        self._sharing_sites: set[str] = set()

    def __call__(self, spec: LayerSpec) -> dict[str, Quantizer]:
        if spec.kind not in KIND_ROLES:
            raise GnnqError(f"quant=smoothness has no quantizers for layers of kind "
                            f"{spec.kind!r} ({spec.name}). Known kinds: "
                            f"{', '.join(sorted(KIND_ROLES))}.")
        share = self.cfg.share_prop_alpha and spec.kind == "prop"
        if share and spec.name in self._sharing_sites:
            self._shared.clear()
            self._sharing_sites.clear()
        if share:
            self._sharing_sites.add(spec.name)
        roles = KIND_ROLES[spec.kind]
        if spec.reads_raw_features and not self.cfg.quantize_raw_input:
            roles = tuple(r for r in roles if r != "input")
        return {role: self._quantizer(role, share) for role in roles}

    def _quantizer(self, role: str, share: bool) -> QLRQuantizer:
        alpha, owns = None, True
        if share:
            owns = role not in self._shared
            alpha = self._shared.setdefault(role, nn.Parameter(torch.ones(())))
        cfg = self.cfg
        return QLRQuantizer(cfg.bits, cfg.truncation, cfg.alpha_grad, cfg.ste,
                            cfg.reinit_every, lr=(cfg.lr, cfg.weight_decay),
                            counts_in_average=role in ACTIVATION_ROLES,
                            alpha=alpha, owns_alpha=owns)


def build_smoothness(quant: dict[str, Any]) -> Smoothness:
    return Smoothness(parse_config(quant))


__all__ = ["QLRQuantizer", "Smoothness", "SmoothnessConfig", "build_smoothness",
           "fake_quantize", "make_grid", "quantize_codes", "sample_skewness", "parse_config"]
