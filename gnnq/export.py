"""``gnnq export``: a trained, fake-quantized model becomes a packed integer model.

``gnnq export <source>`` takes a checkpoint file (``outputs/.../checkpoints/run0.pt``), a run's
output folder, or an MLflow run id (its ``checkpoints/`` artifact), rebuilds the model from the
checkpoint's own config, and writes a ``.safetensors`` file (:mod:`gnnq.kernels.format`). It
then runs the packed model on the integer reference and on the kernels and reports how often
its predictions agree with the fake-quantized original, and the largest logit difference.

**Any quantization method plugs in by quantizer type.** The exporter asks each quantizer of
the model for its integer :class:`~gnnq.kernels.grid.Grid`:

1. a quantizer class may define ``integer_grid(self, x) -> Grid`` itself (``x``: the tensor it
   quantizes, the weight for a weight quantizer, the export pass's input otherwise), or
2. register an adapter: ``@register_grid(MyQuantizer) def f(q, x) -> Grid``.

Adapters are registered below for A²Q (per-node / per-channel symmetric grids, half away from
zero), Degree-Quant (per-tensor affine grids from the weight's min/max and the activations'
EMA ranges, half to even) and the smoothness-aware QLR quantizer (per-tensor affine grids,
``round(x / s + z)``; its BT/BT* truncated 2-bit grids are not affine and are refused).
Whatever the source of a grid, the exporter checks it against the quantizer on the tensors
the model actually produced: the weights must be reproduced bit for bit
(``grid.dequantize(grid.quantize(w)) == q(w)``), activations are compared on the export
forward pass, so an adapter that does not match its quantizer fails loudly instead of
exporting a wrong model.

**Architectures.** Packers are registered per model class (:func:`register_packer`): the
node-level GCN and the smoothness-aware paper's SMP model (its MLP and every propagation
step's products) are packed today. Per-edge ``message`` quantizers (Degree-Quant,
smoothness-aware) requantize every edge's product ``w_ij h_j``: the packed model keeps that
grid and aggregates those products edge by edge, summing message codes as integers
(:func:`~gnnq.kernels.model.message_sum`), which the packed SpMM kernels do not do.
``--drop-role message`` leaves those quantizers out instead, so GCN layers run on the fast
kernels as an approximation whose cost the verification reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from gnnq import __version__
from gnnq.errors import GnnqError, load_failure
from gnnq.kernels.grid import Grid, affine_grid, symmetric_grid
from gnnq.kernels.model import (PackedGCNLayer, PackedGraph, PackedLinear, PackedModel,
                                PackedSMPProp)
from gnnq.kernels.packing import MAX_BITS, pack
from gnnq.quant.base import Quantizer
from gnnq.tracking.mlflow_tracker import RUN_ID, open_client
from gnnq.train.snapshot import finished_checkpoints

log = logging.getLogger(__name__)

GridAdapter = Callable[[nn.Module, Optional[Tensor]], Grid]
GRID_ADAPTERS: dict[type, GridAdapter] = {}
PACKERS: dict[type, Callable[..., tuple["PackedModel", dict[str, int]]]] = {}


def register_grid(cls: type) -> Callable[[GridAdapter], GridAdapter]:
    """Register how quantizers of class ``cls`` (and subclasses) give their integer grid."""
    def decorator(fn: GridAdapter) -> GridAdapter:
        GRID_ADAPTERS[cls] = fn
        return fn
    return decorator


def register_packer(cls: type):
    """Register the function that packs models of class ``cls`` (see :func:`pack_gcn`)."""
    def decorator(fn):
        PACKERS[cls] = fn
        return fn
    return decorator


def grid_of(quantizer: nn.Module, where: str, x: Optional[Tensor] = None) -> Grid:
    """The integer grid of ``quantizer`` for the tensor ``x`` (see the module docstring)."""
    method = getattr(quantizer, "integer_grid", None)
    if callable(method):
        return method(x)
    for cls in type(quantizer).__mro__:
        if cls in GRID_ADAPTERS:
            return GRID_ADAPTERS[cls](quantizer, x)
    raise GnnqError(f"The quantizer {type(quantizer).__name__} at {where} has no integer export: "
                    f"give it an integer_grid() method or register an adapter with "
                    f"gnnq.export.register_grid. Registered types: "
                    f"{', '.join(sorted(c.__name__ for c in GRID_ADAPTERS)) or 'none'}.")


def _register_a2q() -> None:
    from gnnq.quant.a2q import A2QQuantizer, NNSQuantizer

    @register_grid(A2QQuantizer)
    def a2q_grid(q: A2QQuantizer, x: Optional[Tensor]) -> Grid:
        """A²Q: step ``|s|`` and ``round(bits)`` per group; signed ``{-(2^(b-1)-1)..}`` or, for
        a non-negative tensor, unsigned ``{0..2^b - 1}`` (gnnq/quant/a2q.py), half away."""
        if isinstance(q, NNSQuantizer):
            raise GnnqError("A²Q's Nearest-Neighbor-Strategy tables (graph-level models) pick "
                            "a node's grid from its values at run time; export supports "
                            "node-level models.")
        unsigned = int(q.unsigned)
        if unsigned < 0:
            raise GnnqError("An A²Q quantizer has never seen data (its signedness is unset); "
                            "export runs the model once first, so the checkpoint is damaged.")
        bits = q.bits.detach().view(-1).clone()
        if q.learn_bits:  # the projection A2QQuantizer.forward applies
            low, high = q.bit_range
            bits = bits.clamp(max(low, 2 - unsigned), high)
        bits = torch.round(bits)
        if bool((bits > MAX_BITS).any()) or bool((bits < 1).any()):
            raise GnnqError(f"An A²Q quantizer uses bitwidths {torch.unique(bits).tolist()}; "
                            f"packed models store 1..{MAX_BITS} bits (quant.max_bits <= 8).")
        step = q.step.detach().abs().clamp_min(torch.finfo(torch.float32).tiny).view(-1)
        axis = "tensor" if q.groups == 1 else ("row" if q.dim == 0 else "column")
        return symmetric_grid(axis, step, bits, unsigned=bool(unsigned), rounding="half_away")


def _register_degree_quant() -> None:
    try:
        from gnnq.quant import degree_quant as dq
    except ImportError:  # pragma: no cover - the method is optional in this build
        return

    def affine(lo: Tensor, hi: Tensor, bits: int) -> Grid:
        scale, zero = dq.grid(lo.detach().to(torch.float32), hi.detach().to(torch.float32),
                              bits)
        return affine_grid("tensor", scale.reshape(1), zero.reshape(1).to(torch.int32), bits,
                           rounding="half_even")

    @register_grid(dq.WeightQuantizer)
    def dq_weight(q, x: Optional[Tensor]) -> Grid:
        """Degree-Quant weights: the affine grid of the weight's own min/max."""
        if x is None:
            raise GnnqError("A Degree-Quant weight grid needs the weight tensor.")
        lo, hi = dq.percentile_range(x.detach(), 0.0)
        return affine(lo, hi, q.bits)

    @register_grid(dq.ActivationQuantizer)
    def dq_activation(q, x: Optional[Tensor]) -> Grid:
        """Degree-Quant activations at eval: the frozen EMA range of training."""
        if q.eval_ranges != "ema" or not bool(q.tracked):
            raise GnnqError("A Degree-Quant activation quantizer with eval_ranges=dynamic (or "
                            "never trained) takes its range from each tensor at run time; "
                            "only frozen EMA ranges can be exported (eval_ranges: ema).")
        return affine(q.lo, q.hi, q.bits)


