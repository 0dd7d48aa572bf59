"""The packed model file: safetensors with a JSON header.

**Layout** (format ``gnnq-packed``, version :data:`FORMAT_VERSION`). One ``.safetensors``
file; its metadata holds

- ``gnnq.format``: ``"gnnq-packed"``; ``gnnq.version``: the format version (``"1"``);
- ``gnnq.header``: the JSON header (below); ``gnnq.sha256``: a digest of every tensor's name,
  dtype, shape and bytes, so a damaged file is refused instead of giving wrong logits.

Tensors (all little-endian, C order):

================================  =======  =====================================================
name                              dtype    meaning
================================  =======  =====================================================
``graph.rowptr``                  int64    CSR row pointers ``[N + 1]`` (rows: destinations)
``graph.col``                     int32    in-edge sources ``[nnz]``, self-loops included
``graph.deg_inv_sqrt``            float32  ``D^{-1/2}`` per node ``[N]``
``layers.K.weight.words``         int32    weight codes ``[out, ceil(in / (32 // b))]``, packed
                                           along ``in`` (gnnq.kernels.packing)
``layers.K.ROLE.bits``            uint8    storage bits per group (1..8)
``layers.K.ROLE.scale``           float32  scale per group (> 0)
``layers.K.ROLE.zero_point``      int32    zero point per group
``layers.K.ROLE.umin`` / ``umax`` int32    stored code range per group
``layers.K.bias``                 float32  ``[out]`` (if the layer has a bias)
``propagation.P.K.ROLE.*``        (grid)   SMP only: the grid of step ``K``'s product ``P``
                                           (``base`` or ``gap``), roles ``message``,
                                           ``aggregate``, ``update``
================================  =======  =====================================================

``ROLE`` is ``weight`` and any of ``input``, ``feature``, ``message`` (per tensor or channel,
applied to every edge's product), ``aggregate``, ``update`` the model quantizes
(:mod:`gnnq.kernels.model`). The JSON header::

    {"format": "gnnq-packed", "version": 1, "gnnq_version": "...",
     "model": {"architecture": "gcn"|"smp", "level": "node", "num_nodes": N,
               "in_features": F, "out_features": C,
               "layers": [{"in_features": .., "out_features": .., "relu": true|false,
                           "bias": true|false,
                           "weight"|"input"|"feature"|"message"|"aggregate"|"update":
                               null | {"axis": "row"|"column"|"tensor",
                                       "rounding": "half_away"|"half_even",
                                       "groups": G, "bits": [distinct bitwidths]}}],
               "propagation": {"steps": K, "alpha": .., "propagation": "smp"|"appnp",
                               "correction": .., "threshold": .., "multiplier_lr": ..,
                               "slack_lr": .., "multiplier_init": .., "slack_init": ..,
                               "multiplier_bound": null | ..,
                               "base": [{ROLE: grid header}] * K, "gap": [...]}  (smp only)},
     "graph": {"num_nodes": N, "num_edges": nnz, "self_loops": true,
               "normalization": "symmetric (D^-1/2 folded into per-node factors)"},
     "source": {...provenance: run id, checkpoint, method, dataset...},
     "verification": {...agreement with the fake-quantized model at export...}}

:func:`load` checks the format name, the version, the header, the digest, every tensor's
presence, dtype and shape, and the value ranges; any failure is a :class:`GnnqError` naming
the file, what is wrong and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from gnnq import __version__
from gnnq.errors import GnnqError
from gnnq.kernels.grid import AXES, ROUNDING, Grid
from gnnq.kernels.model import (PROP_ROLES, PackedGCNLayer, PackedGraph, PackedLinear,
                                PackedModel, PackedSMPProp)
from gnnq.kernels.packing import words_per_row

FORMAT_NAME = "gnnq-packed"
FORMAT_VERSION = 1
ARCHITECTURES = ("gcn", "smp")
GRID_TENSORS = {"bits": torch.uint8, "scale": torch.float32, "zero_point": torch.int32,
                "umin": torch.int32, "umax": torch.int32}


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _grid_header(grid: Optional[Grid]) -> Optional[dict[str, Any]]:
    if grid is None:
        return None
    return {"axis": grid.axis, "rounding": grid.rounding, "groups": grid.groups,
            "bits": sorted(int(b) for b in torch.unique(grid.bits))}


def to_tensors_and_header(model: PackedModel) -> tuple[dict[str, Tensor], dict[str, Any]]:
    g = model.graph
    tensors: dict[str, Tensor] = {"graph.rowptr": g.rowptr.to(torch.int64),
                                  "graph.col": g.col.to(torch.int32),
                                  "graph.deg_inv_sqrt": g.deg_inv_sqrt.to(torch.float32)}
    layers = []
    for k, layer in enumerate(model.layers):
        tensors[f"layers.{k}.weight.words"] = layer.weight_words.to(torch.int32)
        entry: dict[str, Any] = {"in_features": layer.in_features,
                                 "out_features": layer.out_features, "relu": layer.relu,
                                 "bias": layer.bias is not None}
        for role, grid in layer.grids().items():
            entry[role] = _grid_header(grid)
            if grid is not None:
                for name, t in grid.tensors().items():
                    tensors[f"layers.{k}.{role}.{name}"] = t.contiguous()
        if layer.bias is not None:
            tensors[f"layers.{k}.bias"] = layer.bias.to(torch.float32).contiguous()
        layers.append(entry)
    described: dict[str, Any] = {
        "architecture": model.architecture, "level": "node", "num_nodes": g.num_nodes,
        "in_features": model.in_features, "out_features": model.out_features, "layers": layers}
    prop = model.propagation
    if prop is not None:
        steps: dict[str, list] = {"base": [], "gap": []}
        for kind in steps:
            for k, grids in enumerate(getattr(prop, kind)):
                steps[kind].append({role: _grid_header(grid) for role, grid in grids.items()})
                for role, grid in grids.items():
                    for name, t in grid.tensors().items():
                        tensors[f"propagation.{kind}.{k}.{role}.{name}"] = t.contiguous()
        described["propagation"] = {**prop.constants(), **steps}
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "gnnq_version": __version__,
        "model": described,
        "graph": {"num_nodes": g.num_nodes, "num_edges": g.num_edges, "self_loops": True,
                  "normalization": "symmetric (D^-1/2 folded into per-node factors)"},
        **{k: v for k, v in model.header.items() if k not in ("format", "version", "model",
                                                               "graph", "gnnq_version")},
    }
    return tensors, header


def save(model: PackedModel, path: Path | str) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, header = to_tensors_and_header(model)
    metadata = {"gnnq.format": FORMAT_NAME, "gnnq.version": str(FORMAT_VERSION),
                "gnnq.header": json.dumps(header, sort_keys=True),
                "gnnq.sha256": _digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


class _Reader:
    """Checks with messages that name the file, the problem and what is expected."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, problem: str, expected: str) -> GnnqError:
        return GnnqError(f"{self.path}: {problem}. Expected {expected}. "
                         f"Re-export the model with 'gnnq export'.")


