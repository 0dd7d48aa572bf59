"""Quantized layers and models: FP32 equivalence with PyG, role hooks, sparsity, shapes."""

from __future__ import annotations

import copy
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GATConv, GCNConv, GINConv
from torch_geometric.utils import (add_remaining_self_loops, remove_self_loops,
                                   stochastic_blockmodel_graph)

from gnnq.config import ModelConfig
from gnnq.data.task import Task
from gnnq.errors import GnnqError
from gnnq.models import (GAT, GCN, GIN, GraphGCN, GraphGIN, QGATConv, QGCNConv, QGINConv,
                         QLinear, build_model)
from gnnq.models.mlp import quantized_mlp
from gnnq.quant.base import ROLES, BitCost, LayerSpec, Quantizer, RoleQuantizers

N, F_IN, F_OUT, HEADS = 40, 6, 5, 3


class GridQuantizer(Quantizer):
    """Rounds to a grid of ``step`` with a straight-through gradient; records what it saw."""

    def __init__(self, step: float = 0.25) -> None:
        super().__init__()
        self.step = step
        self.scale = nn.Parameter(torch.ones(()))  # state, to check single ownership
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        if self.step == 0:
            return x
        q = torch.round(x / self.step) * self.step
        return x + (q - x).detach()

    def bit_cost(self):
        return BitCost(1.0, 4.0) if self.shapes else None


def identity_quantizer() -> GridQuantizer:
    return GridQuantizer(step=0)


def test_update_role_can_be_built():
    # "update" is also an nn.ModuleDict method name; RoleQuantizers must still accept it.
    assert RoleQuantizers({"update": identity_quantizer()}).has("update")


@pytest.fixture
def graph():
    torch.manual_seed(0)
    edge_index = torch.randint(0, N, (2, 160))
    edge_index, _ = remove_self_loops(edge_index)
    # A few self-loops and an isolated node: both must be handled like PyG.
    loops = torch.arange(0, 6).repeat(2, 1)
    edge_index = torch.cat([edge_index[:, edge_index.ne(N - 1).all(0)], loops], dim=1)
    return torch.randn(N, F_IN), edge_index