def _register_smoothness() -> None:
    try:
        from gnnq.quant import smoothness as sm
    except ImportError:  # pragma: no cover - the method is optional in this build
        return

    @register_grid(sm.QLRQuantizer)
    def qlr_grid(q, x: Optional[Tensor]) -> Grid:
        """Smoothness-aware QLR: the affine grid of the observed range times alpha,
        ``clamp(round(x / s + z), 0, 2^b - 1)``."""
        if q.truncation != "none":
            raise GnnqError(f"The smoothness-aware quantizer's {q.truncation.upper()} grid "
                            f"truncates 8-bit codes to 4 levels (not an affine grid); packed "
                            f"models take the plain INT2/INT4/INT8 grids.")
        if not bool(q.observed):
            raise GnnqError("A smoothness-aware quantizer never observed a range; export "
                            "needs a trained model.")
        g = sm.make_grid(q.low.to(torch.float32), q.high.to(torch.float32),
                         q.alpha.detach().clamp(min=sm.ALPHA_MIN), q.grid_qmax)
        return affine_grid("tensor", g.scale.reshape(1), g.zero.reshape(1).to(torch.int32),
                           q.bits, rounding="half_even_zero")


_register_a2q()
_register_degree_quant()
_register_smoothness()


# -- packing a model ---------------------------------------------------------------------
@dataclass
class Capture:
    """Input and output of every quantizer on the export forward pass."""

    seen: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.seen[id(module)] = (inputs[0].detach(), output.detach())


