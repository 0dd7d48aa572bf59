"""Smoothness-aware message propagation (SMP, Wang et al. CIKM 2023), quantized at every step.

Spec: ``docs/smoothness.md`` §3. With the multiplier held at zero it is APPNP.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import (degree, remove_self_loops, spmm,
                                   to_torch_csr_tensor, to_undirected)

from gnnq.models.gcn_conv import gcn_norm
from gnnq.models.utils import reset_quantizers, sparse_adj_t
from gnnq.quant.base import RoleQuantizers

PROPAGATIONS = ("smp", "appnp", "emp")
CORRECTIONS = ("laplacian", "adjacency")


class SMPGraph(NamedTuple):
    """What one graph costs to set up, computed once: the edges of
    :math:`\\tilde{\\mathbf{A}}` with self-loops and their weights (per-edge messages), the
    same operator as a CSR ``adj_t`` (fused product), the normalized incidence matrix
    :math:`\\mathbf{B}` (CSR) and :math:`\\mathrm{nnz}(\\tilde{\\mathbf{A}})`."""

    edge_index: Tensor
    weight: Tensor
    adj_t: Tensor
    incidence: Tensor
    nnz: int


def normalized_incidence(edge_index: Tensor, num_nodes: int,
                         dtype: torch.dtype = torch.float) -> Tensor:
    r"""The normalized incidence matrix :math:`\mathbf{B}` as a sparse CSR tensor of shape
    :math:`(|\mathcal{E}_u|, |\mathcal{V}|)`: one row per undirected edge :math:`\{i, j\}`,
    :math:`i > j`, with entries :math:`+1/\sqrt{\tilde{d}_i}` and :math:`-1/\sqrt{\tilde{d}_j}`,
    :math:`\tilde{d}` the degree with a self-loop (as in :func:`gcn_norm`).

    For an undirected graph :math:`\mathbf{B}^{\top}\mathbf{B} = \mathbf{I} -
    \tilde{\mathbf{D}}^{-1/2}(\mathbf{A}+\mathbf{I})\tilde{\mathbf{D}}^{-1/2} = \tilde{\mathbf{L}}`,
    so :math:`\|\mathbf{B}\mathbf{X}\|_F^2 = \mathrm{tr}(\mathbf{X}^{\top}\tilde{\mathbf{L}}
    \mathbf{X}) = \sum_{\{i,j\}}\|\mathbf{x}_i/\sqrt{\tilde d_i} - \mathbf{x}_j/\sqrt{\tilde
    d_j}\|^2`. A directed edge list is read as its undirected pairs, degrees as in-degrees.
    """
    loops_added, _ = gcn_norm(edge_index, num_nodes, dtype)
    deg_inv_sqrt = degree(loops_added[1], num_nodes, dtype=dtype).pow(-0.5)
    pairs, _ = remove_self_loops(to_undirected(edge_index, num_nodes=num_nodes))
    i, j = pairs[:, pairs[0] > pairs[1]]  # coalesced by to_undirected: each pair once
    # CSR wants rows sorted (and columns within a row): row r holds (j, -w_j), (i, +w_i).
    rows = torch.arange(i.numel(), device=edge_index.device).repeat_interleave(2)
    cols = torch.stack([j, i], dim=1).view(-1)
    values = torch.stack([-deg_inv_sqrt[j], deg_inv_sqrt[i]], dim=1).view(-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return to_torch_csr_tensor(torch.stack([rows, cols]), values.to(dtype),
                                   size=(i.numel(), num_nodes))


class SMPProp(MessagePassing):
    r"""Smoothness-aware message propagation from `"Low-bit Quantization for Deep Graph
    Neural Networks with Smoothness-aware Message Propagation"
    <https://arxiv.org/abs/2308.14949>`_: :math:`K` steps of APPNP with a constraint on the
    energy of each step's change, enforced by a Lagrange multiplier that the basic
    differential multiplier method (Platt & Barr, 1987) updates inside the loop.

    With :math:`\mathbf{X}^{(0)} = \mathbf{H}`, :math:`\lambda_0 = s_0 = 0.001`,
    :math:`c = \tau\cdot\mathrm{nnz}(\tilde{\mathbf{A}})` and :math:`\hat{\mathbf{A}}_q(\cdot)`
    the quantized product with
    :math:`\tilde{\mathbf{A}} = \tilde{\mathbf{D}}^{-1/2}(\mathbf{A}+\mathbf{I})
    \tilde{\mathbf{D}}^{-1/2}`, step :math:`k` computes

    .. math::
        \tilde{\mathbf{X}} &= (1-\alpha)\,\hat{\mathbf{A}}_q(\mathbf{X}^{(k)}) +
            \alpha\,\mathbf{H}, \qquad \boldsymbol{\Delta} = \tilde{\mathbf{X}} -
            \mathbf{X}^{(k)}

        \mathbf{X}^{(k+1)} &= \tilde{\mathbf{X}} + 2\alpha\,\lambda_k\,
            \mathbf{C}(\boldsymbol{\Delta}), \qquad \mathbf{C}(\boldsymbol{\Delta}) =
            \boldsymbol{\Delta} - \hat{\mathbf{A}}^{\prime}_q(\boldsymbol{\Delta})
            \ \text{(laplacian)}\ \text{or}\ \hat{\mathbf{A}}^{\prime}_q(\boldsymbol{\Delta})
            \ \text{(adjacency)}

        s_{k+1} &= s_k + 2\eta_s\,\lambda_k\,s_k, \qquad g_k =
            \|\mathbf{B}\boldsymbol{\Delta}\|_F^2 = \mathrm{tr}(\boldsymbol{\Delta}^{\top}
            \tilde{\mathbf{L}}\boldsymbol{\Delta})

        \lambda_{k+1} &= \lambda_k + \eta_\lambda\,(c - s_{k+1}^2 - g_k).

    This is one basic-differential-multiplier step per propagation step on
    :math:`\min_{\mathbf{X}} \tfrac12\|\mathbf{X}-\mathbf{H}\|_F^2 + \tfrac{\mu}{2}
    \mathrm{tr}(\mathbf{X}^{\top}\tilde{\mathbf{L}}\mathbf{X})` subject to
    :math:`g(\boldsymbol{\Delta}) + s^2 = c`, with Lagrangian
    :math:`\mathcal{L} = f + \lambda(c - s^2 - g)`: descent in :math:`\mathbf{X}` and
    :math:`s`, ascent in :math:`\lambda` (step :math:`\eta = \alpha`,
    :math:`\mu = (1-\alpha)/\alpha`, so the base step is APPNP's; the paper's
    :math:`\eta_H = 0.1, \mu = 9`). **Sign convention:** :math:`\lambda` rises while the
    change energy is under budget (:math:`g + s^2 < c`) and falls when it is over; a
    positive :math:`\lambda` pushes the change toward more energy, a negative one smooths
    it; no projection keeps :math:`\lambda \ge 0`. ``multiplier_bound`` (off by default, as in
    the spec) clips :math:`\lambda` to :math:`[-b, b]` after each update: the step is
    :math:`\mathbf{X}^{(k+1)} = \mathbf{X}^{(k)} + (\mathbf{I} + 2\alpha\lambda\tilde{\mathbf{L}})
    \boldsymbol{\Delta}` and :math:`\tilde{\mathbf{L}}` has eigenvalues in :math:`[0, 2)`, so
    :math:`b = 1/(4\alpha)` keeps the correction from reversing any frequency of the change
    (the multiplier's first update scales with :math:`\|\mathbf{H}\|^2`, and at depth 32-64
    an unbounded one overflows training). ``correction="laplacian"``
    (:math:`\tilde{\mathbf{L}}\boldsymbol{\Delta}`, default) is the exact gradient of that
    Lagrangian; ``"adjacency"`` (:math:`\tilde{\mathbf{A}}\boldsymbol{\Delta}`) is what the
    official code does. :math:`\lambda` and :math:`s` are scalars (the code's per-node
    copies are all equal), reset at every call, and autograd runs through them.
    ``propagation="appnp"`` holds :math:`\lambda \equiv 0`: plain APPNP, the baseline.
    ``propagation="emp"`` is the official code's baseline ("EMP") as it runs: APPNP whose
    product weighs the message from :math:`j` by :math:`\tilde a_{jj} = 1/\tilde d_j`, the
    diagonal of :math:`\tilde{\mathbf{A}}`, instead of :math:`\tilde a_{ij}`, i.e. it
    propagates with :math:`(\mathbf{A}+\mathbf{I})\tilde{\mathbf{D}}^{-1}` (a slip in the
    released code, spec §3.5, kept to compare with the paper's baseline).

    Each :math:`\hat{\mathbf{A}}_q` call (base and correction, every step its own) is one
    message passing with its own quantizers:

    - :meth:`message`: :math:`Q_{\text{message}}(\tilde a_{ij}\,\mathbf{x}_j)` over the
      edges with self-loops
    - :meth:`aggregate`: :math:`Q_{\text{aggregate}}(\sum_j \cdot)`
    - :meth:`update`: :math:`Q_{\text{update}}(\cdot)` (identity otherwise)

    Without a ``message`` quantizer the message and aggregation are one sparse product
    (:meth:`message_and_aggregate`). The teleport, correction, slack, multiplier and
    energy stay FP32 (on fake-quantized tensors). Nothing is densified.

    Args:
        steps (int): Number of propagation steps :math:`K`.
        alpha (float, optional): Teleport :math:`\alpha` (also the step size
            :math:`\eta_H`). (default: :obj:`0.1`)
        propagation (str, optional): ``"smp"``, ``"appnp"`` or ``"emp"``.
            (default: :obj:`"smp"`)
        correction (str, optional): ``"laplacian"`` or ``"adjacency"``.
            (default: :obj:`"laplacian"`)
        threshold (float, optional): :math:`\tau`, the budget per nonzero of
            :math:`\tilde{\mathbf{A}}` (official ``--alpha_threshold``). (default: :obj:`0.1`)
        multiplier_lr (float, optional): :math:`\eta_\lambda`. (default: :obj:`1e-5`)
        slack_lr (float, optional): :math:`\eta_s`. (default: :obj:`1e-5`)
        multiplier_init (float, optional): :math:`\lambda_0`. (default: :obj:`0.001`)
        slack_init (float, optional): :math:`s_0`. (default: :obj:`0.001`)
        multiplier_bound (float, optional): :math:`b`, clip :math:`|\lambda| \le b`.
            (default: :obj:`None`, unbounded)
        base_quantizers (sequence of RoleQuantizers, optional): The quantizers of each
            step's base product (:math:`K` of them). (default: :obj:`None`, FP32)
        gap_quantizers (sequence of RoleQuantizers, optional): The quantizers of each
            step's correction product (SMP only). (default: :obj:`None`, FP32)
        cached (bool, optional): Build the graph operators on the first call and reuse them
            (a fixed full-batch graph). (default: :obj:`False`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, C)`, edge indices
          :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}|, C)`
        - **quantizers see:** message :math:`(|\mathcal{E}| + |\mathcal{V}|, C)`; aggregate,
          update :math:`(|\mathcal{V}|, C)`
    """

    _cached_graph: Optional[SMPGraph]

    def __init__(self, steps: int, alpha: float = 0.1, propagation: str = "smp",
                 correction: str = "laplacian", threshold: float = 0.1,
                 multiplier_lr: float = 1e-5, slack_lr: float = 1e-5,
                 multiplier_init: float = 1e-3, slack_init: float = 1e-3,
                 multiplier_bound: Optional[float] = None,
                 base_quantizers: Optional[Sequence[RoleQuantizers]] = None,
                 gap_quantizers: Optional[Sequence[RoleQuantizers]] = None,
                 cached: bool = False) -> None:
        super().__init__(aggr="add")
        if propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}")
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
        self.steps, self.alpha = steps, alpha
        self.propagation, self.correction = propagation, correction
        self.threshold, self.multiplier_lr, self.slack_lr = threshold, multiplier_lr, slack_lr
        self.multiplier_init, self.slack_init = multiplier_init, slack_init
        self.multiplier_bound = multiplier_bound
        self.cached = cached
        self.base = self._quantizer_list(base_quantizers, steps)
        smp = propagation == "smp"
        self.gap = self._quantizer_list(gap_quantizers if smp else None, steps if smp else 0)
        # The quantizers of the product being computed (not a child module: each one is
        # owned by ``base`` or ``gap``).
        object.__setattr__(self, "_active", RoleQuantizers())
        self._cached_graph = None
        #: Per step of the last call (detached): multiplier after the step, change energy.
        self.trace: dict[str, list[float]] = {"multiplier": [], "energy": []}

    @staticmethod
    def _quantizer_list(quantizers: Optional[Sequence[RoleQuantizers]],
                        steps: int) -> nn.ModuleList:
        quantizers = list(quantizers) if quantizers is not None else []
        if quantizers and len(quantizers) != steps:
            raise ValueError(f"need {steps} RoleQuantizers (one per step), got {len(quantizers)}")
        return nn.ModuleList(quantizers or [RoleQuantizers() for _ in range(steps)])

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for q in [*self.base, *self.gap]:
            reset_quantizers(q)
        self._cached_graph = None

    # -- the graph -------------------------------------------------------------------------
    def graph(self, edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> SMPGraph:
        if self._cached_graph is not None:
            return self._cached_graph
        loops, weight = gcn_norm(edge_index, num_nodes, dtype)
        if self.propagation == "emp":
            weight = degree(loops[1], num_nodes, dtype=dtype).reciprocal()[loops[0]]
        built = SMPGraph(loops, weight, sparse_adj_t(loops, weight, num_nodes, dtype),
                         normalized_incidence(edge_index, num_nodes, dtype), loops.size(1))
        if self.cached:
            self._cached_graph = built
        return built

    def __getstate__(self) -> dict:
        # Copies and pickles drop the cache: it is derived data, and CSR tensors can't be copied.
        return {**super().__getstate__(), "_cached_graph": None}

    # -- the loop --------------------------------------------------------------------------
    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        graph = self.graph(edge_index, h.size(0), h.dtype)
        a = self.alpha
        x = h
        if self.propagation != "smp":
            for k in range(self.steps):
                x = (1 - a) * self.product(x, graph, self.base[k]) + a * h
            return x
        multiplier = h.new_tensor(self.multiplier_init)
        slack = h.new_tensor(self.slack_init)
        budget = self.threshold * graph.nnz
        trace: dict[str, list[float]] = {"multiplier": [], "energy": []}
        for k in range(self.steps):
            x_tilde = (1 - a) * self.product(x, graph, self.base[k]) + a * h
            delta = x_tilde - x
            gap = self.product(delta, graph, self.gap[k])
            direction = gap if self.correction == "adjacency" else delta - gap
            x_next = x_tilde + 2 * a * multiplier * direction
            energy = change_energy(delta, graph.incidence)
            multiplier, slack = multiplier_step(multiplier, slack, energy, budget,
                                                self.multiplier_lr, self.slack_lr,
                                                self.multiplier_bound)
            trace["multiplier"].append(float(multiplier.detach()))
            trace["energy"].append(float(energy.detach()))
            x = x_next
        self.trace = trace
        return x

    def product(self, x: Tensor, graph: SMPGraph, quantizers: RoleQuantizers) -> Tensor:
        r"""One quantized product :math:`\hat{\mathbf{A}}_q(\mathbf{x})` with ``quantizers``."""
        object.__setattr__(self, "_active", quantizers)
        try:
            if quantizers.has("message"):
                return self.propagate(graph.edge_index, x=x, weight=graph.weight)
            return self.propagate(graph.adj_t, x=x, weight=None)
        finally:
            object.__setattr__(self, "_active", RoleQuantizers())

    def message(self, x_j: Tensor, weight: Tensor) -> Tensor:
        return self._active("message", weight.view(-1, 1) * x_j)

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Optional[Tensor] = None,
                  dim_size: Optional[int] = None) -> Tensor:
        return self._active("aggregate", super().aggregate(inputs, index, ptr, dim_size))

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor) -> Tensor:
        return self._active("aggregate", spmm(adj_t, x, reduce="sum"))

    def update(self, inputs: Tensor) -> Tensor:
        return self._active("update", inputs)

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, alpha={self.alpha}, propagation={self.propagation}, "
                f"correction={self.correction}, threshold={self.threshold}, "
                f"multiplier_bound={self.multiplier_bound}")


def stable_multiplier_bound(alpha: float) -> float:
    """``1/(4 alpha)``: the largest ``|λ|`` for which ``I + 2 alpha λ L~`` (``L~``'s
    eigenvalues in ``[0, 2)``) stays positive semidefinite, so the correction never
    reverses a frequency of the change."""
    return 1 / (4 * alpha)


def multiplier_metrics(model: nn.Module) -> dict[str, float]:
    """The range of the SMP multiplier over the steps of ``model``'s last forward pass, for
    the per-epoch metrics (the trainer takes it from the training pass; empty for models
    without SMP propagation): how far the correction moves from APPNP, and the early warning
    of deep SMP's divergence (``|λ|`` past ``1/(4α)``)."""
    for module in model.modules():
        if isinstance(module, SMPProp) and module.trace["multiplier"]:
            lam = module.trace["multiplier"]
            return {"multiplier_min": min(lam), "multiplier_max": max(lam)}
    return {}


def change_energy(delta: Tensor, incidence: Tensor) -> Tensor:
    r""":math:`g = \|\mathbf{B}\boldsymbol{\Delta}\|_F^2`, the normalized Dirichlet energy of
    the change (FP32, differentiable in :math:`\boldsymbol{\Delta}`)."""
    return spmm(incidence, delta, reduce="sum").pow(2).sum()


def multiplier_step(multiplier: Tensor, slack: Tensor, energy: Tensor, budget: float,
                    multiplier_lr: float, slack_lr: float,
                    bound: Optional[float] = None) -> tuple[Tensor, Tensor]:
    r"""One basic-differential-multiplier update of :math:`\mathcal{L} = f + \lambda(c - s^2
    - g)`: descent in the slack, :math:`s \leftarrow s + 2\eta_s\lambda s`, then ascent in
    the multiplier, :math:`\lambda \leftarrow \lambda + \eta_\lambda(c - s^2 - g)`, clipped
    to :math:`[-b, b]` when a ``bound`` is given. The multiplier rises while
    :math:`g + s^2 < c` and falls otherwise."""
    slack = slack + 2 * slack_lr * multiplier * slack
    multiplier = multiplier + multiplier_lr * (budget - slack.pow(2) - energy)
    if bound is not None:
        multiplier = multiplier.clamp(-bound, bound)
    return multiplier, slack
