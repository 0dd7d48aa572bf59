"""``gnnq bench``: packed INT8/INT4/INT2/mixed aggregation and GCN inference against FP32.

``gnnq bench [bench=<preset>] [key=value ...]`` composes ``conf/bench/<preset>.yaml``
(default ``cpu``) with Hydra overrides, e.g. ``gnnq bench bench=gpu features=[128]`` or
``gnnq bench graphs=[coauthor_physics@128,synthetic_1m@128] precisions=[int4,int2]``.

What is measured, per graph and feature width ``F`` (a graph is a dataset name, loaded with
:func:`gnnq.data.load_task`, or a seeded synthetic power-law graph from ``synthetic:``; a
``name@F1/F2`` entry restricts its widths):

- **aggregation** ``Y = D^{-1/2}(A + I)D^{-1/2} X``: FP32 ``torch.sparse`` CSR (MKL on the
  CPU, cuSPARSE on a GPU), PyG's gather-scatter propagation, the project's own FP32 kernel of
  the same design as the packed one, and the packed kernel at INT8, INT4, INT2 and an A²Q-like
  mix of per-node bitwidths (higher bits on higher-degree nodes);
- **end to end**: a 2-layer GCN (``F -> F -> classes``): FP32 torch vs the packed model
  (quantize, integer transform, packed aggregation, fused bias + ReLU).

Timing: ``warmup`` untimed calls, then ``repeats`` rounds in which every method runs once in
turn (interleaved, so drifting background load hits all alike); the median is reported, with
the minimum and the spread. CPU: wall clock with ``torch.set_num_threads(threads)`` for every
method; GPU: CUDA events. Effective GB/s divides a byte model by the median time: indices as
each method stores them, one full gathered row per edge (no reuse), the output written once.
Each packed result is checked against FP32 CSR on the dequantized features.

Results: ``results/bench_<device>.md`` (with the regenerate command and the machine), ``.json``
(every timing) and ``.png``; and one MLflow run (experiment ``gnnq-bench``) with the numbers as
metrics and the three files as artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gnnq.errors import GnnqError, choice_error
from gnnq.kernels.model import PackedGraph, csr_from_edges

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "int4", "int2", "mixed")
BITS = {"int8": 8, "int4": 4, "int2": 2}
BASELINES = ("torch_csr", "pyg", "own_fp32")
DEVICES = ("auto", "cpu", "cuda")


# -- configuration -------------------------------------------------------------------------------
@dataclass
class SyntheticGraph:
    """A Chung-Lu power-law graph: expected degrees ~ rank^(-1/(exponent-1)), capped."""

    nodes: int = 100_000
    avg_degree: float = 50.0     # directed edges per node (both directions counted)
    exponent: float = 2.5
    max_degree: Optional[int] = None
    classes: int = 47
    seed: int = 0


@dataclass
class BenchTracking:
    backend: str = "mlflow"
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "gnnq-bench"


@dataclass
class BenchConfig:
    name: str = "cpu"
    device: str = "auto"
    threads: Optional[int] = 2
    graphs: list[str] = field(default_factory=lambda: ["coauthor_physics"])
    features: list[int] = field(default_factory=lambda: [128])
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # Share of nodes at each bitwidth for the "mixed" precision (A²Q-like).
    mixed_bits: dict[int, float] = field(default_factory=lambda: {1: 0.25, 2: 0.35, 4: 0.3,
                                                                   8: 0.1})
    weight_bits: int = 4
    repeats: int = 10
    warmup: int = 2
    end_to_end: bool = True
    classes: int = 32
    # PyG's propagation materialises E x F messages; skip it above this many bytes.
    pyg_max_bytes: float = 4.0e9
    check: bool = True
    seed: int = 0
    out: str = "outputs/bench"
    data_root: str = "data"
    synthetic: dict[str, SyntheticGraph] = field(default_factory=dict)
    tracking: BenchTracking = field(default_factory=BenchTracking)
    command: str = ""

    def __post_init__(self) -> None:
        self.pyg_max_bytes = float(self.pyg_max_bytes)  # PyYAML reads 1.0e9 as a string
        if self.device not in DEVICES:
            raise choice_error("bench device", self.device, DEVICES)
        for p in self.precisions:
            if p not in PRECISIONS:
                raise choice_error("precision", p, PRECISIONS)
        for b in self.baselines:
            if b not in BASELINES:
                raise choice_error("baseline", b, BASELINES)
        if self.repeats < 1 or self.warmup < 0:
            raise GnnqError(f"Invalid bench repeats/warmup ({self.repeats}/{self.warmup}): "
                            f"repeats must be >= 1 and warmup >= 0.")
        if not self.features or any(int(f) < 1 for f in self.features):
            raise GnnqError(f"Invalid bench features {self.features}: positive widths needed.")
        total = sum(self.mixed_bits.values())
        if any(int(b) not in (1, 2, 3, 4, 5, 6, 7, 8) for b in self.mixed_bits) or \
                not math.isclose(total, 1.0, abs_tol=1e-6):
            raise GnnqError(f"Invalid bench mixed_bits {dict(self.mixed_bits)}: bitwidths in "
                            f"1..8 with shares summing to 1.")
        if self.tracking.backend not in ("mlflow", "none"):
            raise choice_error("bench tracking backend", self.tracking.backend, ("mlflow", "none"))


def parse_graph_entry(entry: str, default: list[int]) -> tuple[str, list[int]]:
    """``name`` or ``name@F1/F2``."""
    name, _, widths = str(entry).partition("@")
    if not widths:
        return name, [int(f) for f in default]
    try:
        return name, [int(w) for w in widths.split("/") if w]
    except ValueError:
        raise GnnqError(f"Invalid bench graph entry {entry!r}: expected name or "
                        f"name@F1/F2 (e.g. synthetic_1m@128).") from None


def _plain_config(preset: str, overrides: list[str], folder: Path) -> BenchConfig:
    """Without Hydra/OmegaConf (the GPU machines have neither): read the preset with PyYAML,
    include ``synthetic/graphs.yaml``, resolve ``${oc.env:VAR,default}`` and apply
    ``key=value`` / ``a.b=value`` overrides (values parsed as YAML)."""
    import re

    try:
        from yaml import safe_load
    except ImportError:  # no PyYAML either: the presets use a small subset of YAML
        safe_load = _tiny_yaml

    def env(text):
        if isinstance(text, str):
            return re.sub(r"\$\{oc\.env:([A-Za-z_0-9]+),([^}]*)\}",
                          lambda m: os.environ.get(m.group(1), m.group(2)), text)
        if isinstance(text, dict):
            return {k: env(v) for k, v in text.items()}
        if isinstance(text, list):
            return [env(v) for v in text]
        return text

    raw = safe_load((folder / f"{preset}.yaml").read_text()) or {}
    raw.pop("defaults", None)
    raw["synthetic"] = safe_load((folder / "synthetic" / "graphs.yaml").read_text())
    for item in overrides:
        key, sep, value = item.lstrip("+").partition("=")
        if not sep:
            raise GnnqError(f"Invalid bench override {item!r}: expected key=value.")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = safe_load(value)
    raw = env(raw)
    known = set(BenchConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise GnnqError(f"Unknown bench option(s) {', '.join(unknown)}. Options: "
                        f"{', '.join(sorted(known))}.")
    raw["synthetic"] = {k: SyntheticGraph(**v) for k, v in (raw.get("synthetic") or {}).items()}
    raw["tracking"] = BenchTracking(**(raw.get("tracking") or {}))
    raw["mixed_bits"] = {int(k): float(v) for k, v in (raw.get("mixed_bits") or {}).items()}
    try:
        return BenchConfig(**raw)
    except TypeError as err:
        raise GnnqError(f"Invalid bench configuration: {err}.") from None


def _tiny_scalar(text: str):
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_tiny_scalar(t) for t in inner.split(",")] if inner else []
    if text.startswith("{") and text.endswith("}"):
        inner = text[1:-1].strip()
        pairs = [t.split(":", 1) for t in inner.split(",")] if inner else []
        return {_tiny_scalar(k): _tiny_scalar(v) for k, v in pairs}
    if text in ("null", "~", ""):
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def _tiny_yaml(text: str):
    """The YAML subset of conf/bench/*.yaml: block mappings by indentation, flow lists and
    maps of scalars, comments (for machines without PyYAML)."""
    if "\n" not in text and ":" not in text.split("#")[0]:
        return _tiny_scalar(text)
    root: dict = {}
    stack = [(-1, root)]
    for line in text.splitlines():
        body = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not body.strip() or body.strip().startswith("- "):
            continue
        indent = len(body) - len(body.lstrip())
        key, _, value = body.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value.strip():
            parent[_tiny_scalar(key)] = _tiny_scalar(value)
        else:
            parent[_tiny_scalar(key)] = {}
            stack.append((indent, parent[_tiny_scalar(key)]))
    return root


def compose_config(args: list[str]) -> BenchConfig:
    """Compose ``conf/bench/<preset>.yaml`` with the overrides in ``args``."""
    from gnnq.cli import check_folder_can_be_made, config_dir

    preset, overrides = "cpu", []
    for arg in args:
        if arg.startswith("bench="):
            preset = arg.split("=", 1)[1]
        elif arg.startswith("tracking="):  # as in gnnq train, where tracking= picks a group
            overrides.append(f"tracking.backend={arg.split('=', 1)[1]}")
        else:
            overrides.append(arg)
    folder = config_dir() / "bench"
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    if preset not in available:
        raise choice_error("bench preset (bench=)", preset, available)
    try:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        config = _plain_config(preset, overrides, folder)
    else:
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name=f"bench/{preset}", overrides=overrides)
            plain = OmegaConf.to_container(cfg, resolve=True)
            merged = OmegaConf.merge(OmegaConf.structured(BenchConfig), plain)
            config = OmegaConf.to_object(merged)
        except (HydraException, OmegaConfBaseException) as err:
            message = str(err).strip().splitlines()
            options = ", ".join(f.name for f in BenchConfig.__dataclass_fields__.values())
            raise GnnqError(f"Invalid bench configuration: {message[0] if message else err}. "
                            f"Options: {options} (conf/bench/{preset}.yaml).") from None
    config.command = "gnnq bench " + " ".join(args) if args else "gnnq bench"
    check_folder_can_be_made(config.out, "out=")  # before the timings, which take long
    return config


# -- graphs and features ----------------------------------------------------------------------------
@dataclass
class BenchGraph(PackedGraph):
    """A benchmark graph: the GCN operator as CSR, with where it came from."""

    name: str
    classes: int
    source: str


def power_law_edges(spec: SyntheticGraph) -> tuple[Tensor, Tensor]:
    """Undirected Chung-Lu edges (both directions), self-loops dropped, seeded."""
    gen = torch.Generator().manual_seed(spec.seed)
    n = spec.nodes
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    weight = rank.pow(-1.0 / (spec.exponent - 1.0))
    weight *= spec.avg_degree / weight.mean()
    if spec.max_degree:
        weight.clamp_(max=float(spec.max_degree))
        weight *= spec.avg_degree / weight.mean()
    cdf = torch.cumsum(weight / weight.sum(), 0)
    cdf[-1] = 1.0
    perm = torch.randperm(n, generator=gen)  # no id locality: high degrees anywhere
    pairs = int(round(n * spec.avg_degree / 2))
    src_parts, dst_parts = [], []
    chunk = 1 << 24
    for start in range(0, pairs, chunk):
        m = min(chunk, pairs - start)
        a = torch.searchsorted(cdf, torch.rand(m, generator=gen, dtype=torch.float64))
        b = torch.searchsorted(cdf, torch.rand(m, generator=gen, dtype=torch.float64))
        keep = a != b
        src_parts.append(perm[a[keep].clamp_max(n - 1)])
        dst_parts.append(perm[b[keep].clamp_max(n - 1)])
    src, dst = torch.cat(src_parts), torch.cat(dst_parts)
    return torch.cat([src, dst]), torch.cat([dst, src])


def _dataset_names() -> tuple[str, ...]:
    """gnnq's datasets, or none where OmegaConf is missing (GPU machines: synthetic only)."""
    try:
        from gnnq.config import DATASETS
    except ImportError:
        return ()
    return tuple(DATASETS)


def load_graph(name: str, cfg: BenchConfig) -> BenchGraph:
    if name in cfg.synthetic:
        spec = cfg.synthetic[name]
        src, dst = power_law_edges(spec)
        loops = torch.arange(spec.nodes)
        g = csr_from_edges(torch.cat([src, loops]), torch.cat([dst, loops]), spec.nodes)
        desc = (f"synthetic Chung-Lu power law: {spec.nodes:,} nodes, average degree "
                f"{spec.avg_degree:g}, exponent {spec.exponent:g}, max degree cap "
                f"{spec.max_degree}, seed {spec.seed}")
        return BenchGraph(g.rowptr, g.col, g.deg_inv_sqrt, name, spec.classes, desc)
    from gnnq.config import DATASETS, DataRootConfig, DatasetConfig
    from gnnq.data import load_task

    if name not in DATASETS:
        raise choice_error("bench graph", name, [*DATASETS, *cfg.synthetic])
    task = load_task(DataRootConfig(root=cfg.data_root, download="never"),
                     DatasetConfig(name=name))
    if task.level != "node":
        raise GnnqError(f"Bench graph {name!r} is a graph-level dataset; use a node-level one.")
    g = PackedGraph.gcn(task.graph.edge_index, task.graph.num_nodes)
    return BenchGraph(g.rowptr, g.col, g.deg_inv_sqrt, name, task.num_classes,
                      f"dataset {name} (gnnq.data.load_task), self-loops added")


def mixed_node_bits(rowptr: Tensor, shares: dict[int, float]) -> Tensor:
    """A²Q-like per-node bitwidths: the lowest-degree share gets the fewest bits."""
    n = rowptr.numel() - 1
    degree = rowptr[1:] - rowptr[:-1]
    order = torch.argsort(degree, stable=True)
    bits = torch.empty(n, dtype=torch.int32)
    start = 0
    items = sorted((int(b), float(s)) for b, s in shares.items())
    for k, (b, share) in enumerate(items):
        end = n if k == len(items) - 1 else min(n, start + int(round(share * n)))
        bits[order[start:end]] = b
        start = end
    return bits


def feature_grid(x: Tensor, precision: str, node_bits: Optional[Tensor]):
    """A grid like the trained models': per channel (uniform bits) or per node (mixed)."""
    from gnnq.kernels.grid import Grid, symmetric_grid

    if precision == "mixed":
        # Signed {-(2^(b-1)-1)..} grids; 1-bit rows use the unsigned {0, 1} grid (A²Q's
        # post-ReLU grid), the only 1-bit grid that keeps information.
        b = node_bits.to(torch.int32)
        one = b == 1
        levels = torch.where(one, torch.ones_like(b), 2 ** (b - 1) - 1).to(torch.float32)
        scale = (x.abs().amax(1) / levels).clamp_min(1e-8)
        zero = torch.where(one, torch.zeros_like(b), 2 ** (b - 1))
        umin = torch.where(one, torch.zeros_like(b), torch.ones_like(b))
        return Grid("row", b, scale, zero, umin, 2 ** b - 1, "half_away")
    bits = BITS[precision]
    scale = (x.abs().amax(0) / (2 ** (bits - 1) - 1)).clamp_min(1e-8)
    return symmetric_grid("column", scale, torch.full((x.size(1),), bits), unsigned=False)


# -- timing ------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    label: str
    run: Callable[[], Any]
    bytes: float
    precision: str
    kind: str  # "baseline" or "packed"
    skipped: Optional[str] = None
    times: list[float] = field(default_factory=list)
    check: Optional[float] = None

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times) if self.times else float("nan")


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def run_interleaved(methods: list[Method], cfg: BenchConfig, timer: Timer) -> None:
    active = [m for m in methods if m.skipped is None]
    for _ in range(cfg.warmup):
        for m in active:
            timer(m.run)
    for _ in range(cfg.repeats):
        for m in active:
            m.times.append(timer(m.run))


# -- one graph ---------------------------------------------------------------------------------------
def _csr_tensor(rowptr, col, values, n):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(rowptr, col.to(torch.int64), values, (n, n))


def _pyg_propagate():
    from torch_geometric.nn import MessagePassing

    class Propagate(MessagePassing):
        def __init__(self) -> None:
            super().__init__(aggr="add")

        def forward(self, x, edge_index, weight):
            return self.propagate(edge_index, x=x, weight=weight)

        def message(self, x_j, weight):
            return weight.view(-1, 1) * x_j

    return Propagate()


def aggregation_methods(g: BenchGraph, F: int, cfg: BenchConfig, backend, device,
                        node_bits: Tensor) -> list[Method]:
    from gnnq.kernels.packing import words_per_row

    n, e = g.num_nodes, g.num_edges
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(n, F, generator=gen)
    out_bytes = 4.0 * n * F
    methods: list[Method] = []
    rowptr_d, col_d, dinv_d = g.rowptr.to(device), g.col.to(device), g.deg_inv_sqrt.to(device)
    edge_w = g.edge_weight
    x_d = x.to(device)
    if "fp32" in cfg.precisions or cfg.check:
        adj = _csr_tensor(g.rowptr.to(device), g.col.to(device), edge_w.to(device), n)
    if "fp32" in cfg.precisions:
        if "torch_csr" in cfg.baselines:
            methods.append(Method("torch_csr", "FP32 torch.sparse CSR", lambda: adj @ x_d,
                                  e * 12.0 + (n + 1) * 8 + e * 4.0 * F + out_bytes, "fp32",
                                  "baseline"))
        if "pyg" in cfg.baselines:
            need = 2.0 * e * F * 4
            prop = _pyg_propagate()
            edge_index = torch.stack([g.col.long(), g.destinations]).to(device)
            w_d = edge_w.to(device)
            m = Method("pyg", "FP32 PyG propagate (gather-scatter)",
                       lambda: prop(x_d, edge_index, w_d),
                       e * 20.0 + e * 4.0 * F + out_bytes, "fp32", "baseline")
            if need > cfg.pyg_max_bytes:
                m.skipped = (f"would materialise {need / 1e9:.1f} GB of per-edge messages "
                             f"(pyg_max_bytes={cfg.pyg_max_bytes / 1e9:g} GB)")
            methods.append(m)
        if "own_fp32" in cfg.baselines:
            methods.append(Method(
                "own_fp32", "FP32 gnnq kernel (same design)",
                lambda: backend.spmm_f32(rowptr_d, col_d, x_d, src_scale=dinv_d,
                                         dst_scale=dinv_d),
                e * 4.0 + (n + 1) * 8 + n * 4 + e * 4.0 * F + out_bytes, "fp32", "baseline"))
    for precision in cfg.precisions:
        if precision == "fp32":
            continue
        grid = feature_grid(x, precision, node_bits)
        packed = backend.quantize_pack(x_d, grid)
        kw: dict[str, Any] = dict(dst_scale=dinv_d)
        col_use = col_d
        if grid.axis == "row":
            order = packed.order
            o = order if order is not None else torch.arange(n)
            kw.update(src_scale=(g.deg_inv_sqrt[o] * grid.scale[o]).to(device),
                      src_zero=grid.zero_point[o].to(torch.float32).to(device))
            if order is not None:
                from gnnq.kernels.model import sort_within_rows

                col_use = sort_within_rows(g.rowptr, packed.inverse_order()[g.col.long()]
                                           .to(torch.int32)).to(device)
            row_bytes = torch.tensor([4.0 * words_per_row(F, int(b)) for b in range(1, 9)])
            gathered = float(row_bytes[(node_bits.long() - 1)][g.col.long()].sum())
            label = "mixed " + "/".join(f"{int(b)}" for b in sorted(cfg.mixed_bits)) + " bits"
        else:
            kw.update(src_scale=dinv_d, col_scale=grid.scale.to(device),
                      col_zero=grid.zero_point.to(device))
            gathered = e * 4.0 * words_per_row(F, BITS[precision])
            label = f"{precision.upper()} packed"
        m = Method(precision, f"{label} ({backend.name})",
                   lambda packed=packed, kw=kw, col_use=col_use: backend.spmm(
                       rowptr_d, col_use, packed, **kw),
                   e * 4.0 + (n + 1) * 8 + n * 4 + gathered + out_bytes, precision, "packed")
        if cfg.check:
            deq = grid.dequantize(grid.quantize(x)).to(device)
            want = adj @ deq
            got = m.run()
            m.check = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            del deq, want, got
        methods.append(m)
    return methods


def gcn_end_to_end(g: BenchGraph, F: int, cfg: BenchConfig, backend, device,
                   node_bits: Tensor) -> list[Method]:
    """FP32 2-layer GCN vs the packed model at each precision (random weights)."""
    from gnnq.kernels.grid import symmetric_grid
    from gnnq.kernels.model import PackedGCNLayer, PackedModel
    from gnnq.kernels.packing import pack

    n, e = g.num_nodes, g.num_edges
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(n, F, generator=gen)
    widths = [F, F, g.classes]
    weights = [torch.randn(o, i, generator=gen) / math.sqrt(i) for i, o in zip(widths, widths[1:])]
    biases = [0.1 * torch.randn(o, generator=gen) for o in widths[1:]]
    adj = _csr_tensor(g.rowptr.to(device), g.col.to(device), g.edge_weight.to(device), n)
    x_d = x.to(device)
    w_d = [w.to(device) for w in weights]
    b_d = [b.to(device) for b in biases]

    def fp32():
        h = torch.relu(adj @ (x_d @ w_d[0].t()) + b_d[0])
        return adj @ (h @ w_d[1].t()) + b_d[1]

    methods = [Method("gcn_fp32", "FP32 torch (MKL/cuBLAS GEMM + CSR SpMM)", fp32, 0.0, "fp32",
                      "baseline")]
    graph = g
    # Activation ranges for the grids, from the FP32 model itself.
    with torch.no_grad():
        xw0 = x @ weights[0].t()
        h1 = fp32_hidden(adj, x_d, w_d, b_d).cpu()
        xw1 = h1 @ weights[1].t()
    for precision in cfg.precisions:
        if precision == "fp32":
            continue
        layers = []
        for k, (w, b, inp, xw) in enumerate(zip(weights, biases, (x, h1), (xw0, xw1))):
            wbits = 8 if precision == "int8" else cfg.weight_bits
            wscale = w.abs().amax(1) / (2 ** (wbits - 1) - 1)
            wgrid = symmetric_grid("row", wscale, torch.full((w.size(0),), wbits), False)
            in_grid = feature_grid(inp, precision, node_bits if precision == "mixed" else None)
            if in_grid.axis == "column":  # inputs need one scale per node or per tensor
                bits = BITS[precision]
                in_grid = symmetric_grid("tensor", inp.abs().max().reshape(1) /
                                         (2 ** (bits - 1) - 1), torch.tensor([bits]), False)
            f_bits = 4 if precision == "mixed" else BITS[precision]
            fscale = xw.abs().amax(0).clamp_min(1e-8) / (2 ** (f_bits - 1) - 1)
            f_grid = symmetric_grid("column", fscale, torch.full((xw.size(1),), f_bits), False)
            layers.append(PackedGCNLayer(w.size(1), w.size(0), pack(wgrid.quantize(w),
                                                                    wgrid.uniform_bits),
                                         wgrid, input=in_grid, feature=f_grid, bias=b,
                                         relu=k == 0))
        model = PackedModel(graph, layers)
        methods.append(Method(f"gcn_{precision}", f"packed GCN, {precision} ({backend.name})",
                              lambda model=model: model.forward(x_d, backend, to_cpu=False),
                              0.0, precision,
                              "packed"))
    return methods


def fp32_hidden(adj, x, w, b):
    return torch.relu(adj @ (x @ w[0].t()) + b[0])


# -- the whole benchmark --------------------------------------------------------------------------
def machine(device: torch.device, backend) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "kernels": backend.name}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()
        info["memory_gb"] = round(int(mem[1]) / 2 ** 20, 1)
    except OSError:
        pass
    info["load_average_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if backend.name == "cpu":
        info["cpu_kernel_isa"] = backend.ext.isa()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2 ** 30, 1)
        info["cuda"] = torch.version.cuda
    return info


def device_slug(info: dict[str, Any]) -> str:
    if "gpu" not in info:
        return "cpu"
    import re

    match = re.search(r"\b([a-z]\d{2,4})\b", info["gpu"].lower())
    return match.group(1) if match else "cuda"


def run_bench(cfg: BenchConfig,
              on_graph: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Time every graph of ``cfg``; ``on_graph(results)`` runs after each finished graph."""
    from gnnq.kernels import cuda
    from gnnq.kernels.backend import get_backend

    datasets = _dataset_names()
    for entry in cfg.graphs:  # every name is checked before anything is loaded or timed
        name, _ = parse_graph_entry(entry, cfg.features)
        if name not in cfg.synthetic and name not in datasets:
            raise choice_error("bench graph", name, [*datasets, *cfg.synthetic])
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.device == "cuda" and not cuda.available():
        raise GnnqError(f"bench device=cuda, but {cuda.why_unavailable()}.")
    backend = get_backend({"auto": "auto", "cpu": "cpu", "cuda": "cuda"}[cfg.device])
    device = backend.device
    info = machine(device, backend)
    timer = Timer(device)
    results: dict[str, Any] = {"config": asdict(cfg), "machine": info, "graphs": []}
    for entry in cfg.graphs:
        name, widths = parse_graph_entry(entry, cfg.features)
        started = time.time()
        g = load_graph(name, cfg)
        node_bits = mixed_node_bits(g.rowptr, cfg.mixed_bits)
        gres = {"graph": name, "nodes": g.num_nodes, "edges": g.num_edges,
                "max_degree": int((g.rowptr[1:] - g.rowptr[:-1]).max()),
                "source": g.source, "load_s": round(time.time() - started, 1), "runs": []}
        print(f"gnnq bench: {name}: {g.num_nodes:,} nodes, {g.num_edges:,} edges "
              f"(self-loops included)", file=sys.stderr)
        for F in widths:
            for what, build in (("aggregation", aggregation_methods),
                                ("gcn_2layer", gcn_end_to_end)):
                if what == "gcn_2layer" and not cfg.end_to_end:
                    continue
                methods = build(g, F, cfg, backend, device, node_bits)
                run_interleaved(methods, cfg, timer)
                base = next((m for m in methods if m.name in ("torch_csr", "gcn_fp32")
                             and m.times), None)
                own = next((m for m in methods if m.name == "own_fp32" and m.times), None)
                rows = []
                for m in methods:
                    row = {"method": m.name, "label": m.label, "precision": m.precision,
                           "kind": m.kind, "skipped": m.skipped,
                           "median_ms": m.median_ms,
                           "min_ms": 1e3 * min(m.times) if m.times else None,
                           "max_ms": 1e3 * max(m.times) if m.times else None,
                           "times_ms": [round(1e3 * t, 4) for t in m.times],
                           "modelled_bytes": m.bytes or None,
                           "gb_per_s": (m.bytes / (m.median_ms / 1e3) / 1e9
                                        if m.bytes and m.times else None),
                           "speedup_vs_torch_csr": (base.median_ms / m.median_ms
                                                    if base and m.times else None),
                           "speedup_vs_own_fp32": (own.median_ms / m.median_ms
                                                   if own and m.times and what == "aggregation"
                                                   else None),
                           "max_rel_err": m.check}
                    rows.append(row)
                gres["runs"].append({"what": what, "F": F, "methods": rows})
                summary = ", ".join(f"{r['method']} {r['median_ms']:.2f} ms" for r in rows
                                    if r["median_ms"] == r["median_ms"])
                print(f"gnnq bench: {name} F={F} {what}: {summary}", file=sys.stderr)
                del methods
        results["graphs"].append(gres)
        del g
        if on_graph is not None:
            on_graph(results)
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


# -- reporting ------------------------------------------------------------------------------------
def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "–" if v is None or v != v else format(v, spec)


def summary_table(results: dict[str, Any]) -> list[str]:
    """Speedup over FP32 torch.sparse CSR of every packed precision, per graph, width and
    measurement: the numbers the detailed tables below back up."""
    precisions: list[str] = []
    rows = []
    for gres in results["graphs"]:
        for run in gres["runs"]:
            speedups = {r["precision"]: r["speedup_vs_torch_csr"] for r in run["methods"]
                        if r["kind"] == "packed" and not r["skipped"]}
            precisions += [p for p in speedups if p not in precisions]
            what = "aggregation" if run["what"] == "aggregation" else "2-layer GCN"
            rows.append((gres["graph"], run["F"], what, speedups))
    if not rows:
        return []
    lines = ["## Summary: speedup over FP32 torch.sparse CSR (median times)", "",
             "| graph | F | measured | " + " | ".join(p.upper() for p in precisions) + " |",
             "|---|---:|---|" + "---:|" * len(precisions)]
    for graph, F, what, speedups in rows:
        cells = [f"{_fmt(speedups.get(p))}x" if p in speedups else "–" for p in precisions]
        lines.append(f"| {graph} | {F} | {what} | " + " | ".join(cells) + " |")
    return lines + [""]


def read_results(path: Path) -> dict[str, Any]:
    """A finished run's ``bench_<device>.json`` (``--from-json``), or a clear error."""
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GnnqError(f"{path} is not a readable JSON file ({err}); --from-json takes the "
                        f"bench_<device>.json that gnnq bench wrote.") from None
    missing = [k for k in ("config", "machine", "graphs")
               if not isinstance(results, dict) or k not in results]
    if missing:
        raise GnnqError(f"{path} is not a gnnq bench result: it lacks {', '.join(missing)}. "
                        f"--from-json takes the bench_<device>.json that gnnq bench wrote.")
    return results


def write_markdown(results: dict[str, Any], path: Path) -> None:
    cfg, info = results["config"], results["machine"]
    lines = [f"# gnnq bench: packed aggregation and GCN inference ({device_slug(info)})", "",
             "Regenerate with:", "", "```", cfg["command"], "```", "",
             "## Machine", ""]
    for key in ("cpu", "gpu", "gpu_memory_gb", "cuda", "cpu_count", "torch_threads",
                "memory_gb", "cpu_kernel_isa", "kernels", "torch", "python", "platform",
                "load_average_start", "load_average_end"):
        if key in info and info[key] is not None:
            lines.append(f"- {key}: {info[key]}")
    lines += ["",
              f"Timing: {cfg['warmup']} warm-up calls, then the median of {cfg['repeats']} "
              f"interleaved repetitions (every method once per round); same thread count "
              f"({info.get('torch_threads')}) for every method. GB/s = modelled bytes / "
              f"median time (indices as stored, one gathered row per edge, output once). "
              f"rel. err: packed output vs FP32 CSR on the dequantized features.",
              ""]
    la = info.get("load_average_start")
    if la and info.get("cpu_count") and la[0] > 0.5 * info["cpu_count"] and "gpu" not in info:
        lines += [f"**Caveat:** the machine was shared: load average {la[0]:.1f} on "
                  f"{info['cpu_count']} cores when the run started (other jobs were running), "
                  f"so absolute times are inflated and noisy; ratios come from interleaved "
                  f"repetitions.", ""]
    lines += summary_table(results)
    for gres in results["graphs"]:
        lines += [f"## {gres['graph']}: {gres['nodes']:,} nodes, {gres['edges']:,} edges "
                  f"(max degree {gres['max_degree']:,})", "", f"{gres['source']}.", ""]
        for run in gres["runs"]:
            title = "aggregation Â X" if run["what"] == "aggregation" else \
                "2-layer GCN inference (F -> F -> classes)"
            lines += [f"### F = {run['F']}, {title}", "",
                      "| method | median ms | min ms | GB/s | vs FP32 torch CSR | vs own FP32 "
                      "| rel. err |", "|---|---:|---:|---:|---:|---:|---:|"]
            for r in run["methods"]:
                if r["skipped"]:
                    lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | |")
                    continue
                lines.append(
                    f"| {r['label']} | {_fmt(r['median_ms'])} | {_fmt(r['min_ms'])} | "
                    f"{_fmt(r['gb_per_s'], '.1f')} | {_fmt(r['speedup_vs_torch_csr'])}x | "
                    f"{_fmt(r['speedup_vs_own_fp32'])}{'x' if r['speedup_vs_own_fp32'] else ''} "
                    f"| {_fmt(r['max_rel_err'], '.1e')} |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(g, run) for g in results["graphs"] for run in g["runs"]
              if run["what"] == "aggregation"]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (g, run) in zip(axes[0], panels):
        rows = [r for r in run["methods"] if r["speedup_vs_torch_csr"]]
        ax.bar(range(len(rows)), [r["speedup_vs_torch_csr"] for r in rows],
               color=["#999999" if r["kind"] == "baseline" else "#1f77b4" for r in rows])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["method"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{g['graph']}, F={run['F']}", fontsize=9)
        ax.set_ylabel("speedup vs FP32 torch CSR")
    fig.suptitle(f"gnnq packed aggregation ({device_slug(results['machine'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def track(results: dict[str, Any], files: list[Path], cfg: BenchConfig) -> Optional[str]:
    if cfg.tracking.backend == "none":
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("gnnq: mlflow is not installed here; the benchmark is not tracked "
              "(tracking.backend=none silences this).", file=sys.stderr)
        return None
    from gnnq.config import TrackingConfig
    from gnnq.tracking.mlflow_tracker import flatten, make_tracker

    tracker = make_tracker(TrackingConfig(backend="mlflow", uri=cfg.tracking.uri,
                                          experiment=cfg.tracking.experiment))
    tracker.start(f"bench-{device_slug(results['machine'])}", tags={"gnnq.kind": "bench"},
                  parent_run_id=None)
    tracker.log_params(flatten({"bench": results["config"],
                                "machine": {k: v for k, v in results["machine"].items()
                                            if not k.startswith("load_")}}))
    metrics = {}
    for g in results["graphs"]:
        for run in g["runs"]:
            for r in run["methods"]:
                if r["median_ms"] == r["median_ms"] and not r["skipped"]:
                    key = f"{g['graph']}.F{run['F']}.{run['what']}.{r['method']}"
                    metrics[f"{key}.median_ms"] = r["median_ms"]
                    if r["speedup_vs_torch_csr"]:
                        metrics[f"{key}.speedup_vs_torch_csr"] = r["speedup_vs_torch_csr"]
                    if r["gb_per_s"]:
                        metrics[f"{key}.gb_per_s"] = r["gb_per_s"]
    tracker.log_metrics(metrics)
    for f in files:
        tracker.log_artifact(f, "bench")
    tracker.end("FINISHED")
    return tracker.run_id


def write_json(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_{device_slug(results['machine'])}.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("gnnq bench --from-json results/bench_h100.json [key=value ...]: rewrite the report "
              "and plot of a finished run (e.g. one measured on a GPU machine without MLflow) "
              "and log it to MLflow here; overrides set out= and tracking.*.")
        return 0
    if argv and argv[0] == "--from-json":
        if len(argv) < 2 or not Path(argv[1]).is_file():
            raise GnnqError("gnnq bench --from-json needs the path of a bench_<device>.json "
                            "written by gnnq bench.")
        results = read_results(Path(argv[1]))
        cfg = compose_config([f"bench={results['config'].get('name', 'cpu')}", *argv[2:]])
        cfg.command = results["config"].get("command", cfg.command)
    else:
        cfg = compose_config(argv)
        saved: Optional[Path] = None

        def save(partial: dict[str, Any]) -> None:
            # Each finished graph at once: a run cut short keeps its timings for --from-json.
            nonlocal saved
            saved = write_json(partial, Path(cfg.out))

        try:
            results = run_bench(cfg, on_graph=save)
        except BaseException:
            if saved is not None:
                print(f"gnnq bench: the finished graphs' timings are saved in {saved}; "
                      f"`gnnq bench --from-json {saved}` reports them.", file=sys.stderr)
            raise
    out = Path(cfg.out)
    files = [write_json(results, out)]
    files += [files[0].with_suffix(".md"), files[0].with_suffix(".png")]
    write_markdown(results, files[1])
    write_plot(results, files[2])
    run_id = None
    try:
        run_id = track(results, [f for f in files if f.exists()], cfg)
    except GnnqError:
        raise
    except Exception as err:  # noqa: BLE001 - never lose the written results to tracking
        log.error("MLflow tracking of the benchmark failed (%s: %s); the files are written.",
                  type(err).__name__, err)
    print(f"gnnq: wrote {', '.join(str(f) for f in files if f.exists())}"
          + (f"; MLflow run id {run_id}" if run_id else ""))
    return 0