def _check_activation(grid: Grid, quantizer: nn.Module, capture: Capture, where: str,
                      report: dict[str, Any]) -> None:
    if id(quantizer) not in capture.seen:
        return
    x, out = capture.seen[id(quantizer)]
    if x.layout != torch.strided:  # sparse features (SMP on Coauthor): the packed model takes
        x, out = x.to_dense(), out.to_dense()  # them dense, so their zeros must survive too
    mine = grid.dequantize(grid.quantize(x))
    mismatched = int((mine != out).sum())
    report[where] = mismatched
    if mismatched:
        log.warning("%s: the exported grid differs from the quantizer on %d of %d values",
                    where, mismatched, x.numel())


def pack_model(model: nn.Module, edge_index: Tensor, num_nodes: int,
               capture: Optional[Capture] = None,
               drop_roles: tuple[str, ...] = ()) -> tuple[PackedModel, dict[str, int]]:
    """Pack ``model`` with the packer registered for its class."""
    for cls in type(model).__mro__:
        if cls in PACKERS:
            return PACKERS[cls](model, edge_index, num_nodes, capture, drop_roles)
    names = ", ".join(sorted(c.__name__ for c in PACKERS))
    raise GnnqError(f"gnnq export packs {names} models; this checkpoint holds a "
                    f"{type(model).__name__}, which has no packer yet.")


def _activation_grids(roles: dict[str, nn.Module], prefix: str, capture: Capture,
                      mismatches: dict[str, int]) -> dict[str, Grid]:
    """The grids of the activation quantizers ``roles`` (role -> quantizer, named
    ``<prefix>.<role>``), each checked against what its quantizer produced on the export pass;
    messages (one row per edge) and packed inputs constrain their axis."""
    grids: dict[str, Grid] = {}
    for role, quantizer in roles.items():
        name = f"{prefix}.{role}"
        seen = capture.seen.get(id(quantizer))
        grid = grid_of(quantizer, name, None if seen is None else seen[0])
        if grid.axis != "row" and grid.uniform_bits is None:
            raise GnnqError(f"{name}: a per-{grid.axis} grid must use one bitwidth (codes are "
                            f"packed along the features).")
        if role == "message" and grid.axis == "row":
            raise GnnqError(f"{name}: a per-row grid of the messages would be one per edge; "
                            f"expected one per tensor or per channel.")
        if role == "input" and grid.axis == "column":
            raise GnnqError(f"{name}: a per-channel input grid cannot be factored out of the "
                            f"dense transform; expected per node or tensor.")
        _check_activation(grid, quantizer, capture, name, mismatches)
        grids[role] = grid
    return grids


