"""Datasets as :class:`~gnnq.data.task.Task` objects: ``load_task(cfg.data, cfg.dataset)``.

Files live under the data root (``data.root``, or ``$GNNQ_DATA`` while that keeps its default
``"data"``) in PyG/OGB layout: ``planetoid/<Name>``, ``coauthor/<CS|Physics>``,
``amazon/<Computers|Photo>``, ``tu/<NAME>``, ``ogb/ogbn_arxiv``, ``zinc``. A read-only root is
never written to: its files are linked into ``$GNNQ_CACHE`` (default ``~/.cache/gnnq/data``)
and processed there. Missing files are downloaded only with ``data.download=auto`` and a
host that answers; otherwise, and for damaged files, loading stops with a
:class:`~gnnq.errors.GnnqError` that says which files to put where.

Every metric is plain accuracy except ZINC's mean absolute error; for ogbn-arxiv that is
exactly what OGB's ``Evaluator`` reports (the share of correctly labelled nodes of the one
task).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gnnq.config import DATASETS, DataRootConfig, DatasetConfig
from gnnq.data.sources import PLANETOID, ZINC_ATOM_TYPES, Loaded, read
from gnnq.data.splits import (cross_validation_split, fixed_split, per_class_split,
                              planetoid_random_split)
from gnnq.data.storage import resolve_root
from gnnq.data.task import Task
from gnnq.errors import choice_error

__all__ = ["load_task", "resolve_root"]

# Read once per process (runs=10 reads once); splits are rebuilt from the config each call.
_LOADED: dict[tuple[str, str, bool], Loaded] = {}


def load_task(data: DataRootConfig, dataset: DatasetConfig) -> Task:
    """Load ``dataset.name`` from the data root of ``data`` and wrap it as a :class:`Task`."""
    if dataset.name not in DATASETS:
        raise choice_error("dataset", dataset.name, DATASETS)
    root = resolve_root(data.root)
    key = (str(root), dataset.name, dataset.normalize_features)
    if key not in _LOADED:
        _LOADED[key] = read(dataset.name, root, data.download, dataset.normalize_features)
    return _task(dataset, _LOADED[key])


def _task(cfg: DatasetConfig, loaded: Loaded) -> Task:
    if loaded.graph is not None:
        graph = loaded.graph
        if cfg.name in PLANETOID and cfg.split == "random":
            split = planetoid_random_split(graph.y, cfg.train_per_class, cfg.num_val,
                                           cfg.num_test, cfg.split_seed)
        elif loaded.official is not None:
            split = fixed_split(loaded.official)
        else:
            split = per_class_split(graph.y, cfg.train_per_class, cfg.val_per_class,
                                    cfg.split_seed)
        return Task(cfg.name, "node", graph.num_node_features, int(graph.y.max()) + 1, "acc",
                    split, graph=graph)

    graphs = loaded.graphs
    if cfg.name == "zinc":  # regression on one target; x is an atom-type index to embed
        return Task(cfg.name, "graph", 1, 1, "mae", fixed_split(loaded.official),
                    graphs=graphs, num_embeddings=ZINC_ATOM_TYPES)
    y = torch.cat([g.y for g in graphs])
    return Task(cfg.name, "graph", graphs[0].num_node_features, int(y.max()) + 1, "acc",
                cross_validation_split(y, cfg.folds, cfg.fold_seed), graphs=graphs,
                num_folds=cfg.folds)
