"""The datasets gnnq reads from disk: where their files live and how PyG/OGB read them.

Each :class:`Source` names its folder under the data root (the layout PyG/OGB use), the
files loading needs (checked before anything downloads), the download URL (probed first)
and a reader that turns the PyG/OGB dataset into plain :class:`Data` objects.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch_geometric.data import Batch, Data
from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
from torch_geometric.data.storage import GlobalStorage
from torch_geometric.datasets import ZINC, Amazon, Coauthor, Planetoid, TUDataset
from torch_geometric.transforms import NormalizeFeatures
from torch_geometric.utils import degree, is_undirected, to_undirected

from gnnq.data import synthetic
from gnnq.data.storage import (check_files, exclusive, read_or_explain, unlink_symlinks,
                               working_folder)
from gnnq.data.task import Split

# ogb starts a PyPI version check without a timeout when it is first imported; this stops it.
sys.modules.setdefault("outdated", None)

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
ZINC_ATOM_TYPES = 28
OGB_ARXIV_URL = "http://snap.stanford.edu/ogb/data/nodeproppred/arxiv.zip"  # ogb's master.csv


@dataclass
class Loaded:
    """A dataset as read, before the config picks a split: one graph (node level) or many
    (graph level), plus the dataset's own fixed split where it has one."""

    graph: Optional[Data] = None
    graphs: Optional[list[Data]] = None
    official: Optional[Split] = None


@dataclass(frozen=True)
class Source:
    folder: str  # under the data root
    files: tuple[str, ...]  # what loading needs, relative to the folder
    url: str  # where PyG/OGB download from
    read: Callable[[Path], Loaded]  # given the (writable) dataset folder
    processed: str = "processed"  # what PyG/OGB build from the raw files, relative to the folder


def _plain_graph(data: Data) -> Data:
    """Just features, edges and 1-D labels: split masks and extras stay out of training."""
    return Data(x=data.x, edge_index=data.edge_index, y=data.y.view(-1))


def _mask_split(data: Data) -> Split:
    return Split(*(mask.nonzero().view(-1) for mask in
                   (data.train_mask, data.val_mask, data.test_mask)))


def _planetoid(name: str) -> Source:
    def read(folder: Path) -> Loaded:
        data = Planetoid(str(folder.parent), name)[0]
        # A test.index cut inside a number leaves a small id that collides with train/val.
        if (data.test_mask & (data.train_mask | data.val_mask)).any():
            raise ValueError(f"raw/ind.{name.lower()}.test.index lists training or validation "
                             f"nodes as test nodes; it looks truncated or damaged")
        return Loaded(graph=_plain_graph(data), official=_mask_split(data))

    parts = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
    files = tuple(f"raw/ind.{name.lower()}.{part}" for part in parts)
    return Source(f"planetoid/{name}", files, Planetoid.url, read)


def _gnn_benchmark(dataset_cls: type, group: str, name: str, file: str) -> Source:
    """Coauthor and Amazon: one npz per graph, no official split."""
    def read(folder: Path) -> Loaded:
        return Loaded(graph=_plain_graph(dataset_cls(str(folder.parent), name)[0]))

    return Source(f"{group}/{name}", (f"raw/{file}",), dataset_cls.url, read)


def _add_degree_features(graphs: list[Data]) -> None:
    """Give featureless graphs one feature: the node degree standardised over all nodes of
    the dataset, as Degree-Quant and A2Q do for REDDIT-BINARY."""
    degrees = [degree(g.edge_index[0], g.num_nodes) for g in graphs]
    every = torch.cat(degrees)
    mean, std = every.mean(), every.std()
    for graph, deg in zip(graphs, degrees):
        graph.x = ((deg - mean) / std).unsqueeze(-1)


def _tu(name: str, parts: tuple[str, ...]) -> Source:
    def read(folder: Path) -> Loaded:
        graphs = list(TUDataset(str(folder.parent), name))
        # TU files list every edge both ways; a truncated A.txt still parses but loses reverses.
        # (One check over the batched graphs: per graph it takes seconds on REDDIT-BINARY.)
        batch = Batch.from_data_list(graphs)
        if not is_undirected(batch.edge_index, num_nodes=batch.num_nodes):
            raise ValueError(f"raw/{name}_A.txt lists edges without their reverse; it looks "
                             f"truncated")
        if graphs[0].x is None:
            _add_degree_features(graphs)
        return Loaded(graphs=graphs)

    files = tuple(f"raw/{name}_{part}.txt" for part in parts)
    return Source(f"tu/{name}", files, TUDataset.url, read)