def _pack_linear(lin: nn.Module, prefix: str, capture: Capture, mismatches: dict[str, int],
                 drop_roles: tuple[str, ...]) -> tuple[Tensor, Grid, dict[str, Grid]]:
    """A QLinear's packed weight codes, their grid (checked bit for bit against the weight
    quantizer) and its input / feature grids."""
    roles = {r: q for r, q in lin.q.by_role.items() if r not in drop_roles}
    where = f"{prefix}.q.weight"
    if "weight" not in roles:
        raise GnnqError(f"{prefix}'s weights are not quantized (an FP32 model): there is "
                        f"nothing to pack. Export a model trained with +quant=...")
    wq = roles.pop("weight")
    weight = lin.weight.detach()
    wgrid = grid_of(wq, where, weight)
    if wgrid.axis == "column":
        raise GnnqError(f"{where}: per-input-channel weight scales cannot be factored out "
                        f"of the dot product; expected one scale per output channel.")
    if wgrid.uniform_bits is None:
        raise GnnqError(f"{where}: the weights mix bitwidths; expected one per layer.")
    codes = wgrid.quantize(weight)
    with torch.no_grad():
        expected = wq(weight)
    if not torch.equal(wgrid.dequantize(codes), expected):
        bad = int((wgrid.dequantize(codes) != expected).sum())
        raise GnnqError(f"{where}: the integer grid from {type(wq).__name__} reproduces "
                        f"{weight.numel() - bad} of {weight.numel()} fake-quantized weights; "
                        f"its export adapter does not match the quantizer.")
    grids = _activation_grids(roles, f"{prefix}.q", capture, mismatches)
    return pack(codes, wgrid.uniform_bits), wgrid, grids


def pack_gcn(model: nn.Module, edge_index: Tensor, num_nodes: int,
             capture: Optional[Capture] = None,
             drop_roles: tuple[str, ...] = ()) -> tuple[PackedModel, dict[str, int]]:
    """Pack a node-level :class:`gnnq.models.GCN` (after one forward pass on the graph)."""
    capture = capture or Capture()
    mismatches: dict[str, int] = {}
    layers = []
    num_layers = len(model.convs)
    for k, conv in enumerate(model.convs):
        if conv.lin.bias is not None:
            raise GnnqError(f"Layer {k}'s linear map has its own bias; expected the GCN layout "
                            f"(bias after the aggregation).")
        words, wgrid, grids = _pack_linear(conv.lin, f"convs.{k}.lin", capture, mismatches,
                                           drop_roles)
        conv_roles = {r: q for r, q in conv.q.by_role.items() if r not in drop_roles}
        grids.update(_activation_grids(conv_roles, f"convs.{k}.q", capture, mismatches))
        bias = None if conv.bias is None else conv.bias.detach().clone()
        layers.append(PackedGCNLayer(conv.in_channels, conv.out_channels, words, wgrid,
                                     bias=bias, relu=k < num_layers - 1, **grids))
    graph = PackedGraph.gcn(edge_index, num_nodes)
    return PackedModel(graph, layers), mismatches


def pack_smp(model: nn.Module, edge_index: Tensor, num_nodes: int,
             capture: Optional[Capture] = None,
             drop_roles: tuple[str, ...] = ()) -> tuple[PackedModel, dict[str, int]]:
    """Pack the SMP model (:class:`gnnq.models.SMP`): its two quantized linears and the
    grids of every propagation step's products."""
    if model.prop.propagation == "emp":
        raise GnnqError("This SMP model was trained with model.propagation=emp, the official "
                        "code's baseline with its edge weights 1/deg_j; gnnq export packs "
                        "propagation smp and appnp only (the kernels use the symmetric "
                        "normalisation). Export a model trained with either of those.")
    capture = capture or Capture()
    mismatches: dict[str, int] = {}
    layers = []
    for name, relu in (("lin1", True), ("lin2", False)):
        lin = getattr(model, name)
        words, wgrid, grids = _pack_linear(lin, name, capture, mismatches, drop_roles)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        layers.append(PackedLinear(lin.in_channels, lin.out_channels, words, wgrid, bias=bias,
                                   relu=relu, **grids))
    prop = model.prop
    steps = {}
    for part in ("base", "gap"):
        steps[part] = [_activation_grids({r: q for r, q in quantizers.by_role.items()
                                          if r not in drop_roles},
                                         f"prop.{part}.{k}", capture, mismatches)
                       for k, quantizers in enumerate(getattr(prop, part))]
    packed_prop = PackedSMPProp(
        steps=prop.steps, alpha=prop.alpha, propagation=prop.propagation,
        correction=prop.correction, threshold=prop.threshold,
        multiplier_lr=prop.multiplier_lr, slack_lr=prop.slack_lr,
        multiplier_init=prop.multiplier_init, slack_init=prop.slack_init,
        multiplier_bound=prop.multiplier_bound,
        base=steps["base"], gap=steps["gap"])
    graph = PackedGraph.gcn(edge_index, num_nodes)
    return PackedModel(graph, layers, architecture="smp", propagation=packed_prop), mismatches