def assert_grads(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.requires_grad and not name.endswith(".scale"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- FP32 equivalence with PyG -------------------------------------------------------------

def test_qlinear_is_linear_in_fp32():
    torch.manual_seed(0)
    lin = QLinear(F_IN, F_OUT)
    ref = nn.Linear(F_IN, F_OUT)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(7, F_IN)
    torch.testing.assert_close(lin(x), ref(x))


@pytest.mark.parametrize("edge_path", [False, True], ids=["fused", "per-edge"])
def test_gcn_matches_pyg(graph, edge_path):
    x, edge_index = graph
    # An identity quantizer on "message" forces the per-edge path; both must equal PyG.
    q = RoleQuantizers({"message": identity_quantizer()}) if edge_path else None
    conv, ref = QGCNConv(F_IN, F_OUT, quantizers=q), GCNConv(F_IN, F_OUT)
    with torch.no_grad():
        ref.lin.weight.copy_(conv.lin.weight)
        conv.bias.normal_()
        ref.bias.copy_(conv.bias)
    out = conv(x, edge_index)
    torch.testing.assert_close(out, ref(x, edge_index))
    out.square().sum().backward()
    assert_grads(conv)


@pytest.mark.parametrize("edge_path", [False, True], ids=["fused", "per-edge"])
def test_gin_matches_pyg(graph, edge_path):
    x, edge_index = graph
    q = RoleQuantizers({"message": identity_quantizer()}) if edge_path else None
    mlp = nn.Sequential(QLinear(F_IN, 16), nn.ReLU(), QLinear(16, F_OUT))
    conv = QGINConv(mlp, quantizers=q, eps=0.3, train_eps=True)
    ref = GINConv(nn.Sequential(nn.Linear(F_IN, 16), nn.ReLU(), nn.Linear(16, F_OUT)),
                  eps=0.3, train_eps=True)
    ref.nn.load_state_dict(mlp.state_dict())
    # PyG's GINConv sums over whatever edges it is given; ours drops self-loops first.
    out = conv(x, edge_index)
    torch.testing.assert_close(out, ref(x, remove_self_loops(edge_index)[0]))
    out.square().sum().backward()
    assert_grads(conv)
    assert conv.eps.grad is not None


@pytest.mark.parametrize("concat", [True, False])
def test_gat_matches_pyg(graph, concat):
    x, edge_index = graph
    conv = QGATConv(F_IN, F_OUT, heads=HEADS, concat=concat)
    ref = GATConv(F_IN, F_OUT, heads=HEADS, concat=concat)
    with torch.no_grad():
        ref.lin.weight.copy_(conv.lin.weight)
        ref.att_src.copy_(conv.att_src.view(1, HEADS, F_OUT))
        ref.att_dst.copy_(conv.att_dst.view(1, HEADS, F_OUT))
        conv.bias.normal_()
        ref.bias.copy_(conv.bias)
    out = conv(x, edge_index)
    torch.testing.assert_close(out, ref(x, edge_index))
    out.square().sum().backward()
    assert_grads(conv)


# -- roles ----------------------------------------------------------------------------------

def _num_edges_with_loops(edge_index):
    return add_remaining_self_loops(edge_index, num_nodes=N)[0].size(1)


def _gcn(q):
    return QGCNConv(F_IN, F_OUT, quantizers=q)


def _gin(q):
    mlp = nn.Sequential(QLinear(F_IN, 16), nn.ReLU(), QLinear(16, F_OUT))
    return QGINConv(mlp, quantizers=q)


def _gat(q):
    return QGATConv(F_IN, F_OUT, heads=HEADS, quantizers=q)


E_LOOPS, E_PLAIN = "edges+loops", "edges"
HC = HEADS * F_OUT
ROLE_CASES = [
    (_gcn, "input", [(N, F_IN)]),
    (_gcn, "weight", [(F_OUT, F_IN)]),
    (_gcn, "feature", [(N, F_OUT)]),
    (_gcn, "message", [(E_LOOPS, F_OUT)]),
    (_gcn, "aggregate", [(N, F_OUT)]),
    (_gcn, "update", [(N, F_OUT)]),
    (_gin, "input", [(N, F_IN)]),
    (_gin, "message", [(E_PLAIN, F_IN)]),
    (_gin, "aggregate", [(N, F_IN)]),
    (_gin, "update", [(N, F_IN)]),
    (_gat, "input", [(N, F_IN)]),
    (_gat, "weight", [(HC, F_IN)]),
    (_gat, "feature", [(N, HC)]),
    (_gat, "attention", [(HEADS, 2 * F_OUT)]),
    (_gat, "score", [(E_LOOPS, HEADS)]),
    (_gat, "message", [(E_LOOPS, HC)]),
    (_gat, "aggregate", [(N, HC)]),
    (_gat, "update", [(N, HC)]),
]


@pytest.mark.parametrize("make, role, shapes", [
    pytest.param(m, r, s, id=f"{m.__name__[1:]}-{r}")
    for m, r, s in ROLE_CASES])
def test_role_quantizer_sees_its_tensor_and_changes_output(graph, make, role, shapes):
    x, edge_index = graph
    sizes = {E_LOOPS: _num_edges_with_loops(edge_index),
             E_PLAIN: remove_self_loops(edge_index)[0].size(1)}
    torch.manual_seed(1)
    fp32 = make(None)
    quantizer = GridQuantizer(step=0.5)
    quantized = make(RoleQuantizers({role: quantizer}))
    quantized.load_state_dict(fp32.state_dict(), strict=False)

    out = quantized(x, edge_index)
    expected = [tuple(sizes.get(d, d) for d in shape) for shape in shapes]
    assert quantizer.shapes == expected
    assert not torch.allclose(out, fp32(x, edge_index))
    out.square().sum().backward()
    assert_grads(quantized)


@pytest.mark.parametrize("make", [_gcn, _gin, _gat])
def test_identity_quantizers_on_every_role_change_nothing(graph, make):
    x, edge_index = graph
    torch.manual_seed(1)
    fp32 = make(None)
    quantized = make(RoleQuantizers({r: identity_quantizer() for r in ROLES}))
    quantized.load_state_dict(fp32.state_dict(), strict=False)
    torch.testing.assert_close(quantized(x, edge_index), fp32(x, edge_index))


def test_each_quantizer_has_one_owner_where_it_acts():
    q = {r: GridQuantizer() for r in ROLES}
    conv = QGATConv(F_IN, F_OUT, heads=HEADS, quantizers=RoleQuantizers(q))
    for role, quantizer in q.items():
        paths = [name for name, m in conv.named_modules(remove_duplicate=False)
                 if m is quantizer]
        # Linear roles live in conv.lin, message-passing roles in the conv itself.
        assert len(paths) == 1
        assert paths[0].startswith("lin.") == (role in ("input", "weight", "feature"))
    assert sum(k.endswith(".scale") for k in conv.state_dict()) == len(q)


# -- models and build_model -----------------------------------------------------------------

def node_task(num_nodes=30, features=5, classes=3):
    torch.manual_seed(0)
    g = Data(x=torch.randn(num_nodes, features),
             edge_index=torch.randint(0, num_nodes, (2, 4 * num_nodes)))
    return Task("toy", "node", features, classes, "acc", split=None, graph=g)


def graph_task(metric="acc", classes=3, num_embeddings=None, features=4):
    torch.manual_seed(0)
    graphs = []
    for n in (7, 9, 12, 5):
        x = (torch.randint(0, num_embeddings, (n, 1)) if num_embeddings
             else torch.randn(n, features))
        graphs.append(Data(x=x, edge_index=torch.randint(0, n, (2, 3 * n))))
    task = Task("toy_graphs", "graph", 1 if num_embeddings else features, classes, metric,
                split=None, graphs=graphs, num_embeddings=num_embeddings)
    return task, Batch.from_data_list(graphs)


@pytest.mark.parametrize("name", ["gcn", "gin", "gat"])
def test_build_node_models(name):
    task = node_task()
    model = build_model(ModelConfig(name=name, hidden=8, layers=3), task)
    out = model(task.graph.x, task.graph.edge_index)
    assert out.shape == (30, 3)
    before = [p.detach().clone() for p in model.parameters()]
    model.reset_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["gin", "gcn"])
@pytest.mark.parametrize("embed", [None, 11], ids=["dense-x", "embedding"])
@pytest.mark.parametrize("metric, shape", [("acc", (4, 3)), ("mae", (4,))])
def test_build_graph_models(name, embed, metric, shape):
    task, batch = graph_task(metric, num_embeddings=embed)
    model = build_model(ModelConfig(name=name, hidden=16, layers=3), task)
    out = model(batch.x, batch.edge_index, batch.batch)
    assert out.shape == shape
    out.sum().backward()
    model.reset_parameters()


class InputRecorder(GridQuantizer):
    """A grid quantizer for layer inputs that keeps every tensor it was given."""

    def __init__(self) -> None:
        super().__init__(step=0.25)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return super().forward(x)


def _input_recorders(recorders):
    def factory(spec: LayerSpec):
        if spec.index == 0:
            return {}
        recorders.append(InputRecorder())
        return {"input": recorders[-1]}
    return factory


@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_quantize_before_dropout_changes_nothing_without_input_quantizers(name):
    task = node_task()
    x, edge_index = task.graph.x, task.graph.edge_index
    outputs = []
    for before in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name, hidden=8, layers=3, dropout=0.5,
                                        quantize_before_dropout=before), task)
        outputs.append(model(x, edge_index))  # training mode: dropout is drawn
    assert torch.equal(*outputs)


