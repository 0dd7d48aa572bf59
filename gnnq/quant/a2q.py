"""A²Q: aggregation-aware quantization (Zhu et al., ICLR 2023), spec ``docs/a2q.md``.

Every quantized tensor gets a learnable step size per group and a bitwidth per group, learned
for node features and fixed elsewhere (spec §1.5):

==========================  =====================  ============================  ============
tensor (role)               group                  bits                          step grad
==========================  =====================  ============================  ============
layer inputs (``input``)    node; NNS table entry  learned, ``min..max_bits``    local / task
weights (``weight``)        output channel         ``weight_bits``               task
XW (GCN ``feature``, GIN    channel                ``xw_bits``                   local
``input`` from layer 2)
GAT XW (``feature``)        node; NNS table entry  ``xw_bits``                   local / task
GAT ``attention``           head                   ``weight_bits``               task
GAT ``score``               head                   ``xw_bits``                   task
==========================  =====================  ============================  ============

"local" is the Local Gradient (spec §3), applied by the ``local_gradient`` strategy to every
quantizer whose :meth:`A2QQuantizer.local_error` is defined; NNS tables (graph level) always
train on the task gradient. Raw first-layer inputs stay FP32, and so do the normalised
adjacency, aggregation, biases and BatchNorm.

**Bits.** ``bits`` holds *effective* bits. The grid is always the official symmetric
``{-Q..Q}``: ``Q = 2^(bits-1) - 1`` for a tensor with negative values on its first forward
pass, and ``Q = 2^bits - 1`` for a non-negative one (post-ReLU features), which never uses
the negative half and so needs ``bits`` bits, ``{0..2^bits - 1}``. This is the official
"signed grid of ``round|b|`` bits, reported as ``round|b| - 1``" for post-ReLU features, with
the parameter stored without the unused sign bit.

**Metrics** (computed in :mod:`gnnq.quant.cost`): ``avg_bits`` is the element-weighted mean of
the learned feature bits (only those quantizers have ``counts_in_average``);
``compression_ratio`` is ``32 * elements / bits`` over every tensor above (learned features,
weights, XW, GAT attention and logits), without the per-group step sizes and with the FP32
tensors (raw inputs, biases, BatchNorm, adjacency) left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gnnq.config import check_choice, check_range, parse_method_config
from gnnq.data.task import Task
from gnnq.errors import GnnqError
from gnnq.kernels.cpu import training_ops_for
from gnnq.quant.base import BitCost, LayerSpec, Quantizer

KB = 8 * 1024  # bits in a kilobyte, the unit of the official memory term
HARD_MAX_BITS = 16
BUDGET_BAND = 0.25  # bits above the budget over which the pull ramps up to its full weight
STE_MODES = ("masked", "identity")
WEIGHT_STEP_INITS = ("lsq", "official")


# -- configuration -------------------------------------------------------------------------
@dataclass
class A2QLearningRates:
    """Adam learning rates of the quantizer parameters (spec §5), all with weight decay 0."""

    bits: float = 0.1          # learned feature bitwidths (official lr_quant_bit_fea)
    feature: float = 0.04      # feature step sizes (lr_quant_scale_fea)
    weight: float = 0.02       # weight step sizes (lr_quant_scale_w)
    xw: float = 0.008          # XW step sizes (lr_quant_scale_xw)
    gat_feature: float = 0.05  # GAT XW step sizes (lr_quant_scale_gat_fea)
    attention: float = 0.005   # GAT attention-vector step sizes (lr_quant_scale_gat[_attn])
    score: float = 0.005       # GAT edge-logit step sizes (lr_quant_scale_gat[_edge])


@dataclass
class A2QStepInit:
    """``[mean, std]`` of the ``|N(mean, std)|`` step-size draws; null: the spec's value for
    the architecture (:data:`STEP_INIT`)."""

    weight: Optional[list[float]] = None
    feature: Optional[list[float]] = None
    xw: Optional[list[float]] = None
    gat_feature: Optional[list[float]] = None
    attention: Optional[list[float]] = None
    score: Optional[list[float]] = None


@dataclass
class A2QConfig:
    """The options of ``+quant=a2q``; ``conf/quant/a2q.yaml`` documents each one."""

    name: str = "a2q"
    # Learned feature bits live in [min_bits, max_bits] (the official code has no clamp):
    # 1 is the smallest grid that keeps information, {0, s} on post-ReLU features (signed
    # tensors need 2: {-s, 0, s}); above 8 the fake quantization is all but FP32, and 8 is
    # the top of the official bit histogram and of the integer kernels.
    min_bits: int = 1
    max_bits: int = 8
    init_bits: int = 4
    # False: every node keeps init_bits (uniform bits; step sizes still learned).
    learn_bits: bool = True
    weight_bits: int = 4
    xw_bits: int = 4
    # Memory penalty (A2Q.penalty): against bit_budget, or the official KB form when
    # memory_target_kb is set.
    penalty_weight: float = 1.0
    bit_budget: Optional[float] = 4.0
    memory_target_kb: Optional[float] = None
    memory_dim: Optional[int] = None
    memory_offset_kb: float = 0.0
    quantize_xw: bool = True
    weight_step_init: str = "lsq"
    nns_table_size: int = 1000
    ste: str = "masked"
    lr: A2QLearningRates = field(default_factory=A2QLearningRates)
    step_init: A2QStepInit = field(default_factory=A2QStepInit)

    def __post_init__(self) -> None:
        for key in ("min_bits", "max_bits", "init_bits"):
            check_range(f"quant.{key}", getattr(self, key), 1, HARD_MAX_BITS)
        for key in ("weight_bits", "xw_bits"):  # signed grids: 2 bits is {-s, 0, s}
            check_range(f"quant.{key}", getattr(self, key), 2, HARD_MAX_BITS)
        if self.min_bits > self.max_bits:
            raise GnnqError(f"Invalid value for quant.min_bits: {self.min_bits} is above "
                            f"quant.max_bits ({self.max_bits}). Both must lie in 1.."
                            f"{HARD_MAX_BITS} with min_bits <= max_bits.")
        if self.learn_bits and not self.min_bits <= self.init_bits <= self.max_bits:
            raise GnnqError(f"Invalid value for quant.init_bits: {self.init_bits}. Learned bits "
                            f"start inside quant.min_bits..quant.max_bits ({self.min_bits}.."
                            f"{self.max_bits}); a fixed width above that needs "
                            f"quant.learn_bits=false.")
        if self.bit_budget is not None:
            check_range("quant.bit_budget", self.bit_budget, self.min_bits, self.max_bits)
        check_range("quant.penalty_weight", self.penalty_weight, 0.0)
        if self.memory_target_kb is not None:
            check_range("quant.memory_target_kb", self.memory_target_kb, 0.0)
        if self.memory_dim is not None:
            check_range("quant.memory_dim", self.memory_dim, 1)
        check_range("quant.memory_offset_kb", self.memory_offset_kb, 0.0)
        check_range("quant.nns_table_size", self.nns_table_size, 1)
        check_choice("quant.ste", self.ste, STE_MODES)
        check_choice("quant.weight_step_init", self.weight_step_init, WEIGHT_STEP_INITS)
        for f in fields(A2QLearningRates):
            check_range(f"quant.lr.{f.name}", getattr(self.lr, f.name), 0.0, low_open=True)
        for f in fields(A2QStepInit):
            pair = getattr(self.step_init, f.name)
            if pair is not None and (len(pair) != 2 or pair[1] < 0):
                raise GnnqError(f"Invalid value for quant.step_init.{f.name}: {list(pair)}. "
                                f"It must be [mean, std] with std >= 0, or null.")


def parse_config(quant: dict[str, Any]) -> A2QConfig:
    """``quant`` checked against :class:`A2QConfig`; errors name the key and what is valid."""
    return parse_method_config(A2QConfig, quant, "a2q", {"quant.lr": A2QLearningRates,
                                                         "quant.step_init": A2QStepInit})


# -- the quantizer -------------------------------------------------------------------------
class _FakeQuantize(torch.autograd.Function):
    """``x̂ = s * round(clip(x / s, -Q, Q))``, half away from zero, with A²Q's gradients
    (spec §1.2): LSQ's step gradient without its scale factor, ``∂x̂/∂Q = sign(x) s`` on the
    clipped elements, and a straight-through input gradient (zero where clipped unless
    ``masked`` is off, the official code's effective behaviour)."""

    # At graph level this runs on every node of a batch in every layer and dominates an
    # epoch. The fused CPU ops (gnnq/kernels) make one pass each way and recompute the codes
    # from x in backward instead of saving them; PyTorch's path keeps its passes few, in
    # place and with a float mask (torch.where and bool masks are several times slower).
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, levels: Tensor, masked: bool) -> Tensor:
        ctx.masked = masked
        ops = training_ops_for(x, step, levels) if x.dim() == 2 else None
        ctx.fused = ops is not None
        if ctx.fused:
            ctx.save_for_backward(x, step, levels)
            return ops.a2q_fake_quantize(x, step, levels)
        clipped, code, inside = _codes(x, step, levels)
        ctx.save_for_backward(step, levels, clipped, code, inside)
        return code * step

    @staticmethod
    def backward(ctx, grad: Tensor):
        want_x, want_step, want_levels = ctx.needs_input_grad[:3]
        if ctx.fused:
            x, step, levels = ctx.saved_tensors
            grad = grad.contiguous()
            ops = training_ops_for(grad, x, step, levels)
            if ops is not None:  # the element-wise terms in one pass; the sums as below
                grad_x, d_step, d_levels = ops.a2q_backward_terms(
                    grad, x, step, levels, want_x and ctx.masked, want_step, want_levels)
                return ((grad_x if ctx.masked else grad) if want_x else None,
                        d_step.sum_to_size(step.shape) if want_step else None,
                        d_levels.sum_to_size(levels.shape) if want_levels else None, None)
            clipped, code, inside = _codes(x, step, levels)
        else:
            step, levels, clipped, code, inside = ctx.saved_tensors
        grad_x = grad_step = grad_levels = None
        if want_x:
            grad_x = grad * inside if ctx.masked else grad
        if want_step:
            # code - ratio inside the range; sign(x) Q (= the code) where clipped.
            d_step = torch.addcmul(code, clipped, inside, value=-1)
            grad_step = d_step.mul_(grad).sum_to_size(step.shape)
        if want_levels:
            sign = clipped.sign()
            outside_sign = torch.addcmul(sign, sign, inside, value=-1)
            grad_levels = outside_sign.mul_(grad).mul_(step).sum_to_size(levels.shape)
        return grad_x, grad_step, grad_levels, None