def _register_packers() -> None:
    from gnnq.models import GCN, SMP

    register_packer(GCN)(pack_gcn)
    register_packer(SMP)(pack_smp)


_register_packers()


# -- where the checkpoint comes from ---------------------------------------------------------
def resolve_checkpoint(source: str, run: Optional[int], tracking_uri: Optional[str],
                       workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file for ``source`` and where it came from."""
    path = Path(source).expanduser()
    if path.is_file():
        return path, {"checkpoint": str(path.resolve())}
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        return _pick_run(folder, run, source), {"checkpoint": str(folder.resolve())}
    if RUN_ID.match(source):
        uri = tracking_uri or "sqlite:///mlflow.db"
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        client = open_client(uri, 10.0, must_exist=True)
        try:
            client.get_run(source)
            local = client.download_artifacts(source, "checkpoints", str(workdir))
        except Exception as err:  # noqa: BLE001 - MLflow raises several types
            raise GnnqError(f"MLflow run {source} in {uri} has no 'checkpoints' artifact to "
                            f"export ({type(err).__name__}: {str(err).splitlines()[0]}). Runs "
                            f"log it with tracking.log_checkpoint=true (the default).") from None
        return _pick_run(Path(local), run, source), {"mlflow_run_id": source, "tracking_uri": uri}
    raise GnnqError(f"{source!r} is not a checkpoint file, a run's output folder (with "
                    f"checkpoints/run<r>.pt) or an MLflow run id (32 hex digits).")


def _pick_run(folder: Path, run: Optional[int], source: str) -> Path:
    found = finished_checkpoints(folder)
    if not found:
        raise GnnqError(f"{source}: no checkpoints (run<r>.pt) in {folder}.")
    if run is None:
        return found[0]
    wanted = folder / f"run{run}.pt"
    if not wanted.is_file():
        raise GnnqError(f"{source}: there is no checkpoint for run {run}; found "
                        f"{', '.join(p.stem for p in found)}.")
    return wanted


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of several types
        raise GnnqError(f"{path}: not a readable gnnq checkpoint (a damaged file, or not one "
                        f"gnnq train wrote; {load_failure(err)}).") from None
    missing = [k for k in ("state_dict", "config", "task") if k not in checkpoint] \
        if isinstance(checkpoint, dict) else ["state_dict", "config", "task"]
    if missing:
        raise GnnqError(f"{path}: not a gnnq checkpoint (missing {', '.join(missing)}); "
                        f"expected a file written by 'gnnq train' (checkpoints/run<r>.pt).")
    return checkpoint


# -- the whole export --------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    model: PackedModel
    report: dict[str, Any]


def model_from_checkpoint(checkpoint: dict[str, Any], path: Path,
                          data_root: Optional[str] = None):
    """``(model, task, config)``: the model a gnnq checkpoint describes, rebuilt from its own
    config on its dataset (``data_root``, else the checkpoint's folder if it exists here, else
    ``$GNNQ_DATA`` / ``./data``), with the checkpoint's weights, in eval mode."""
    from omegaconf import OmegaConf

    from gnnq.config import TrainConfig
    from gnnq.data import load_task
    from gnnq.models import build_model
    from gnnq.quant import build_quantizers

    try:
        config: TrainConfig = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TrainConfig), checkpoint["config"]))
    except Exception as err:  # noqa: BLE001 - OmegaConf validation errors
        raise GnnqError(f"{path}: its config does not match this gnnq's schema ({err}).") from None
    if data_root is not None:
        config.data.root = data_root
    elif not Path(config.data.root).expanduser().is_dir():
        config.data.root = "data"  # the training machine's folder: use $GNNQ_DATA / ./data
    task = load_task(config.data, config.dataset)
    quantizers = build_quantizers(config.quant)
    model = build_model(config.model, task, quantizers)
    state = checkpoint["state_dict"]
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

        raise GnnqError(
            f"{path}: its weights do not fit the model its config describes with this gnnq "
            f"({__version__}): "
            + "; ".join(part for part in (f"missing {names(missing)}" if missing else "",
                                          f"unexpected {names(unexpected)}" if unexpected else "")
                        if part)
            + ". The checkpoint was probably written by another version; retrain it (or export "
              "it with the gnnq that trained it).")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise GnnqError(f"{path}: its weights do not fit the model its config describes "
                        f"({' '.join(str(err).split())[:500]}).") from None
    model.eval()
    return model, task, config