def _read_zinc(folder: Path) -> Loaded:
    parts = [list(ZINC(str(folder), subset=True, split=s)) for s in ("train", "val", "test")]
    ends = torch.tensor([len(p) for p in parts]).cumsum(0).tolist()
    official = Split(*(torch.arange(end - len(p), end) for p, end in zip(parts, ends)))
    return Loaded(graphs=[g for part in parts for g in part], official=official)


def _pyg_storage_globals() -> list[type]:
    """PyG classes in OGB's processed file (OGB predates ``torch.load(weights_only=True)``)
    that PyG has not allowlisted itself. Only those go into ``safe_globals``: leaving that
    context un-lists everything it was given, even entries that were there before."""
    listed = torch.serialization.get_safe_globals()
    return [c for c in (Data, DataEdgeAttr, DataTensorAttr, GlobalStorage) if c not in listed]


def _read_arxiv(folder: Path) -> Loaded:
    from ogb.nodeproppred import PygNodePropPredDataset

    # Without its version marker OGB asks on stdin whether to download again. The files were
    # checked already (and a download replaces the whole folder), so mark the folder current.
    if folder.is_dir() and not (folder / "RELEASE_v1.txt").exists():
        (folder / "RELEASE_v1.txt").touch()
    with torch.serialization.safe_globals(_pyg_storage_globals()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # OGB's own
        dataset = PygNodePropPredDataset("ogbn-arxiv", root=str(folder.parent))
    data, idx = dataset[0], dataset.get_idx_split()
    # Citations are directed; GNN baselines on arxiv (and both papers) use the undirected graph.
    data.edge_index = to_undirected(data.edge_index, num_nodes=data.num_nodes)
    return Loaded(graph=_plain_graph(data),
                  official=Split(idx["train"], idx["valid"], idx["test"]))


_ARXIV_FILES = tuple(f"raw/{f}.csv.gz" for f in (
    "edge", "node-feat", "node-label", "node_year", "num-node-list", "num-edge-list")) + tuple(
    f"split/time/{s}.csv.gz" for s in ("train", "valid", "test"))

SOURCES: dict[str, Source] = {
    **{key: _planetoid(name) for key, name in PLANETOID.items()},
    "coauthor_cs": _gnn_benchmark(Coauthor, "coauthor", "CS", "ms_academic_cs.npz"),
    "coauthor_physics": _gnn_benchmark(Coauthor, "coauthor", "Physics", "ms_academic_phy.npz"),
    "amazon_computers": _gnn_benchmark(Amazon, "amazon", "Computers",
                                       "amazon_electronics_computers.npz"),
    "amazon_photo": _gnn_benchmark(Amazon, "amazon", "Photo", "amazon_electronics_photo.npz"),
    "ogbn_arxiv": Source("ogb/ogbn_arxiv", _ARXIV_FILES, OGB_ARXIV_URL, _read_arxiv),
    "mutag": _tu("MUTAG", ("A", "graph_indicator", "graph_labels", "node_labels",
                           "edge_labels")),
    "proteins": _tu("PROTEINS", ("A", "graph_indicator", "graph_labels", "node_labels",
                                 "node_attributes")),
    "reddit_binary": _tu("REDDIT-BINARY", ("A", "graph_indicator", "graph_labels")),
    "zinc": Source("zinc", tuple(f"raw/{s}.{ext}" for ext in ("pickle", "index")
                                 for s in ("train", "val", "test")),
                   ZINC.url, _read_zinc, processed="subset/processed"),
}

GENERATED: dict[str, Callable[[], Loaded]] = {
    "synthetic": lambda: Loaded(graph=synthetic.node_classification_graph()),
    "synthetic_graphs": lambda: Loaded(graphs=synthetic.graph_classification_set()),
}


def read(name: str, root: Path, download: str, normalize_features: bool) -> Loaded:
    """Read dataset ``name`` from under ``root`` (generated ones need no files)."""
    if name in GENERATED:
        loaded = GENERATED[name]()
    else:
        source = SOURCES[name]
        src = root / source.folder
        work = working_folder(src, source.folder)
        downloading = check_files(name, src, work, source.folder, source.files, source.url,
                                  download)
        with exclusive(work):  # after the check: a load that fails offline makes no folders
            if downloading:
                unlink_symlinks(work)
            loaded = read_or_explain(name, src, work, source.files, work / source.processed,
                                     downloading, lambda: source.read(work))
    if normalize_features and name != "zinc":  # ZINC's x holds atom-type indices
        normalize = NormalizeFeatures()
        if loaded.graph is not None:
            loaded.graph = normalize(loaded.graph)
        else:
            loaded.graphs = [normalize(g) for g in loaded.graphs]
    return loaded
