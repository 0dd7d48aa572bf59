"""Degree-Quant (Tailor et al., ICLR 2021): uniform INT8/INT4 quantization-aware training with
stochastic protection of high in-degree nodes and percentile ranges.

Written from the paper's description (``docs/peers.md`` §1.2); the options, with their
sources, are documented in ``conf/quant/degree_quant.yaml``.

**What is quantized.** Every tensor of every message-passing stage, per tensor, to
``bits`` bits (:data:`BIT_CHOICES`):

==============================================  =====================  ==================
tensor (role)                                   range                  rows protected
==============================================  =====================  ==================
layer inputs (``input``; GIN MLP linears after  percentile, EMA         nodes
the first, head linears)
weights (``weight``), GAT ``attention``         min/max of the tensor  never
XW (``feature``; GIN MLP linear outputs)        percentile, EMA        nodes
``message``, GAT ``score``                      percentile, EMA        edges, by target
``aggregate``, ``update``                       percentile, EMA        nodes
==============================================  =====================  ==================

The first GIN MLP linear reads the conv's ``update`` output, already quantized, so it has no
``input`` quantizer of its own. ``quantize_raw_input: false`` leaves the first conv's input
(the raw features) FP32. Biases, BatchNorm, the normalised adjacency and the softmax stay FP32.

**The grid.** Affine (asymmetric) over a range ``[lo, hi]`` widened to contain 0:
``s = (hi - lo) / (2^bits - 1)``, zero point ``z = round(-lo / s)``, codes
``q = clamp(round(x / s) + z, 0, 2^bits - 1)``, value ``(q - z) s``. Zero is exact, and any
``x`` inside ``[lo, hi]`` is within ``s / 2`` of its value. Gradients are straight-through:
identity inside the range and, with ``ste: masked`` (the paper's "gradient clipping" mode),
zero on the clipped elements.

**Ranges.** Activations use percentiles instead of min/max, so a few large aggregates (the
high in-degree nodes) do not stretch the range of all others: ``lo`` and ``hi`` are the order
statistics that leave the ``j = floor(percentile * (n - 1))`` smallest and ``j`` largest of the
``n`` values outside (:func:`percentile_range`). Every training pass takes the percentiles
of its own tensor (all rows, protected ones included) and updates an exponential moving
average ``r <- (1 - momentum) r + momentum r_pass`` (the first pass sets it). It quantizes with
its own percentiles (``train_ranges: batch``, the default) or with the updated average, the
range inference will use (``train_ranges: ema``, as the authors' quantizer does). **At
eval** (``eval_ranges: ema``, the default) every tensor is quantized with those frozen EMA
ranges, so inference needs no statistics of its own and the model is deployable as integers;
``eval_ranges: dynamic`` recomputes the percentiles of each eval tensor instead. Weights and
GAT's attention vectors use the min/max of the current parameter, in training and eval alike.

**Protection** (training only). Once per forward pass of each layer, every node ``i`` of the
pass's graph is protected with probability
``p_i = p_min + (p_max - p_min) * rank_i / rank_max``, where ``rank_i`` is the number of
nodes with a lower in-degree (ties share a rank; so the lowest in-degree gets ``p_min`` and the
highest ``p_max``; a graph whose nodes all have one in-degree gets ``p_min``), sampled as a
Bernoulli mask (:func:`protection_probability`). The mask is drawn on the first quantizer's
request and shared by all quantizers of the layer through its
:class:`~gnnq.quant.base.GraphContext`; a protected node's rows (its rows of node tensors, and
the rows of the edges that point to it in per-edge tensors) pass through unchanged, in FP32,
with their ordinary gradient. In eval nothing is protected: every row is quantized. At graph
level every graph of a mini-batch ranks its own nodes (the graph models hand the convs the
batch vector), as the authors do.

**Metrics.** ``avg_bits`` is the element-weighted bits of the activation quantizers
(``counts_in_average``), measured on the last pass: exactly ``bits`` after an eval pass (what
the trainer reports); in a training pass protected elements count 32 bits.
``compression_ratio`` counts weights too, so it is ``32 / bits`` over every quantized tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gnnq.config import check_choice, check_range, parse_method_config
from gnnq.errors import GnnqError
from gnnq.kernels.cpu import training_ops_for
from gnnq.quant.base import BitCost, GraphContext, LayerSpec, Quantizer

FP32_BITS = 32
BIT_CHOICES = (4, 8)
#: Fraction of values clipped at each end when ``quant.percentile`` is null: the authors'
#: REDDIT-BINARY runner (``camlsys/degree-quant`` ``reddit_binary/main.py``, GC-PER mode).
DEFAULT_PERCENTILE = {8: 0.001, 4: 0.01}
EVAL_RANGES = ("ema", "dynamic")
TRAIN_RANGES = ("batch", "ema")
#: Tensors of at least this many values find their percentiles through a strided sample.
#: The stride is prime so that it walks every column of a row-major [rows, width] tensor;
#: 16 sampled only 4 of 64 hidden channels and misjudged the threshold on a quarter of
#: REDDIT-BINARY's tensors (each a fallback to topk over all values).
SAMPLED_SEARCH_MIN = 1 << 16
SAMPLE_STRIDE = 17
STE_MODES = ("masked", "identity")


# -- configuration -------------------------------------------------------------------------
@dataclass
class DegreeQuantConfig:
    """The options of ``+quant=degree_quant``; ``conf/quant/degree_quant.yaml`` documents each."""

    name: str = "degree_quant"
    bits: int = 8
    p_min: float = 0.0
    p_max: float = 0.1
    percentile: Optional[float] = None
    momentum: float = 0.1
    eval_ranges: str = "ema"
    train_ranges: str = "batch"
    ste: str = "masked"
    quantize_raw_input: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BIT_CHOICES:
            raise GnnqError(f"Invalid value for quant.bits: {self.bits!r}. Degree-Quant "
                            f"supports INT8 and INT4; valid choices: "
                            f"{', '.join(str(b) for b in sorted(BIT_CHOICES))}.")
        check_range("quant.p_min", self.p_min, 0.0, 1.0)
        check_range("quant.p_max", self.p_max, 0.0, 1.0)
        if self.p_min > self.p_max:
            raise GnnqError(f"Invalid value for quant.p_min: {self.p_min} is above quant.p_max "
                            f"({self.p_max}). Both must lie in 0..1 with p_min <= p_max.")
        if self.percentile is not None and not 0.0 <= self.percentile < 0.5:
            raise GnnqError(f"Invalid value for quant.percentile: {self.percentile!r}. It must "
                            f"be >= 0 and < 0.5 (the fraction clipped at each end), or null.")
        check_range("quant.momentum", self.momentum, 0.0, 1.0, low_open=True)
        check_choice("quant.eval_ranges", self.eval_ranges, EVAL_RANGES)
        check_choice("quant.train_ranges", self.train_ranges, TRAIN_RANGES)
        check_choice("quant.ste", self.ste, STE_MODES)

    @property
    def clip_fraction(self) -> float:
        return DEFAULT_PERCENTILE[self.bits] if self.percentile is None else self.percentile


def parse_config(quant: dict[str, Any]) -> DegreeQuantConfig:
    """``quant`` checked against :class:`DegreeQuantConfig`; errors name the key and what is
    valid."""
    return parse_method_config(DegreeQuantConfig, quant, "degree_quant")


# -- the grid ------------------------------------------------------------------------------
def percentile_range(x: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``: the order statistics of ``x`` that leave ``j = floor(fraction (n-1))``
    values below and ``j`` above (``fraction = 0``: min and max; also min and max when the two
    order statistics coincide). 0-d tensors, no gradient."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:  # e.g. the messages of a graph without edges
        return flat.new_zeros(()), flat.new_zeros(())
    j = int(math.floor(fraction * (n - 1) + 1e-9))
    if j == 0:
        return torch.aminmax(flat)
    lo, hi = tail_order_statistics(flat, j + 1)
    if bool(lo == hi):
        # A collapsed range would quantize every value to one: sparse 0/1 features with under
        # `fraction` nonzeros (CiteSeer's bag of words) would all become 0. Use min/max.
        return torch.aminmax(flat)
    return lo, hi


def tail_order_statistics(flat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The exact ``k``-th smallest and ``k``-th largest values of the 1-D ``flat``.

    Percentiles run on every activation of every training pass, so large tensors take a
    shortcut: thresholds ``t_lo`` and ``t_hi`` just past the ``k``-th values of a strided
    sample, then one pass over the tensor keeps the values beyond either, and only those are
    searched (a threshold itself when the ``k``-th value ties with it, as the zeros of ReLU
    outputs do); the whole tensor only if fewer than ``k`` lie beyond.
    """
    n = flat.numel()
    if n < SAMPLED_SEARCH_MIN or k * SAMPLE_STRIDE > n:
        return _kth(flat, k, largest=False), _kth(flat, k, largest=True)
    sample = flat[::SAMPLE_STRIDE].contiguous()  # topk runs faster on a dense copy
    # The sample's rank k/stride estimates the k-th value within about sqrt(k/stride) sample
    # ranks; 4 of those further, a threshold rarely falls short of k values.
    rank = min(sample.numel(), k // SAMPLE_STRIDE + 4 * math.isqrt(k // SAMPLE_STRIDE) + 8)
    t_lo = sample.topk(rank, largest=False, sorted=False).values.max()
    t_hi = sample.topk(rank, largest=True, sorted=False).values.min()
    # Python-float thresholds: comparing with a 0-d tensor takes twice as long on CPU.
    low, high, at_lo, at_hi = _tails(flat, float(t_lo), float(t_hi))
    return (_beyond_threshold(flat, low, t_lo, at_lo, k, largest=False),
            _beyond_threshold(flat, high, t_hi, at_hi, k, largest=True))


def _tails(flat: Tensor, below: float, above: float):
    """The values of ``flat`` below ``below``, those above ``above``, and how many equal
    each (as functions: the PyTorch path counts only when asked)."""
    ops = training_ops_for(flat)
    if ops is not None:
        low, high, ties = ops.tails(flat, below, above)
        at_lo, at_hi = ties.tolist()
        return low, high, lambda: at_lo, lambda: at_hi
    # One selection for both tails (two would each read the whole tensor twice more).
    tails = flat[(flat < below) | (flat > above)]
    return (tails[tails < below], tails[tails > above],
            lambda: int(torch.count_nonzero(flat == below)),
            lambda: int(torch.count_nonzero(flat == above)))



def _beyond_threshold(flat: Tensor, beyond: Tensor, t: Tensor, at_t: Callable[[], int],
                      k: int, largest: bool) -> Tensor:
    """The ``k``-th value of ``flat`` from the end ``largest`` names, given the values
    ``beyond`` the threshold ``t`` on that side and the count of those equal to it."""
    if beyond.numel() >= k:
        return _kth(beyond, k, largest)
    if k <= beyond.numel() + at_t():
        return t
    return _kth(flat, k, largest)


def _kth(values: Tensor, k: int, largest: bool) -> Tensor:
    # topk is several times faster than kthvalue on CPU.
    top = values.topk(k, largest=largest, sorted=False).values
    return top.min() if largest else top.max()


def grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of the ``bits``-bit affine grid over ``[lo, hi]`` widened to 0."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    return scale, torch.round(-lo / scale)


class _FakeQuantize(torch.autograd.Function):
    """``(clamp(round(x/s) + z, 0, Q) - z) s`` with a straight-through gradient, zeroed on the
    clipped elements when ``masked``; the rows ``kept`` (protected) pass through unchanged,
    with their whole gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, levels: int, masked: bool,
                kept: Optional[Tensor]) -> Tensor:
        ctx.masked = masked and x.requires_grad  # raw inputs need no gradient mask
        ops = training_ops_for(x)
        if ops is not None:  # one pass instead of eight, the same float32 operations
            out, inside = ops.fake_quantize(x, float(scale), float(zero), levels, ctx.masked)
        else:
            code = torch.div(x, scale).round_().add_(zero)  # in place: tensors can be large
            if ctx.masked:
                inside = (code >= 0) & (code <= levels)
            out = code.clamp_(0, levels).sub_(zero).mul_(scale)
        if kept is not None:
            # Copying the few kept rows back is several times cheaper than a where() over all.
            out.index_copy_(0, kept, x.index_select(0, kept))
            if ctx.masked:
                inside.index_fill_(0, kept, True)
        if ctx.masked:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.masked:
            (inside,) = ctx.saved_tensors
            grad = torch.where(inside, grad, 0.0)  # faster than grad * inside (no bool->float)
        return grad, None, None, None, None, None


def fake_quantize(x: Tensor, lo: Tensor, hi: Tensor, bits: int, masked: bool = True,
                  kept: Optional[Tensor] = None) -> Tensor:
    """``x`` on the ``bits``-bit grid of ``[lo, hi]`` (module docstring), except the rows
    indexed by ``kept``, which stay as they are."""
    scale, zero = grid(lo.to(x.dtype), hi.to(x.dtype), bits)
    return _FakeQuantize.apply(x, scale, zero, 2 ** bits - 1, masked, kept)


# -- protection ----------------------------------------------------------------------------
def protection_probability(in_degree: Tensor, p_min: float, p_max: float,
                           batch: Optional[Tensor] = None) -> Tensor:
    """Per node, ``p_min + (p_max - p_min) * rank / rank_max`` with ``rank`` the number of
    nodes of lower in-degree in the node's own graph (``batch``: the graph of every node of a
    mini-batch; ``None``: one graph) and ``rank_max`` the largest rank in that graph."""
    if batch is None:
        batch = torch.zeros_like(in_degree)
    # Sort by (graph, in-degree): the nodes before a node's first (graph, in-degree) tie,
    # less those of earlier graphs, have a lower in-degree in its graph.
    span = int(in_degree.max()) + 1 if in_degree.numel() else 1
    start = batch.to(torch.int64) * span
    key = start + in_degree.to(torch.int64)
    sorted_key = key.sort().values
    first_of_graph = torch.searchsorted(sorted_key, start)
    rank = (torch.searchsorted(sorted_key, key) - first_of_graph).to(torch.float32)
    graphs = int(batch.max()) + 1 if batch.numel() else 0
    top = rank.new_zeros(graphs).scatter_reduce(0, batch.long(), rank, "amax")
    top = top[batch.long()]
    share = torch.where(top > 0, rank / top.clamp_min(1), torch.zeros_like(rank))
    return p_min + (p_max - p_min) * share


def protected_nodes(graph: GraphContext, p_min: float, p_max: float) -> Tensor:
    """The Bernoulli protection mask of this pass and layer, ``[num_nodes]`` bool: drawn once
    and cached in ``graph``, so every quantizer of the layer sees the same nodes protected."""
    def draw() -> Tensor:
        return torch.bernoulli(protection_probability(graph.in_degree(), p_min, p_max,
                                                      graph.batch)).bool()

    return graph.cached(f"degree_quant.mask[{p_min},{p_max}]", draw)


# -- the quantizers ------------------------------------------------------------------------
class _Uniform(Quantizer):
    """What both quantizers share: ``bits``, the STE mode and the cost of the last tensor."""

    def __init__(self, bits: int, masked_ste: bool) -> None:
        super().__init__()
        self.bits, self.masked_ste = bits, masked_ste
        self._cost: Optional[BitCost] = None

    def bit_cost(self) -> Optional[BitCost]:
        return self._cost


class WeightQuantizer(_Uniform):
    """A parameter (weight, GAT attention vectors) on the grid of its own min/max."""

    counts_in_average = False

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = percentile_range(x, 0.0)
        self._cost = BitCost(elements=float(x.numel()), bits=float(x.numel() * self.bits))
        return fake_quantize(x, lo, hi, self.bits, self.masked_ste)


class ActivationQuantizer(_Uniform):
    """An activation with percentile ranges (EMA for eval) and Degree-Quant's protection.

    Buffers ``lo`` and ``hi`` hold the EMA range (saved with the model), ``tracked`` whether
    a training pass has set it. The layer's :class:`~gnnq.quant.base.GraphContext` is used
    for the pass it was given for and then dropped, so a quantizer called outside a conv (or
    without one this pass) protects nothing.
    """

    uses_graph = True

    def __init__(self, bits: int, *, clip_fraction: float, momentum: float, p_min: float,
                 p_max: float, eval_ranges: str = "ema", train_ranges: str = "batch",
                 masked_ste: bool = True) -> None:
        super().__init__(bits, masked_ste)
        self.clip_fraction, self.momentum = clip_fraction, momentum
        self.p_min, self.p_max, self.eval_ranges = p_min, p_max, eval_ranges
        self.train_ranges = train_ranges
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("tracked", torch.tensor(False))
        self._graph: Optional[GraphContext] = None

    def reset_parameters(self) -> None:
        self.lo.zero_()
        self.hi.zero_()
        self.tracked.fill_(False)

    def set_graph(self, graph: GraphContext) -> None:
        self._graph = graph

    def forward(self, x: Tensor, index: Optional[Tensor] = None) -> Tensor:
        graph, self._graph = self._graph, None
        lo, hi = self._range(x)
        kept, protected = None, 0
        if self.training and graph is not None and self.p_max > 0:
            kept = self._protected_rows(graph, x, index).nonzero().squeeze(1)
            protected = kept.numel() * (x[0].numel() if x.size(0) else 0)
        out = fake_quantize(x, lo, hi, self.bits, self.masked_ste, kept)
        elements = x.numel()
        self._cost = BitCost(elements=float(elements),
                             bits=float((elements - protected) * self.bits
                                        + protected * FP32_BITS))
        return out

    def _range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            if self.eval_ranges == "ema" and bool(self.tracked):
                return self.lo, self.hi
            return percentile_range(x, self.clip_fraction)
        lo, hi = percentile_range(x, self.clip_fraction)
        with torch.no_grad():
            if bool(self.tracked):
                self.lo.lerp_(lo.to(self.lo.dtype), self.momentum)
                self.hi.lerp_(hi.to(self.hi.dtype), self.momentum)
            else:
                self.lo.copy_(lo)
                self.hi.copy_(hi)
                self.tracked.fill_(True)
        return (self.lo, self.hi) if self.train_ranges == "ema" else (lo, hi)

    def _protected_rows(self, graph: GraphContext, x: Tensor,
                        index: Optional[Tensor]) -> Tensor:
        nodes = protected_nodes(graph, self.p_min, self.p_max)
        rows = nodes if index is None else nodes[index]
        if rows.numel() != x.size(0):
            raise ValueError(f"Degree-Quant got a tensor of {x.size(0)} rows for a graph of "
                             f"{graph.num_nodes} nodes and no row -> node index")
        return rows

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, clip={self.clip_fraction}, momentum={self.momentum}, "
                f"p=[{self.p_min}, {self.p_max}], train_ranges={self.train_ranges}, "
                f"eval_ranges={self.eval_ranges}")

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_graph": None}


# -- placement -----------------------------------------------------------------------------
class DegreeQuant:
    """The Degree-Quant factory: ``factory(spec)`` gives a layer's quantizers (module
    docstring). No penalty, no quantizer parameters: the task gradient trains the model."""

    def __init__(self, cfg: DegreeQuantConfig) -> None:
        self.cfg = cfg

    def __call__(self, spec: LayerSpec) -> dict[str, Quantizer]:
        act, weight = self._activation, self._weight
        roles: dict[str, Quantizer] = {}
        if spec.kind in ("gcn", "gat", "gin") and (not spec.reads_raw_features
                                                    or self.cfg.quantize_raw_input):
            roles["input"] = act()
        if spec.kind in ("gcn", "gat"):
            roles.update(weight=weight(), feature=act())
        if spec.kind in ("gcn", "gat", "gin"):
            roles.update(message=act(), aggregate=act(), update=act())
        if spec.kind == "gat":
            roles.update(attention=weight(), score=act())
        if spec.kind == "linear":
            if not spec.name.endswith(".nn.0"):  # GIN's first MLP linear reads Q(update)
                roles["input"] = act()
            roles.update(weight=weight(), feature=act())
        return roles

    def _activation(self) -> ActivationQuantizer:
        cfg = self.cfg
        return ActivationQuantizer(cfg.bits, clip_fraction=cfg.clip_fraction,
                                   momentum=cfg.momentum, p_min=cfg.p_min, p_max=cfg.p_max,
                                   eval_ranges=cfg.eval_ranges, train_ranges=cfg.train_ranges,
                                   masked_ste=cfg.ste == "masked")

    def _weight(self) -> WeightQuantizer:
        return WeightQuantizer(self.cfg.bits, self.cfg.ste == "masked")


def build_degree_quant(quant: dict[str, Any]) -> DegreeQuant:
    return DegreeQuant(parse_config(quant))


__all__ = ["ActivationQuantizer", "DegreeQuant", "DegreeQuantConfig", "WeightQuantizer",
           "build_degree_quant", "fake_quantize", "parse_config", "percentile_range",
           "protected_nodes", "protection_probability"]