def export(source: str, out: Optional[Path] = None, run: Optional[int] = None,
           data_root: Optional[str] = None, tracking_uri: Optional[str] = None,
           backend: str = "auto", verify: bool = True,
           drop_roles: tuple[str, ...] = ()) -> ExportResult:
    with tempfile.TemporaryDirectory(prefix="gnnq-export-") as tmp:
        path, provenance = resolve_checkpoint(source, run, tracking_uri, Path(tmp))
        checkpoint = load_checkpoint(path)
    model, task, config = model_from_checkpoint(checkpoint, path, data_root)
    if task.level != "node":
        raise GnnqError(f"gnnq export packs node-level models; {task.name!r} is graph-level.")
    graph = task.graph
    capture = Capture()
    handles = [m.register_forward_hook(capture.hook) for m in model.modules()
               if isinstance(m, Quantizer)]
    with torch.no_grad():
        fake = model(graph.x, graph.edge_index)
    for h in handles:
        h.remove()
    packed, mismatches = pack_model(model, graph.edge_index, graph.num_nodes, capture,
                                    tuple(drop_roles))
    meta = checkpoint.get("result", {}) or {}
    report: dict[str, Any] = {"grid_mismatches": mismatches,
                              "dropped_roles": sorted(drop_roles)}
    if verify:
        report.update(verify_export(packed, fake, graph.x, graph.y, task, meta, backend))
    packed.header = {
        "source": {**provenance, "run": meta.get("run"), "seed": meta.get("seed"),
                   "dataset": config.dataset.name, "model": config.model.name,
                   "method": (config.quant or {}).get("name", "fp32"),
                   "avg_bits": meta.get("avg_bits"), "test_acc": meta.get("test")},
        "verification": report,
    }
    if out is None:
        name = f"{config.dataset.name}_{config.model.name}_" \
               f"{(config.quant or {}).get('name', 'fp32')}_run{meta.get('run', 0)}"
        out = Path("exports") / f"{name}.safetensors"
    from gnnq.kernels.format import save

    save(packed, out)
    report["bytes"] = packed.packed_bytes()
    report["file_bytes"] = Path(out).stat().st_size
    return ExportResult(Path(out), packed, report)


def verify_export(packed: PackedModel, fake: Tensor, x: Tensor, y: Tensor, task,
                  meta: dict[str, Any], backend: str) -> dict[str, Any]:
    """Agreement of the packed model with the fake-quantized logits, per implementation."""
    from gnnq.kernels.backend import get_backend

    report: dict[str, Any] = {"nodes": int(fake.size(0))}
    split = None
    if meta.get("run") is not None and meta.get("seed") is not None:
        try:
            split = task.split(int(meta["run"]), int(meta["seed"]))
        except Exception:  # noqa: BLE001 - a split is a nicety here
            split = None
    fake_pred = fake.argmax(1)
    if split is not None:
        report["fake_quant_test_acc"] = 100.0 * float((fake_pred[split.test] == y[split.test])
                                                      .float().mean())
    names = ["reference"] + ([backend] if backend != "reference" else [])
    for name in names:
        impl = get_backend(name)
        logits = packed.forward(x, impl)
        pred = logits.argmax(1)
        entry = {"agreement": float((pred == fake_pred).float().mean()),
                 "max_abs_logit_diff": float((logits - fake).abs().max()),
                 "implementation": impl.name}
        if split is not None:
            entry["test_acc"] = 100.0 * float((pred[split.test] == y[split.test]).float().mean())
        report[impl.name] = entry
    return report


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gnnq export",
        description="Pack a trained quantized model (A²Q, or any method whose quantizers give "
                    "an integer grid) into a .safetensors integer model, and check that it "
                    "predicts what the fake-quantized model predicts.")
    parser.add_argument("source", help="checkpoint file (checkpoints/run<r>.pt), a run's output "
                                       "folder, or an MLflow run id; a packed .safetensors "
                                       "file is checked and described instead")
    parser.add_argument("--run", type=int, default=None,
                        help="which repeat's checkpoint (default: the first)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default: exports/<dataset>_<model>_<method>_run<r>"
                             ".safetensors)")
    parser.add_argument("--data-root", default=None,
                        help="dataset folder (default: the checkpoint's, else $GNNQ_DATA or "
                             "./data)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the run id (default: sqlite:///mlflow.db)")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "reference"),
                        help="kernels to verify with besides the integer reference")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running the packed model after export")
    parser.add_argument("--drop-role", action="append", default=[], choices=("message",),
                        help="leave this role's quantizers out (an approximation that runs "
                             "on the packed SpMM kernels instead of edge by edge); the "
                             "verification reports the agreement it costs")
    return parser


