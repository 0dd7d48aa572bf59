"""Tiny on-disk datasets in exactly the raw formats PyG and OGB read.

PubMed (incomplete here), ogbn-arxiv and ZINC are not on this machine; these writers let
the tests drive their real loading paths (PyG's Planetoid reader, OGB's csv reader, PyG's
ZINC pickle reader) in seconds. Every writer is deterministic.
"""

from __future__ import annotations

import gzip
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch


def _ring_with_chords(num_nodes: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A connected edge list: a ring plus random chords, each edge once."""
    edges = {(i, (i + 1) % num_nodes) for i in range(num_nodes)}
    for u, v in rng.integers(0, num_nodes, size=(num_nodes, 2)):
        if u != v and (v, u) not in edges:
            edges.add((int(u), int(v)))
    return sorted(edges)


def write_planetoid(folder: Path, prefix: str = "pubmed", num_classes: int = 3,
                    train_per_class: int = 20, num_other: int = 540, num_test: int = 100,
                    num_features: int = 16) -> dict[str, int]:
    """Write ``ind.<prefix>.{x,tx,allx,y,ty,ally,graph,test.index}`` into ``folder``.

    The layout of the Planetoid release: ``allx``/``ally`` are the non-test nodes, whose
    first ``len(y)`` rows are the training nodes; PyG takes the next 500 as validation, so
    ``num_other`` must be at least 500. Test nodes follow and ``test.index`` lists them
    in shuffled order, as in the originals. Returns the expected counts.
    """
    rng = np.random.default_rng(0)
    num_train = num_classes * train_per_class
    num_all = num_train + num_other
    num_nodes = num_all + num_test
    labels = np.concatenate([np.repeat(np.arange(num_classes), train_per_class),
                             rng.integers(0, num_classes, num_nodes - num_train)])
    onehot = np.eye(num_classes, dtype=np.int64)[labels]
    features = sp.csr_matrix((rng.random((num_nodes, num_features)) < 0.2).astype(np.float32))
    test_index = num_all + rng.permutation(num_test)
    graph = defaultdict(list)
    for u, v in _ring_with_chords(num_nodes, rng):
        graph[u].append(v)
        graph[v].append(u)
    parts = {
        "x": features[:num_train], "y": onehot[:num_train],
        "allx": features[:num_all], "ally": onehot[:num_all],
        # tx/ty rows are in test.index order.
        "tx": features[test_index], "ty": onehot[test_index],
        "graph": graph,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in parts.items():
        with open(folder / f"ind.{prefix}.{name}", "wb") as f:
            pickle.dump(value, f, protocol=2)
    (folder / f"ind.{prefix}.test.index").write_text("".join(f"{i}\n" for i in test_index))
    return {"nodes": num_nodes, "train": num_train, "val": 500, "test": num_test,
            "classes": num_classes, "features": num_features}


def _write_csv_gz(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(",".join(str(v) for v in np.atleast_1d(row)) + "\n")


def write_ogbn_arxiv(ogb_root: Path, num_nodes: int = 60, num_features: int = 8,
                     num_classes: int = 40) -> dict[str, int]:
    """Write an ``ogbn_arxiv`` folder as OGB's ``arxiv.zip`` unpacks it, under ``ogb_root``.

    Raw csv.gz files (no headers), the time split and the ``RELEASE_v1.txt`` marker whose
    absence would make OGB ask on stdin whether to download again. Edges are directed
    (citations), as in the original. Returns the expected counts.
    """
    rng = np.random.default_rng(0)
    folder = ogb_root / "ogbn_arxiv"
    edges = _ring_with_chords(num_nodes, rng)
    raw = folder / "raw"
    _write_csv_gz(raw / "edge.csv.gz", edges)
    _write_csv_gz(raw / "node-feat.csv.gz",
                  np.round(rng.standard_normal((num_nodes, num_features)), 6))
    _write_csv_gz(raw / "node-label.csv.gz", rng.integers(0, num_classes, num_nodes))
    _write_csv_gz(raw / "node_year.csv.gz", rng.integers(2010, 2021, num_nodes))
    _write_csv_gz(raw / "num-node-list.csv.gz", [num_nodes])
    _write_csv_gz(raw / "num-edge-list.csv.gz", [len(edges)])
    order = rng.permutation(num_nodes)
    num_train, num_val = num_nodes // 2, num_nodes // 4
    splits = {"train": order[:num_train], "valid": order[num_train:num_train + num_val],
              "test": order[num_train + num_val:]}
    for name, idx in splits.items():
        _write_csv_gz(folder / "split" / "time" / f"{name}.csv.gz", np.sort(idx))
    (folder / "RELEASE_v1.txt").write_text("ogbn-arxiv v1 (tiny test copy)\n")
    return {"nodes": num_nodes, "directed_edges": len(edges), "features": num_features,
            "train": num_train, "val": num_val, "test": num_nodes - num_train - num_val}


def _molecule(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One entry of the ZINC pickles: atom types, symmetric bond-type matrix, target."""
    n = int(rng.integers(5, 12))
    bonds = torch.zeros(n, n, dtype=torch.long)
    for u, v in _ring_with_chords(n, rng)[: n + 1]:
        bonds[u, v] = bonds[v, u] = int(rng.integers(1, 4))
    return {
        "atom_type": torch.from_numpy(rng.integers(0, 28, n)),
        "bond_type": bonds,
        "logP_SA_cycle_normalized": torch.tensor([rng.standard_normal()], dtype=torch.float),
    }


def write_zinc(zinc_root: Path, sizes=(("train", 12, 8), ("val", 6, 4), ("test", 6, 5))
               ) -> dict[str, int]:
    """Write PyG ZINC's ``raw/{split}.pickle`` and ``raw/{split}.index`` under ``zinc_root``.

    That is the content of ``molecules.zip`` after PyG renames its ``molecules/`` folder to
    ``raw/``: each pickle a list of molecule dicts, each index file one line of
    comma-separated positions (the 12k subset) ending in a newline. ``sizes`` gives, per
    split, the molecules in the pickle and how many of them the index selects.
    """
    rng = np.random.default_rng(0)
    raw = zinc_root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, total, chosen in sizes:
        with open(raw / f"{split}.pickle", "wb") as f:
            pickle.dump([_molecule(rng) for _ in range(total)], f)
        index = sorted(rng.choice(total, chosen, replace=False).tolist())
        (raw / f"{split}.index").write_text(",".join(map(str, index)) + "\n")
        expected[split] = chosen
    return expected


def write_tu(tu_root: Path, name: str = "REDDIT-BINARY", num_graphs: int = 20) -> dict[str, int]:
    """Write a featureless TU dataset (``<name>_A.txt``, ``_graph_indicator.txt``,
    ``_graph_labels.txt``) under ``tu_root/<name>/raw``, like REDDIT-BINARY: 1-based node
    ids, both directions of every edge listed, labels -1/1."""
    rng = np.random.default_rng(0)
    raw = tu_root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    pairs, indicator, offset = [], [], 0
    for g in range(num_graphs):
        n = int(rng.integers(4, 9))
        for u, v in _ring_with_chords(n, rng):
            pairs += [(offset + u + 1, offset + v + 1), (offset + v + 1, offset + u + 1)]
        indicator += [g + 1] * n
        offset += n
    (raw / f"{name}_A.txt").write_text("".join(f"{u}, {v}\n" for u, v in pairs))
    (raw / f"{name}_graph_indicator.txt").write_text("".join(f"{g}\n" for g in indicator))
    labels = [(-1) ** g for g in range(num_graphs)]
    (raw / f"{name}_graph_labels.txt").write_text("".join(f"{y}\n" for y in labels))
    return {"graphs": num_graphs, "nodes": offset}
