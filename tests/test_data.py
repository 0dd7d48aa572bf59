"""Tests of ``gnnq.data``: real datasets (read through a symlink mirror of ``shared/data``),
the loading paths of datasets this machine lacks (tiny files in the real formats), splits,
and the failures a user can hit: missing files offline, damaged files, a read-only root.
Nothing here downloads: every load uses ``download="never"`` or a stubbed probe.
"""

from __future__ import annotations

import builtins
import dataclasses
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch_geometric.datasets import Planetoid
from torch_geometric.utils import is_undirected

import gnnq.data
from fake_datasets import write_ogbn_arxiv, write_planetoid, write_tu, write_zinc
from gnnq.config import DataRootConfig, DatasetConfig
from gnnq.data import load_task, resolve_root, sources, storage, synthetic
from gnnq.data.storage import is_writable
from gnnq.errors import GnnqError

sys.modules.setdefault("outdated", None)  # before ogb is first imported (see environment.md)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f"real datasets not found at {SHARED}")


def load(root: Path, name: str, download: str = "never", **dataset):
    return load_task(DataRootConfig(root=str(root), download=download),
                     DatasetConfig(name=name, **dataset))


def copy_tree(src: Path, dst: Path, link: bool) -> None:
    """Mirror ``src`` into ``dst`` by symlinks (``link``) or real copies, with writable
    folders (``shutil.copytree`` would copy the read-only modes of ``shared/data``)."""
    for file in src.rglob("*"):
        if file.is_file():
            target = dst / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                target.symlink_to(file)
            else:
                target.write_bytes(file.read_bytes())


def snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_mtime_ns)
                  for p in [folder, *folder.rglob("*")])


def sizes(split) -> tuple[int, int, int]:
    return len(split.train), len(split.val), len(split.test)


def assert_partition(split, num_items: int | None = None) -> None:
    every = torch.cat([split.train, split.val, split.test])
    assert every.unique().numel() == every.numel(), "train/val/test overlap"
    if num_items is not None:
        assert every.numel() == num_items