def load(path: Path | str, verify_digest: bool = True) -> PackedModel:
    """Read and validate a packed model written by :func:`save`."""
    path = Path(path)
    r = _Reader(path)
    if not path.is_file():
        raise GnnqError(f"{path}: no such file. Expected a packed model written by "
                        f"'gnnq export' (a .safetensors file).")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
        raise r.fail(f"not a readable safetensors file ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else 'no detail'})",
                     f"a safetensors file of format {FORMAT_NAME!r}") from None
    fmt = metadata.get("gnnq.format")
    if fmt != FORMAT_NAME:
        raise r.fail(f"its metadata names format {fmt!r}" if fmt else
                     "it has no 'gnnq.format' metadata (not a gnnq packed model)",
                     f"format {FORMAT_NAME!r}")
    version = metadata.get("gnnq.version")
    if version != str(FORMAT_VERSION):
        raise r.fail(f"it is format version {version!r}, this gnnq ({__version__}) reads "
                     f"version {FORMAT_VERSION}", f"'gnnq.version' = '{FORMAT_VERSION}'")
    try:
        header = json.loads(metadata.get("gnnq.header", ""))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise r.fail(f"its JSON header is damaged ({err})",
                     "a JSON object under the 'gnnq.header' metadata key") from None
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise r.fail(f"its JSON header says format {header.get('format')!r} version "
                     f"{header.get('version')!r}", f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
    if verify_digest:
        digest = metadata.get("gnnq.sha256")
        if digest != _digest(tensors):
            raise r.fail("its tensors do not match the digest stored in the file (the file is "
                         "damaged or was edited)", "the sha256 in 'gnnq.sha256'")
    return _build(r, header, tensors)


def _tensor(r: _Reader, tensors: dict[str, Tensor], name: str, dtype: torch.dtype,
            shape: Optional[tuple] = None) -> Tensor:
    if name not in tensors:
        raise r.fail(f"tensor {name!r} is missing", f"a {str(dtype)[6:]} tensor {name!r}")
    t = tensors[name]
    if t.dtype != dtype:
        raise r.fail(f"tensor {name!r} has dtype {str(t.dtype)[6:]}",
                     f"dtype {str(dtype)[6:]}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise r.fail(f"tensor {name!r} has shape {tuple(t.shape)}", f"shape {tuple(shape)}")
    return t


def _key(r: _Reader, obj: dict, key: str, kind, where: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise r.fail(f"the header's {where}.{key} is {value!r}",
                     f"a {getattr(kind, '__name__', kind)} at {where}.{key}")
    return value


def _grid(r: _Reader, tensors: dict[str, Tensor], prefix: str, meta: dict,
          groups_allowed: tuple[int, ...]) -> Grid:
    axis = meta.get("axis")
    rounding = meta.get("rounding")
    if axis not in AXES or rounding not in ROUNDING:
        raise r.fail(f"the grid {prefix} has axis {axis!r} and rounding {rounding!r}",
                     f"axis in {AXES} and rounding in {ROUNDING}")
    parts = {}
    for name, dtype in GRID_TENSORS.items():
        parts[name] = _tensor(r, tensors, f"{prefix}.{name}", dtype)
    sizes = {t.numel() for t in parts.values()}
    if len(sizes) != 1 or sizes.pop() not in groups_allowed or any(t.dim() != 1 for t in parts.values()):
        raise r.fail(f"the grid {prefix} has tensors of shapes "
                     f"{[tuple(t.shape) for t in parts.values()]}",
                     f"five 1-D tensors of one length in {sorted(set(groups_allowed))}")
    grid = Grid.from_tensors(axis, rounding, parts)
    bits = grid.bits
    if bool(((bits < 1) | (bits > 8)).any()):
        raise r.fail(f"the grid {prefix} has bitwidths {torch.unique(bits).tolist()}",
                     "bitwidths in 1..8")
    if not bool(torch.isfinite(grid.scale).all()) or bool((grid.scale <= 0).any()):
        raise r.fail(f"the grid {prefix} has a scale that is not finite and positive",
                     "scales > 0")
    if bool(((grid.umin < 0) | (grid.umin > grid.umax) | (grid.umax >= 2 ** bits)).any()):
        raise r.fail(f"the grid {prefix} has a code range outside its bits",
                     "0 <= umin <= umax < 2^bits")
    if bool(((grid.zero_point < grid.umin - 2 ** 16) | (grid.zero_point > 2 ** 16)).any()):
        raise r.fail(f"the grid {prefix} has an implausible zero point", "|zero_point| < 2^16")
    if axis != "row" and grid.uniform_bits is None:
        raise r.fail(f"the {axis} grid {prefix} mixes bitwidths",
                     "one bitwidth for column and tensor grids (codes are packed along columns)")
    return grid


def _build(r: _Reader, header: dict, tensors: dict[str, Tensor]) -> PackedModel:
    model = header.get("model")
    architecture = model.get("architecture") if isinstance(model, dict) else None
    if architecture not in ARCHITECTURES:
        raise r.fail(f"the header's model.architecture is {architecture!r}",
                     f"one of {', '.join(ARCHITECTURES)} (the architectures this version packs)")
    n = _key(r, model, "num_nodes", int, "model")
    layer_meta = model.get("layers")
    if not isinstance(layer_meta, list) or not layer_meta:
        raise r.fail("the header's model.layers is empty or missing", "a list of layers")
    rowptr = _tensor(r, tensors, "graph.rowptr", torch.int64, (n + 1,))
    col = _tensor(r, tensors, "graph.col", torch.int32)
    dinv = _tensor(r, tensors, "graph.deg_inv_sqrt", torch.float32, (n,))
    if col.dim() != 1 or int(rowptr[0]) != 0 or int(rowptr[-1]) != col.numel() \
            or bool((rowptr[1:] < rowptr[:-1]).any()):
        raise r.fail("graph.rowptr is not a valid CSR row pointer for graph.col",
                     "rowptr[0] = 0, non-decreasing, rowptr[-1] = len(col)")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n):
        raise r.fail("graph.col has node ids outside 0..N-1", f"ids in 0..{n - 1}")
    graph = PackedGraph(rowptr, col, dinv)
    layers = []
    width = _key(r, model, "in_features", int, "model")
    for k, meta in enumerate(layer_meta):
        where = f"model.layers[{k}]"
        fin = _key(r, meta, "in_features", int, where)
        fout = _key(r, meta, "out_features", int, where)
        if fin != width:
            raise r.fail(f"layer {k} takes {fin} features but receives {width}",
                         "each layer's in_features to equal the previous out_features")
        width = fout
        wmeta = meta.get("weight")
        if not isinstance(wmeta, dict):
            raise r.fail(f"{where}.weight is missing", "the weight grid of every layer")
        wgrid = _grid(r, tensors, f"layers.{k}.weight", wmeta, (1, fout))
        if wgrid.axis == "column":
            raise r.fail(f"layer {k}'s weight grid is per input channel",
                         "one weight scale per output channel (row) or per tensor")
        if wgrid.uniform_bits is None:
            raise r.fail(f"layer {k}'s weights mix bitwidths", "one weight bitwidth per layer")
        words = _tensor(r, tensors, f"layers.{k}.weight.words", torch.int32,
                        (fout, words_per_row(fin, wgrid.uniform_bits)))
        grids = {}
        for role, groups in (("input", (1, n)), ("feature", (1, fout, n)),
                             ("message", (1, fout)), ("aggregate", (1, fout, n)),
                             ("update", (1, fout, n))):
            if meta.get(role) is not None:
                grids[role] = _grid(r, tensors, f"layers.{k}.{role}", meta[role], groups)
        if "input" in grids and grids["input"].axis == "column":
            raise r.fail(f"layer {k}'s input grid is per column", "a row or tensor input grid")
        bias = _tensor(r, tensors, f"layers.{k}.bias", torch.float32, (fout,)) \
            if meta.get("bias") else None
        if architecture == "gcn":
            layers.append(PackedGCNLayer(fin, fout, words, wgrid, bias=bias,
                                         relu=bool(meta.get("relu")), **grids))
        else:
            if set(grids) - {"input", "feature"}:
                raise r.fail(f"linear layer {k} has {sorted(grids)} grids",
                             "input and feature grids only (an MLP layer aggregates nothing)")
            layers.append(PackedLinear(fin, fout, words, wgrid, bias=bias,
                                       relu=bool(meta.get("relu")), **grids))
    if width != model.get("out_features"):
        raise r.fail(f"the last layer gives {width} features but model.out_features is "
                     f"{model.get('out_features')!r}", "them to agree")
    propagation = _propagation(r, model, tensors, width) if architecture == "smp" else None
    extra = {k: v for k, v in header.items() if k not in ("model", "graph")}
    return PackedModel(graph, layers, header=extra, architecture=architecture,
                       propagation=propagation)


def _propagation(r: _Reader, model: dict, tensors: dict[str, Tensor],
                 width: int) -> PackedSMPProp:
    meta = model.get("propagation")
    if not isinstance(meta, dict):
        raise r.fail("the header's model.propagation is missing", "the SMP propagation")
    steps = _key(r, meta, "steps", int, "model.propagation")
    constants = {k: _key(r, meta, k, (int, float), "model.propagation")
                 for k in ("alpha", "threshold", "multiplier_lr", "slack_lr",
                           "multiplier_init", "slack_init")}
    # Absent in files written before the bound existed: unbounded.
    bound = meta.get("multiplier_bound")
    if bound is not None and (not isinstance(bound, (int, float)) or bound < 0):
        raise r.fail(f"model.propagation.multiplier_bound is {bound!r}",
                     "null or a number >= 0")
    constants["multiplier_bound"] = bound
    kind = meta.get("propagation")
    correction = meta.get("correction")
    if kind not in ("smp", "appnp") or correction not in ("laplacian", "adjacency"):
        raise r.fail(f"model.propagation has propagation {kind!r} and correction "
                     f"{correction!r}", "propagation smp|appnp and correction laplacian|adjacency")
    grids: dict[str, list[dict[str, Grid]]] = {}
    for part in ("base", "gap"):
        entries = meta.get(part)
        want = steps if part == "base" or kind == "smp" else 0
        if not isinstance(entries, list) or len(entries) != want:
            raise r.fail(f"model.propagation.{part} has "
                         f"{len(entries) if isinstance(entries, list) else entries!r} steps",
                         f"{want} (one per step)")
        grids[part] = []
        for k, roles in enumerate(entries):
            if not isinstance(roles, dict) or set(roles) - set(PROP_ROLES):
                raise r.fail(f"model.propagation.{part}[{k}] is {roles!r}",
                             f"grids of the roles {', '.join(PROP_ROLES)}")
            grids[part].append({
                role: _grid(r, tensors, f"propagation.{part}.{k}.{role}", g,
                            (1, width) if role == "message" else (1, width, model["num_nodes"]))
                for role, g in roles.items() if g is not None})
    return PackedSMPProp(steps=steps, propagation=kind, correction=correction,
                         base=grids["base"], gap=grids["gap"],
                         **{k: float(v) for k, v in constants.items()})