@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_quantize_before_dropout_shows_the_quantizer_what_evaluation_shows(name):
    """Dropping first scales the kept training inputs by 1/(1-p), so the input quantizer
    learns on values it never meets in evaluation; quantizing first removes the gap."""
    task = node_task()
    x, edge_index = task.graph.x, task.graph.edge_index
    for before in (False, True):
        recorders: list[InputRecorder] = []
        torch.manual_seed(0)
        # No attention dropout: a node whose every coefficient is dropped outputs zeros.
        model = build_model(ModelConfig(name=name, hidden=8, layers=2, dropout=0.5,
                                        attn_dropout=0.0, quantize_before_dropout=before),
                            task, quantizers=_input_recorders(recorders))
        (layer_1,) = recorders
        model.train()
        torch.manual_seed(1)
        train_out = model(x, edge_index)
        model.eval()
        eval_out = model(x, edge_index)
        train_in, eval_in = layer_1.seen
        # Dropout before the quantizer adds zeros (p = 0.5 of the entries) to what it sees in
        # training only; after it, training and evaluation inputs have the same zeros.
        gap = (train_in == 0).float().mean() - (eval_in == 0).float().mean()
        if before:
            assert abs(gap) < 0.05
            if name == "gcn":  # nothing random before GCN's layer-1 quantizer
                assert torch.equal(train_in, eval_in)
        else:
            assert gap > 0.2
        assert not torch.equal(train_out, eval_out)


def test_quantize_before_dropout_is_refused_where_no_conv_drops_its_input():
    with pytest.raises(GnnqError, match="quantize_before_dropout.*'gin'.*gcn and gat"):
        build_model(ModelConfig(name="gin", quantize_before_dropout=True), node_task())
    task, _ = graph_task()
    with pytest.raises(GnnqError, match="quantize_before_dropout.*graph-level"):
        build_model(ModelConfig(name="gcn", quantize_before_dropout=True), task)


def test_graph_level_gat_is_refused():
    task, _ = graph_task()
    with pytest.raises(GnnqError, match="gcn, gin"):
        build_model(ModelConfig(name="gat"), task)


def _recording_factory(specs):
    per_kind = {"gcn": ("input", "weight", "feature", "message", "aggregate", "update"),
                "gin": ("input", "message", "aggregate", "update"),
                "gat": ("input", "weight", "feature", "attention", "score", "message",
                        "aggregate", "update"),
                "linear": ("input", "weight", "feature")}

    def factory(spec: LayerSpec):
        specs.append(spec)
        return {role: GridQuantizer(step=0.01) for role in per_kind[spec.kind]
                if role in ROLES}
    return factory