def _codes(x: Tensor, step: Tensor, levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ratio ``x / s`` clipped to ``[-Q, Q]``, its code (rounded half away from zero) and
    whether it lay inside the range (1.0 or 0.0; clamp keeps in-range values exactly)."""
    ratio = x / step
    clipped = torch.clamp(ratio, -levels, levels)
    inside = (clipped == ratio).to(x.dtype)
    code = clipped.abs().add_(0.5).floor_().copysign_(clipped)
    return clipped, code, inside


def _round_ste(bits: Tensor) -> Tensor:
    """``round(bits)`` forward, identity backward (the bitwidth is rounded in forward only)."""
    return bits + (torch.round(bits) - bits).detach()


class A2QQuantizer(Quantizer):
    """A fake quantizer with one learnable step size and one bitwidth per group.

    Groups run along ``dim`` of a 2-D input: ``dim=0`` is one per row (node, output channel
    of a weight, head of GAT's attention vectors), ``dim=1`` one per column (channel of XW,
    head of GAT's edge logits). Learned bits are a parameter kept in ``bit_range`` (projected
    at every forward pass); fixed bits are a buffer.

    Args:
        groups: Number of groups.
        dim: Dimension the groups run along.
        bits: Initial (or fixed) effective bitwidth.
        learn_bits: Learn the bitwidth (``True``) or keep it fixed.
        bit_range: ``(min, max)`` effective bits of a learned bitwidth.
        step_init: ``(mean, std)``: steps start at ``|N(mean, std)|``.
        lr: ``(step lr, bits lr)`` for :meth:`param_groups`.
        local: Define :meth:`local_error` (the ``local_gradient`` strategy trains the
            step and bits on it instead of on the task loss).
        masked_ste: Zero the input gradient of clipped elements.
        unsigned: The tensor is non-negative (``Q = 2^bits - 1``, see the module
            docstring); ``None`` decides on the first forward pass.
        counts_in_average: Count toward ``avg_bits`` (default: ``learn_bits``; the node
            features count even with fixed bits, ``quant.learn_bits=false``).
        step_from_data: Replace the drawn steps on the first forward pass by LSQ's
            ``2 mean|x| / sqrt(Q)`` per group (Esser et al., 2020), for parameters.
    """

    def __init__(self, groups: int, dim: int, bits: float, *, learn_bits: bool,
                 bit_range: tuple[int, int], step_init: tuple[float, float],
                 lr: tuple[float, float], local: bool, masked_ste: bool = True,
                 unsigned: Optional[bool] = None,
                 counts_in_average: Optional[bool] = None,
                 step_from_data: bool = False) -> None:
        super().__init__()
        self.groups, self.dim = groups, dim
        self.learn_bits, self.bit_range, self.step_init = learn_bits, bit_range, step_init
        self.lr, self.local, self.masked_ste = lr, local, masked_ste
        self.counts_in_average = learn_bits if counts_in_average is None else counts_in_average
        self.step = nn.Parameter(torch.empty(self._shape(groups)))
        initial = torch.full(self._shape(groups), float(bits))
        if learn_bits:
            self.bits = nn.Parameter(initial)
        else:
            self.register_buffer("bits", initial)
        # -1: not decided yet, 0: signed grid, 1: unsigned (saved with the model).
        self.register_buffer("unsigned", torch.tensor(-1 if unsigned is None else int(unsigned)))
        # 1 while the steps still wait for their data-based initialisation.
        self.step_from_data = step_from_data
        self.register_buffer("step_pending", torch.tensor(int(step_from_data)))
        self._input: Optional[Tensor] = None       # last training input, for local_error
        self._row_bits: Optional[Tensor] = None    # effective bits per element of the last input
        self.reset_parameters()

    def _shape(self, groups: int) -> tuple[int, int]:
        return (groups, 1) if self.dim == 0 else (1, groups)

    def reset_parameters(self) -> None:
        mean, std = self.step_init
        with torch.no_grad():
            self.step.copy_(torch.normal(mean, std, self.step.shape).abs())
            self.step_pending.fill_(int(self.step_from_data))

    def param_groups(self) -> list[dict[str, Any]]:
        step_lr, bits_lr = self.lr
        groups = [{"params": [self.step], "lr": step_lr, "weight_decay": 0.0}]
        if self.learn_bits:
            groups.append({"params": [self.bits], "lr": bits_lr, "weight_decay": 0.0})
        return groups

    # -- forward ---------------------------------------------------------------------------
    def _group_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Step and bits, broadcastable to ``x``."""
        if self.groups > 1 and x.size(self.dim) != self.groups:
            raise GnnqError(f"An A²Q quantizer with {self.groups} groups along dim {self.dim} "
                            f"got a tensor of shape {tuple(x.shape)}. Per-node quantizers "
                            f"need the full graph of a node-level task (full-batch).")
        return self.step, self.bits

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        step, bits = self._group_params(x)
        levels = 2.0 ** (_round_ste(bits) + self.unsigned - 1) - 1
        step = step.abs().clamp_min(torch.finfo(x.dtype).tiny)
        return _FakeQuantize.apply(x, step, levels, self.masked_ste), bits

    def forward(self, x: Tensor) -> Tensor:
        if self.unsigned < 0:
            self.unsigned.fill_(int(bool((x >= 0).all())))
        if self.step_pending:
            self._init_step_from(x)
        if self.learn_bits:
            self._project_bits()
        out, bits = self._quantize(x)
        if self.local and self.training and torch.is_grad_enabled():
            self._input = x.detach()
        self._row_bits = torch.round(bits.detach()).expand_as(x)
        return out

    @torch.no_grad()
    def _init_step_from(self, x: Tensor) -> None:
        levels = 2.0 ** (torch.round(self.bits) + self.unsigned - 1) - 1
        other = 1 - self.dim
        mean_abs = x.detach().abs().mean(dim=other, keepdim=True).expand_as(self.step)
        step = 2 * mean_abs / levels.sqrt()
        self.step.copy_(torch.where(step > 0, step, self.step))
        self.step_pending.fill_(0)

    @torch.no_grad()
    def _project_bits(self) -> None:
        low, high = self.bit_range
        # A signed grid needs 2 bits for a zero and both signs.
        self.bits.clamp_(max(low, 2 - int(self.unsigned)), high)

    # -- what it reports -------------------------------------------------------------------
    def bit_cost(self) -> Optional[BitCost]:
        if self._row_bits is None:
            return None
        return BitCost(elements=float(self._row_bits.numel()),
                       bits=float(self._row_bits.sum()))

    def local_error(self) -> Optional[Tensor]:
        """The Local Gradient's loss for the last training input (spec §3): per group, the
        mean absolute quantization error, summed over groups. Its gradient reaches only this
        quantizer's step and bits. ``None`` when the quantizer trains on the task loss."""
        if not self.local or self._input is None:
            return None
        x, self._input = self._input, None
        out, _ = self._quantize(x)
        return (out - x).abs().sum() * (self.groups / x.numel())

    def row_bits(self) -> Tensor:
        """Differentiable effective bits of each row (node) of the last input, ``[rows]``."""
        return self.bits.view(-1)

    def stored_bits(self) -> Tensor:
        """Differentiable stored bits (sign bit included) of the groups the last input
        used, each once (the official memory term's ``|b|``)."""
        return self.bits.view(-1) + self.unsigned

    @property
    def seen(self) -> bool:
        return self._row_bits is not None

    def features_seen(self) -> int:
        """Feature dimension (columns) of the last input."""
        return self._row_bits.size(1)

    def effective_bits(self) -> Tensor:
        """Effective bits of every row of the last input (what ``avg_bits`` counts)."""
        return self._row_bits[:, 0]


class NNSQuantizer(A2QQuantizer):
    """A²Q's Nearest Neighbor Strategy (spec §4): a table of ``m`` (step, bits) pairs shared
    by all nodes of all graphs. Each row (node) uses the entry whose largest code value
    ``s_k (2^(B_k - 1) - 1)`` (Algorithm 1 of the paper; the official code drops the -1) is
    nearest to its largest absolute feature; gradients gather back into the table through
    the selection. The same rule runs in training and inference, so unseen graphs work."""

    def __init__(self, table_size: int, bits: float, **kwargs: Any) -> None:
        super().__init__(table_size, 0, bits, local=False, **kwargs)
        self._index: Optional[Tensor] = None

    @torch.no_grad()
    def select(self, x: Tensor) -> Tensor:
        """The table entry of each row of ``x``, ``[rows]``."""
        grid_bits = torch.round(self.bits.view(-1)) + self.unsigned
        largest = self.step.view(-1).abs() * (2.0 ** (grid_bits - 1) - 1)
        values, order = largest.sort()
        wanted = x.detach().abs().amax(dim=1)
        upper = torch.searchsorted(values, wanted).clamp(max=values.numel() - 1)
        lower = (upper - 1).clamp(min=0)
        pick_lower = (wanted - values[lower]).abs() <= (values[upper] - wanted).abs()
        return order[torch.where(pick_lower, lower, upper)]

    def _group_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._index = self.select(x)
        return self.step[self._index], self.bits[self._index]

    def row_bits(self) -> Tensor:
        return self.bits.view(-1)[self._index]

    def stored_bits(self) -> Tensor:
        return self.bits.view(-1)[self._index.unique()] + self.unsigned


# -- placement -----------------------------------------------------------------------------
#: ``(mean, std)`` of the step-size draws per architecture, from the official scripts
#: (spec §1.4); ``quant.step_init`` overrides them.
STEP_INIT: dict[str, dict[str, tuple[float, float]]] = {
    "gcn": dict(weight=(0.1, 0.2), feature=(0.01, 0.01), xw=(0.01, 0.01)),
    "gin": dict(weight=(0.01, 0.1), feature=(0.01, 0.1), xw=(0.01, 0.01)),
    "gat": dict(weight=(0.01, 0.02), feature=(0.1, 0.2), gat_feature=(0.001, 0.001),
                attention=(0.1, 0.1), score=(0.1, 0.1)),
    "graph": dict(weight=(0.01, 0.1), feature=(0.01, 0.1), xw=(0.01, 0.01),
                  gat_feature=(0.01, 0.01), attention=(0.1, 0.1), score=(0.1, 0.1)),
}


class A2Q:
    """The A²Q factory: ``factory(spec)`` gives a layer's quantizers; :meth:`penalty` is the
    memory term of the loss; :meth:`artifacts` writes the bit analysis."""

    def __init__(self, cfg: A2QConfig) -> None:
        self.cfg = cfg

    def __call__(self, spec: LayerSpec) -> dict[str, Quantizer]:
        roles: dict[str, Quantizer] = {}
        if self._quantizes_input(spec):
            roles["input"] = self._per_node(spec, "feature", self._initial_bits(),
                                            learn_bits=self.cfg.learn_bits, feature_bits=True)
        if spec.kind in ("gcn", "gat", "linear"):
            roles["weight"] = self._fixed(spec, "weight", spec.out_dim * spec.heads, 0)
        if spec.kind == "gcn" and self.cfg.quantize_xw:
            roles["feature"] = self._fixed(spec, "xw", spec.out_dim, 1, local=True)
        if spec.kind == "gin" and spec.index > 0 and self.cfg.quantize_xw:
            # GIN quantizes its input per channel before the neighbour sum (the official q_xw).
            roles["input"] = self._fixed(spec, "xw", spec.in_dim, 1, local=True)
        if spec.kind == "gat":
            roles["feature"] = self._per_node(spec, "gat_feature", self.cfg.xw_bits,
                                              learn_bits=False, feature_bits=False)
            roles["attention"] = self._fixed(spec, "attention", spec.heads, 0)
            roles["score"] = self._fixed(spec, "score", spec.heads, 1)
        return roles

    def _initial_bits(self) -> float:
        """``init_bits``, or the bit budget when it is lower: descending to a budget under
        Adam's momentum overshoots it by up to a bit, which only the slow Local Gradient
        would win back."""
        if not self.cfg.learn_bits:
            return self.cfg.init_bits
        budget = self.cfg.bit_budget if self.cfg.memory_target_kb is None else None
        return self.cfg.init_bits if budget is None else min(self.cfg.init_bits, budget)

    @staticmethod
    def _quantizes_input(spec: LayerSpec) -> bool:
        """Learned per-node bits on every linear map's input but the raw features (spec
        §1.5). GIN's first MLP linear sees the aggregated raw features: quantized at node
        level, left FP32 at graph level (the degree feature, following Degree-Quant)."""
        if spec.kind in ("gcn", "gat"):
            return spec.index > 0
        if spec.kind == "linear":
            first_of_gin_mlp = spec.name.endswith(".nn.0")
            return not first_of_gin_mlp or spec.level == "node" or spec.index > 0
        return False

    def _step_init(self, spec: LayerSpec, tensor: str) -> tuple[float, float]:
        override = getattr(self.cfg.step_init, tensor)
        if override is not None:
            return tuple(override)
        arch = "graph" if spec.level == "graph" else {"linear": "gin"}.get(spec.kind, spec.kind)
        return STEP_INIT[arch].get(tensor, STEP_INIT["graph"][tensor])

    def _common(self, spec: LayerSpec, tensor: str) -> dict[str, Any]:
        lr = self.cfg.lr
        return dict(step_init=self._step_init(spec, tensor), lr=(getattr(lr, tensor), lr.bits),
                    bit_range=(self.cfg.min_bits, self.cfg.max_bits),
                    masked_ste=self.cfg.ste == "masked")

    def _fixed(self, spec: LayerSpec, tensor: str, groups: int, dim: int,
               local: bool = False) -> A2QQuantizer:
        bits = self.cfg.weight_bits if tensor in ("weight", "attention") else self.cfg.xw_bits
        # Weights and attention vectors are signed parameters: no need to wait for data.
        unsigned = False if tensor in ("weight", "attention") else None
        from_data = tensor in ("weight", "attention") and self.cfg.weight_step_init == "lsq"
        return A2QQuantizer(groups, dim, bits, learn_bits=False, local=local,
                            unsigned=unsigned, step_from_data=from_data,
                            **self._common(spec, tensor))

    def _per_node(self, spec: LayerSpec, tensor: str, bits: int, learn_bits: bool,
                  feature_bits: bool) -> A2QQuantizer:
        """One group per node (node level, transductive) or an NNS table (graph level);
        ``feature_bits``: these are the node-feature bits ``avg_bits`` averages."""
        common = dict(self._common(spec, tensor), counts_in_average=feature_bits)
        if spec.level == "graph":
            return NNSQuantizer(self.cfg.nns_table_size, bits, learn_bits=learn_bits, **common)
        if spec.num_nodes is None:
            raise GnnqError(f"A²Q needs the node count of layer {spec.name!r} for its "
                            f"per-node quantizers.")
        return A2QQuantizer(spec.num_nodes, 0, bits, learn_bits=learn_bits, local=True,
                            **common)

    # -- hooks the trainer and the experiment call -----------------------------------------
    def penalty(self, model: nn.Module) -> Optional[Tensor]:
        """The memory penalty of the last forward pass (spec §2.1), or ``None`` if off.

        - ``bit_budget``: ``lambda * G * h(avg - budget)``. ``avg`` is this pass's
          ``avg_bits`` (rounded bits, straight-through gradient), ``G`` the number of
          per-node groups, ``h`` a one-sided Huber hinge: 0 below the budget, quadratic over
          the first ``BUDGET_BAND`` bits above it, linear beyond. A node's bits are pulled
          down by at most ``lambda`` (times its layer's share of the features) whatever the
          graph size, so under Adam the Local Gradient's push up stays comparable and the
          nodes spread over bitwidths instead of moving in lockstep.
        - ``memory_target_kb``, the official form: ``lambda * relu(M - target)^2`` with
          ``M = sum_layers D * sum_groups b / 8192 + memory_offset_kb`` KB, ``b`` the raw
          stored bits (sign bit included) of each group the pass used, counted once, and
          ``D`` the layer's input width or ``memory_dim``.
        """
        cfg = self.cfg
        learned = [m for m in model.modules()
                   if isinstance(m, A2QQuantizer) and m.learn_bits and m.seen]
        if not learned or (cfg.bit_budget is None and cfg.memory_target_kb is None):
            return None
        if cfg.memory_target_kb is not None:
            memory = sum((cfg.memory_dim or q.features_seen()) * q.stored_bits().sum()
                         for q in learned) / KB + cfg.memory_offset_kb
            return cfg.penalty_weight * torch.relu(memory - cfg.memory_target_kb) ** 2
        bits = sum(q.features_seen() * _round_ste(q.row_bits()).sum() for q in learned)
        elements = sum(q.features_seen() * q.row_bits().numel() for q in learned)
        groups = sum(q.row_bits().numel() for q in learned)
        excess = torch.relu(bits / elements - cfg.bit_budget)
        huber = torch.where(excess < BUDGET_BAND, excess ** 2 / (2 * BUDGET_BAND),
                            excess - BUDGET_BAND / 2)
        return cfg.penalty_weight * groups * huber

    def artifacts(self, model: nn.Module, task: Task, folder: Path) -> list[Path]:
        from gnnq.quant.a2q_analysis import write_bit_analysis  # matplotlib: only when asked

        return write_bit_analysis(model, task, folder)


def build_a2q(quant: dict[str, Any]) -> A2Q:
    return A2Q(parse_config(quant))


__all__ = ["A2Q", "A2QConfig", "A2QQuantizer", "NNSQuantizer", "build_a2q", "parse_config"]