def describe(path: Path) -> str:
    """A summary of a packed file (loading it checks it)."""
    from gnnq.kernels import format as fmt

    model = fmt.load(path)
    src = model.header.get("source", {})
    widths = " -> ".join([str(model.in_features)] + [str(l.out_features) for l in model.layers])
    lines = [f"gnnq: {path}: {fmt.FORMAT_NAME} version {fmt.FORMAT_VERSION}, "
             f"{model.architecture} {widths}, {model.graph.num_nodes:,} nodes, "
             f"{model.graph.num_edges:,} edges (self-loops included); method "
             f"{src.get('method', '?')} on {src.get('dataset', '?')} (run {src.get('run', '?')})"]
    def roles(grids: dict[str, Optional[Grid]]) -> str:
        return ", ".join(f"{role} {'/'.join(str(int(b)) for b in torch.unique(grid.bits))}-bit "
                         f"per {grid.axis}" for role, grid in grids.items() if grid is not None)

    for k, layer in enumerate(model.layers):
        lines.append(f"gnnq:   layer {k}: {roles(layer.grids())}")
    prop = model.propagation
    if prop is not None:
        lines.append(f"gnnq:   {prop.propagation} propagation, {prop.steps} steps (alpha "
                     f"{prop.alpha:g}); step 0: {roles(prop.base[0]) or 'FP32'}")
    verification = model.header.get("verification", {})
    for key in ("reference", "cpu", "cuda"):
        if key in verification:
            lines.append(f"gnnq:   at export, {key}: agreement "
                         f"{100 * verification[key]['agreement']:.2f}%, max |logit difference| "
                         f"{verification[key]['max_abs_logit_diff']:.3g}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.source.endswith(".safetensors"):
        print(describe(Path(args.source)))
        return 0
    result = export(args.source, args.out, args.run, args.data_root, args.tracking_uri,
                    args.backend, verify=not args.no_verify, drop_roles=tuple(args.drop_role))
    if args.drop_role:
        print(f"gnnq: note: the {', '.join(args.drop_role)} quantizers were left out; the "
              f"packed model approximates the trained one (agreement below).")
    report = result.report
    size = report["file_bytes"]
    print(f"gnnq: wrote {result.path} ({size / 1024:.1f} KiB; graph "
          f"{report['bytes']['graph'] / 1024:.1f} KiB, weights {report['bytes']['weights']} B)")
    for key in ("reference", "cpu", "cuda"):
        if key in report:
            entry = report[key]
            acc = f", test acc {entry['test_acc']:.2f}" if "test_acc" in entry else ""
            print(f"gnnq: {key}: same prediction as the fake-quantized model on "
                  f"{100 * entry['agreement']:.2f}% of {report['nodes']} nodes, max |logit "
                  f"difference| {entry['max_abs_logit_diff']:.3g}{acc}")
    if "fake_quant_test_acc" in report:
        print(f"gnnq: fake-quantized model test acc {report['fake_quant_test_acc']:.2f}")
    return 0