@pytest.mark.parametrize("name, level", [("gcn", "node"), ("gin", "node"), ("gat", "node"),
                                         ("gin", "graph"), ("gcn", "graph")])
def test_factory_specs_name_real_layers_and_every_quantizer_runs(name, level):
    specs: list[LayerSpec] = []
    if level == "node":
        task = node_task()
        model = build_model(ModelConfig(name=name, hidden=8, heads=2), task,
                            _recording_factory(specs))
        model(task.graph.x, task.graph.edge_index)
    else:
        task, batch = graph_task()
        model = build_model(ModelConfig(name=name, hidden=8, layers=2), task,
                            _recording_factory(specs))
        model(batch.x, batch.edge_index, batch.batch)

    modules = dict(model.named_modules())
    for spec in specs:
        assert spec.name in modules and spec.level == level
        assert 0 <= spec.index < spec.num_layers
        assert spec.num_nodes == (30 if level == "node" else None)
    assert max(s.index for s in specs) == specs[0].num_layers - 1
    quantizers = [m for m in model.modules() if isinstance(m, GridQuantizer)]
    assert quantizers and all(q.shapes for q in quantizers)


def test_gat_layer_specs():
    specs: list[LayerSpec] = []
    task = node_task()
    build_model(ModelConfig(name="gat", hidden=8, heads=4, out_heads=2), task,
                _recording_factory(specs))
    assert [(s.in_dim, s.out_dim, s.heads) for s in specs] == [(5, 8, 4), (32, 3, 2)]


def test_gin_mlp_depth_and_graph_block():
    mlp = quantized_mlp([4, 8, 8, 2], lambda pos, a, b: RoleQuantizers())
    assert [type(m).__name__ for m in mlp] == ["QLinear", "ReLU", "QLinear", "ReLU", "QLinear"]
    model = GraphGIN(4, 2, hidden=8, layers=1, mlp_layers=2)
    assert [type(m).__name__ for m in model.convs[0].nn] == [
        "QLinear", "ReLU", "QLinear", "ReLU", "BatchNorm1d"]


def test_gcn_caches_only_when_asked(graph):
    x, edge_index = graph
    other = torch.randint(0, N, (2, 50))
    node_model = GCN(F_IN, 3, cached=True).eval()
    first = node_model(x, edge_index)
    # The cached graph is reused, whatever edge_index is passed afterwards.
    torch.testing.assert_close(node_model(x, other), first)
    # Copies drop the cache (CSR tensors cannot be deep-copied) and rebuild it on use.
    copied = copy.deepcopy(node_model)
    assert copied.convs[0]._cached_graph is None
    torch.testing.assert_close(copied(x, edge_index), first)
    node_model.reset_parameters()
    assert node_model.convs[0]._cached_graph is None

    graph_model = GraphGCN(F_IN, 3, hidden=8, layers=2).eval()
    graph_model(x, edge_index)
    assert all(conv._cached_graph is None for conv in graph_model.convs)


# -- sparsity -------------------------------------------------------------------------------

def test_large_sparse_graph_never_goes_dense(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dense adjacency materialised")
    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)

    torch.manual_seed(0)
    n, e = 200_000, 800_000
    x, edge_index = torch.randn(n, 4), torch.randint(0, n, (2, e))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for model in (GCN(4, 3, hidden=8), GIN(4, 3, hidden=8), GAT(4, 3, hidden=4, heads=2)):
        out = model(x, edge_index)
        assert out.shape == (n, 3)
        out.mean().backward()
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    # A dense 200k x 200k float matrix would be 149 GiB; the sparse models need well under 2.
    assert grown_gib < 2.0


# -- training sanity ------------------------------------------------------------------------

def test_gcn_learns_a_planted_partition():
    torch.manual_seed(0)
    sizes, classes = [100, 100, 100], 3
    probs = [[0.06 if a == b else 0.004 for b in range(classes)] for a in range(classes)]
    edge_index = stochastic_blockmodel_graph(sizes, probs)
    y = torch.arange(classes).repeat_interleave(100)
    # Weakly informative features: a noisy class signal the graph has to denoise.
    x = 0.6 * F.one_hot(y, classes).float() @ torch.randn(classes, 16) + torch.randn(300, 16)
    train = torch.rand(300) < 0.3

    model = GCN(16, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(60):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x, edge_index)[train], y[train]).backward()
        optimizer.step()
    model.eval()
    pred = model(x, edge_index).argmax(-1)
    assert (pred[train] == y[train]).float().mean() > 0.9
    assert (pred[~train] == y[~train]).float().mean() > 0.8