def same_split(a, b) -> bool:
    return all(torch.equal(x, y)
               for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)))


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test writes to ~/.cache or reads a GNNQ_DATA set outside."""
    monkeypatch.setenv("GNNQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GNNQ_DATA", raising=False)


@pytest.fixture
def fresh_loads(monkeypatch):
    """Bypass the in-process cache, so a second load really reads the files again."""
    monkeypatch.setattr(gnnq.data, "_LOADED", {})


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    """A writable symlink mirror of the real datasets the tests use."""
    if not SHARED.is_dir():
        pytest.skip(f"real datasets not found at {SHARED}")
    root = tmp_path_factory.mktemp("data")
    for folder in ("planetoid/Cora", "planetoid/CiteSeer", "coauthor/CS", "tu/MUTAG"):
        copy_tree(SHARED / folder, root / folder, link=True)
    return root


# --- real data -------------------------------------------------------------------------------

def test_cora_public_split(real_root):
    task = load(real_root, "cora")
    assert (task.level, task.metric, task.higher_is_better) == ("node", "acc", True)
    assert task.graph.num_nodes == 2708 and task.graph.num_edges == 10556
    assert (task.num_features, task.num_classes) == (1433, 7)
    split = task.split(0, 0)
    assert sizes(split) == (140, 500, 1000)
    assert_partition(split)
    assert same_split(split, task.split(7, 123)), "the public split must not depend on the run"


def test_citeseer_loads(real_root):
    task = load(real_root, "citeseer")
    assert task.graph.num_nodes == 3327
    assert (task.num_features, task.num_classes) == (3703, 6)
    assert sizes(task.split(0, 0)) == (120, 500, 1000)


def test_planetoid_random_split(real_root):
    task = load(real_root, "cora", split="random")
    split = task.split(0, 1)
    assert torch.bincount(task.graph.y[split.train], minlength=7).tolist() == [20] * 7
    assert sizes(split) == (140, 500, 1000)
    assert_partition(split)
    assert same_split(split, task.split(0, 1))
    assert not same_split(split, task.split(1, 2))
    fixed = load(real_root, "cora", split="random", split_seed=5)
    assert same_split(fixed.split(0, 1), fixed.split(1, 2))


def test_coauthor_cs_per_class_split(real_root):
    task = load(real_root, "coauthor_cs")
    graph = task.graph
    assert (graph.num_nodes, task.num_features, task.num_classes) == (18333, 6805, 15)
    split = task.split(0, 1)
    assert torch.bincount(graph.y[split.train], minlength=15).tolist() == [20] * 15
    assert torch.bincount(graph.y[split.val], minlength=15).tolist() == [30] * 15
    assert_partition(split, graph.num_nodes)
    assert same_split(split, task.split(0, 1))
    assert not same_split(split, task.split(1, 2)), "split_seed=None: a new split per run seed"
    seeded = load(real_root, "coauthor_cs", split_seed=3)
    assert same_split(seeded.split(0, 1), seeded.split(4, 9))
    assert not same_split(seeded.split(0, 1), split)


def test_mutag_cross_validation_folds(real_root):
    task = load(real_root, "mutag")
    assert (task.level, task.metric, task.num_folds) == ("graph", "acc", 10)
    assert len(task.graphs) == 188 and (task.num_features, task.num_classes) == (7, 2)
    assert all(g.y.shape == (1,) for g in task.graphs)
    y = torch.cat([g.y for g in task.graphs])
    tests = [task.split(run, 0).test for run in range(10)]
    assert torch.equal(torch.cat(tests).sort().values, torch.arange(188)), "folds must partition"
    ideal = torch.bincount(y) / 10
    for fold in tests:
        assert (torch.bincount(y[fold], minlength=2) - ideal).abs().max() <= 1, "not stratified"
    for run in range(10):
        split = task.split(run, run)
        assert torch.equal(split.val, tests[(run - 1) % 10]), "val must be the previous fold"
        assert_partition(split, 188)
    assert same_split(task.split(10, 0), task.split(0, 0))
    other = load(real_root, "mutag", fold_seed=1)
    assert not torch.equal(other.split(0, 0).test, tests[0])


def test_loads_once_per_process(real_root):
    first, second = load(real_root, "cora"), load(real_root, "cora", split="random")
    assert first.graph is second.graph


def test_normalize_features(real_root):
    task = load(real_root, "cora", normalize_features=True)
    row_sums = task.graph.x.sum(dim=1)
    assert torch.allclose(row_sums[row_sums > 0], torch.ones(1))
    assert load(real_root, "cora").graph.x.max() == 1  # the plain copy is cached apart


@needs_shared
@pytest.mark.skipif(SHARED.is_dir() and is_writable(SHARED), reason="shared/data is writable")
def test_shared_root_is_never_written(tmp_path, fresh_loads):
    before = snapshot(SHARED / "planetoid")
    task = load(SHARED, "cora")
    assert task.graph.num_nodes == 2708
    assert snapshot(SHARED / "planetoid") == before
    assert (tmp_path / "cache" / "planetoid" / "Cora" / "processed" / "data.pt").is_file()


# --- datasets absent here, from tiny files in their real formats -----------------------------

def test_pubmed_from_planetoid_files(tmp_path):
    expected = write_planetoid(tmp_path / "planetoid" / "PubMed" / "raw")
    task = load(tmp_path, "pubmed")
    assert task.graph.num_nodes == expected["nodes"]
    assert (task.num_features, task.num_classes) == (expected["features"], expected["classes"])
    assert sizes(task.split(0, 0)) == (expected["train"], expected["val"], expected["test"])
    random = load(tmp_path, "pubmed", split="random", num_val=100, num_test=200)
    assert sizes(random.split(0, 0)) == (expected["train"], 100, 200)


def test_ogbn_arxiv_from_ogb_files(tmp_path, monkeypatch):
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("OGB asked on stdin"))
    expected = write_ogbn_arxiv(tmp_path / "ogb")
    (tmp_path / "ogb" / "ogbn_arxiv" / "RELEASE_v1.txt").unlink()  # must not make OGB ask
    task = load(tmp_path, "ogbn_arxiv")
    graph = task.graph
    assert (task.level, task.metric) == ("node", "acc")
    assert graph.num_nodes == expected["nodes"] and task.num_features == expected["features"]
    assert graph.y.dim() == 1 and graph.y.dtype == torch.long
    assert is_undirected(graph.edge_index) and graph.num_edges == 2 * expected["directed_edges"]
    split = task.split(0, 0)
    assert sizes(split) == (expected["train"], expected["val"], expected["test"])
    assert_partition(split, expected["nodes"])
    assert same_split(split, task.split(3, 3))


def test_ogb_evaluator_accuracy_is_plain_accuracy():
    from ogb.nodeproppred import Evaluator

    y_true = torch.randint(0, 40, (500,), generator=torch.Generator().manual_seed(0))
    y_pred = torch.where(torch.rand(500) < 0.6, y_true, (y_true + 1) % 40)
    acc = Evaluator("ogbn-arxiv").eval({"y_true": y_true.view(-1, 1),
                                        "y_pred": y_pred.view(-1, 1)})["acc"]
    assert acc == pytest.approx((y_true == y_pred).float().mean().item())


def test_zinc_from_pyg_pickles(tmp_path):
    expected = write_zinc(tmp_path / "zinc")
    task = load(tmp_path, "zinc")
    assert (task.level, task.metric, task.higher_is_better) == ("graph", "mae", False)
    assert (task.num_features, task.num_classes, task.num_embeddings) == (1, 1, 28)
    assert len(task.graphs) == sum(expected.values())
    graph = task.graphs[0]
    assert graph.x.dtype == torch.long and graph.x.shape[1] == 1 and graph.x.max() < 28
    assert graph.y.shape == (1,) and graph.y.is_floating_point()
    split = task.split(0, 0)
    assert sizes(split) == (expected["train"], expected["val"], expected["test"])
    assert split.train.tolist() == list(range(expected["train"]))
    assert same_split(split, task.split(5, 5))


def test_featureless_tu_graphs_get_standardised_degree(tmp_path):
    expected = write_tu(tmp_path / "tu", "REDDIT-BINARY")
    task = load(tmp_path, "reddit_binary")
    assert len(task.graphs) == expected["graphs"] and task.num_features == 1
    x = torch.cat([g.x for g in task.graphs])
    assert x.shape == (expected["nodes"], 1)
    assert x.mean().abs() < 1e-5 and (x.std() - 1).abs() < 1e-5


# --- failures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, folder, needed", [
    ("cora", "planetoid/Cora", "raw/ind.cora.allx"),
    ("coauthor_cs", "coauthor/CS", "raw/ms_academic_cs.npz"),
    ("mutag", "tu/MUTAG", "raw/MUTAG_A.txt"),
    ("ogbn_arxiv", "ogb/ogbn_arxiv", "split/time/train.csv.gz"),
    ("zinc", "zinc", "raw/train.pickle"),
])
def test_missing_files_offline_fail_fast(tmp_path, name, folder, needed):
    root = tmp_path / "empty"
    root.mkdir()
    start = time.monotonic()
    with pytest.raises(GnnqError) as err:
        load(root, name)
    assert time.monotonic() - start < 5
    message = str(err.value)
    for part in (repr(name), str(root / folder), needed, "data.root", "GNNQ_DATA",
                 "data.download"):
        assert part in message
    assert list(root.iterdir()) == [], "a failed load must not create folders"


def test_partly_missing_dataset_names_the_missing_file(tmp_path):
    write_planetoid(tmp_path / "planetoid" / "PubMed" / "raw")
    (tmp_path / "planetoid" / "PubMed" / "raw" / "ind.pubmed.allx").unlink()
    with pytest.raises(GnnqError, match=r"lacks 1 of the 8 files .*\(raw/ind\.pubmed\.allx\)"):
        load(tmp_path, "pubmed")


def test_auto_download_gives_up_when_host_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_reachable", lambda url: False)
    with pytest.raises(GnnqError, match="did not answer within 3 s"):
        load(tmp_path, "cora", download="auto")


def test_download_goes_to_cache_not_through_links(tmp_path, monkeypatch):
    """With files missing from a read-only root, the download lands in the cache mirror,
    whose links to the root are removed first (PyG overwrites files in place)."""
    root = tmp_path / "readonly"
    write_planetoid(root / "planetoid" / "PubMed" / "raw")
    (root / "planetoid" / "PubMed" / "raw" / "ind.pubmed.allx").unlink()
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    monkeypatch.setattr(storage, "_reachable", lambda url: True)
    monkeypatch.setattr(Planetoid, "download",  # stands in for the real download
                        lambda self: write_planetoid(Path(self.raw_dir)))
    try:
        before = snapshot(root)
        assert load(root, "pubmed", download="auto").graph.num_nodes == 700
        assert snapshot(root) == before
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_failed_download_is_explained(tmp_path, monkeypatch):
    def no_network(self):
        raise URLError("connection reset")

    monkeypatch.setattr(storage, "_reachable", lambda url: True)
    monkeypatch.setattr(Planetoid, "download", no_network)
    with pytest.raises(GnnqError, match="Downloading the files of dataset 'cora' into .* failed"):
        load(tmp_path, "cora", download="auto")


def test_reachability_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert storage._reachable(f"http://127.0.0.1:{port}/file.zip")
    start = time.monotonic()
    assert not storage._reachable(f"http://127.0.0.1:{port}/file.zip")
    assert time.monotonic() - start < 3.5


@needs_shared
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_cora_file_is_named(tmp_path, damage):
    copy_tree(SHARED / "planetoid" / "Cora", tmp_path / "planetoid" / "Cora", link=False)
    file = tmp_path / "planetoid" / "Cora" / "raw" / "ind.cora.x"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\xffjunk" * 99)
    with pytest.raises(GnnqError) as err:
        load(tmp_path, "cora")
    message = str(err.value)
    assert "'cora'" in message and "reading raw/ind.cora.x failed" in message
    assert "restore" in message


@pytest.mark.parametrize("name, write, file", [
    ("pubmed", lambda root: write_planetoid(root / "planetoid" / "PubMed" / "raw"),
     "planetoid/PubMed/raw/ind.pubmed.graph"),
    ("ogbn_arxiv", lambda root: write_ogbn_arxiv(root / "ogb"),
     "ogb/ogbn_arxiv/raw/edge.csv.gz"),
    ("zinc", lambda root: write_zinc(root / "zinc"), "zinc/raw/val.pickle"),
    ("reddit_binary", lambda root: write_tu(root / "tu"),
     "tu/REDDIT-BINARY/raw/REDDIT-BINARY_graph_indicator.txt"),
    ("coauthor_cs", lambda root: None, "coauthor/CS/raw/ms_academic_cs.npz"),
])
def test_garbage_file_gives_clear_error(tmp_path, name, write, file):
    write(tmp_path)
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\xff not a dataset \x01" * 8)
    with pytest.raises(GnnqError) as err:
        load(tmp_path, name)
    assert f"{name!r}" in str(err.value) and Path(file).name in str(err.value)


def test_truncated_tu_edge_list_is_detected(tmp_path):
    write_tu(tmp_path / "tu")
    edges = tmp_path / "tu" / "REDDIT-BINARY" / "raw" / "REDDIT-BINARY_A.txt"
    lines = edges.read_text().splitlines(keepends=True)
    edges.write_text("".join(lines[: len(lines) // 2 + 1]))  # cut at a line end: still parses
    with pytest.raises(GnnqError, match="REDDIT-BINARY_A.txt lists edges without their reverse"):
        load(tmp_path, "reddit_binary")


def test_stale_processed_data_is_rebuilt(tmp_path, fresh_loads):
    write_planetoid(tmp_path / "planetoid" / "PubMed" / "raw")
    nodes = load(tmp_path, "pubmed").graph.num_nodes
    processed = tmp_path / "planetoid" / "PubMed" / "processed" / "data.pt"
    processed.write_bytes(b"stale")
    gnnq.data._LOADED.clear()
    assert load(tmp_path, "pubmed").graph.num_nodes == nodes
    assert processed.stat().st_size > 100


def test_parallel_loads_take_turns(tmp_path, monkeypatch):
    """Two processes of a sharded job load the same dataset at once: the second must not read
    the processed file while the first is still writing it, so reading is exclusive."""
    write_planetoid(tmp_path / "planetoid" / "PubMed" / "raw")
    source = sources.SOURCES["pubmed"]
    spans = []

    def slow_read(work: Path):
        start = time.monotonic()
        loaded = source.read(work)
        time.sleep(0.3)
        spans.append((start, time.monotonic()))
        return loaded

    monkeypatch.setitem(sources.SOURCES, "pubmed", dataclasses.replace(source, read=slow_read))
    loads = [threading.Thread(target=sources.read, args=("pubmed", tmp_path, "never", False))
             for _ in range(2)]
    for thread in loads:
        thread.start()
    for thread in loads:
        thread.join()
    (_, first_end), (second_start, _) = sorted(spans)
    assert len(spans) == 2 and second_start >= first_end


def test_read_only_root_loads_through_cache(tmp_path, fresh_loads):
    root = tmp_path / "readonly"
    write_planetoid(root / "planetoid" / "PubMed" / "raw")
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        before = snapshot(root)
        assert load(root, "pubmed").graph.num_nodes == 700
        gnnq.data._LOADED.clear()
        assert load(root, "pubmed").graph.num_nodes == 700  # again, from the cache's processed
        assert snapshot(root) == before, "something was written into the read-only root"
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    cached = tmp_path / "cache" / "planetoid" / "PubMed"
    assert (cached / "raw" / "ind.pubmed.x").is_symlink()
    assert (cached / "processed" / "data.pt").is_file()


def test_unknown_dataset_name(tmp_path):
    dataset = DatasetConfig()
    dataset.name = "imagenet"  # past config validation
    with pytest.raises(GnnqError, match="Unknown dataset 'imagenet'. Valid choices: .*cora"):
        load_task(DataRootConfig(root=str(tmp_path)), dataset)


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_root() == tmp_path / "data"
    assert resolve_root("elsewhere") == tmp_path / "elsewhere"
    monkeypatch.setenv("GNNQ_DATA", "/srv/datasets")
    assert resolve_root() == resolve_root("data") == Path("/srv/datasets")
    assert resolve_root("/explicit") == Path("/explicit"), "an explicit root beats GNNQ_DATA"


# --- generated datasets --------------------------------------------------------------------------

def test_synthetic_node_task():
    start = time.monotonic()
    graph = synthetic.node_classification_graph()
    assert time.monotonic() - start < 1
    again = synthetic.node_classification_graph()
    assert torch.equal(graph.x, again.x) and torch.equal(graph.edge_index, again.edge_index)

    task = load(Path("unused"), "synthetic")
    y = task.graph.y
    assert (task.graph.num_nodes, task.num_features, task.num_classes) == (400, 32, 4)
    assert torch.bincount(y).tolist() == [100] * 4
    split = task.split(0, 0)
    assert torch.bincount(y[split.train]).tolist() == [20] * 4
    assert torch.bincount(y[split.val]).tolist() == [30] * 4
    assert_partition(split, 400)
    src, dst = task.graph.edge_index
    assert (y[src] == y[dst]).float().mean() > 0.6, "the graph should be homophilous"
    # Nearest class centre of the training features beats chance (0.25) on the test nodes.
    x = task.graph.x
    centres = torch.stack([x[split.train][y[split.train] == c].mean(0) for c in range(4)])
    predicted = torch.cdist(x[split.test], centres).argmin(1)
    assert (predicted == y[split.test]).float().mean() > 0.5


def test_synthetic_graphs_task():
    task = load(Path("unused"), "synthetic_graphs")
    graphs = task.graphs
    assert len(graphs) == 120 and (task.num_features, task.num_classes) == (1, 2)
    assert all(10 <= g.num_nodes <= 30 and g.y.shape == (1,) for g in graphs)
    y = torch.cat([g.y for g in graphs])
    assert torch.bincount(y).tolist() == [60, 60]
    regenerated = synthetic.graph_classification_set()
    assert all(torch.equal(a.edge_index, b.edge_index) for a, b in zip(graphs, regenerated))
    # Mean degree separates rings of cliques from trees: the features carry the label.
    mean_degree = torch.tensor([g.x.mean().item() for g in graphs])
    assert ((mean_degree < 2).long() == y).float().mean() > 0.9
    split = task.split(3, 0)
    assert torch.equal(split.val, task.split(2, 0).test)
    assert_partition(split, 120)
