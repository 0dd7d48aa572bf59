"""Degree-Quant: protection schedule and mask, percentile ranges and EMA, the INT4/INT8 grid,
protected rows in training vs eval, models and their bits, config errors, and the graph
context hook leaving other quantizers alone."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch_geometric.data import Batch, Data

from conftest import adversarial_values, fused_and_plain, same_bits
from gnnq.cli import config_dir
from gnnq.config import ModelConfig, validate
from gnnq.data.task import Task
from gnnq.errors import GnnqError
from gnnq.models import build_model
from gnnq.quant import build_quantizers
from gnnq.quant.base import BitCost, GraphContext, Quantizer, RoleQuantizers, share_graph
from gnnq.quant.cost import average_bits, compression_ratio
from gnnq.quant.degree_quant import (ActivationQuantizer, WeightQuantizer, _FakeQuantize,
                                     fake_quantize, grid, percentile_range, protected_nodes,
                                     protection_probability, tail_order_statistics)


def activation(bits=8, clip=0.0, momentum=0.1, p_min=0.0, p_max=0.0, eval_ranges="ema",
               train_ranges="batch"):
    return ActivationQuantizer(bits, clip_fraction=clip, momentum=momentum, p_min=p_min,
                               p_max=p_max, eval_ranges=eval_ranges, train_ranges=train_ranges)


def star(num_leaves: int) -> torch.Tensor:
    """Edges both ways between hub 0 and every leaf: in-degree num_leaves for the hub, 1 for
    each leaf (so with p_min 0 and p_max 1 the hub is always protected, a leaf never)."""
    leaves = torch.arange(1, num_leaves + 1)
    hub = torch.zeros(num_leaves, dtype=torch.long)
    return torch.stack([torch.cat([leaves, hub]), torch.cat([hub, leaves])])


# -- protection ------------------------------------------------------------------------------
def test_probability_interpolates_by_in_degree_rank():
    deg = torch.tensor([0, 1, 1, 2, 5, 9])
    p = protection_probability(deg, 0.1, 0.6)
    # Ranks (nodes with a lower in-degree) 0, 1, 1, 3, 4, 5: ties share one, top rank is 5.
    assert torch.allclose(p, 0.1 + 0.5 * torch.tensor([0, 1, 1, 3, 4, 5]) / 5)
    assert p[deg.argmin()] == pytest.approx(0.1) and p[deg.argmax()] == pytest.approx(0.6)
    assert torch.equal(protection_probability(torch.full((4,), 3), 0.1, 0.6),
                       torch.full((4,), 0.1))  # one in-degree: nothing to rank


def test_each_graph_of_a_mini_batch_ranks_its_own_nodes():
    deg = torch.tensor([0, 1, 1, 2, 5, 9, 30, 3, 3, 100])
    batch = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    p = protection_probability(deg, 0.1, 0.6, batch)
    # Graph 0 as above; graph 1: ranks 2, 0, 0 (top 2); graph 2: a single node, rank 0.
    want = torch.tensor([0, 1, 1, 3, 4, 5]) / 5
    assert torch.allclose(p[:6], 0.1 + 0.5 * want)
    assert torch.allclose(p[6:9], torch.tensor([0.6, 0.1, 0.1]))
    assert p[9] == pytest.approx(0.1)


def test_graph_models_hand_the_batch_to_the_protection_mask(monkeypatch):
    from gnnq.quant import degree_quant

    seen = []
    real = degree_quant.protection_probability

    def spy(in_degree, p_min, p_max, batch=None):
        seen.append(batch)
        return real(in_degree, p_min, p_max, batch)

    monkeypatch.setattr(degree_quant, "protection_probability", spy)
    task, batch = graph_task()
    for name in ("gin", "gcn"):
        seen.clear()
        model = build_model(ModelConfig(name=name, layers=2, hidden=8), task,
                            build_quantizers({"name": "degree_quant", "bits": 4}))
        model.train()
        model(batch.x, batch.edge_index, batch.batch)
        assert len(seen) == 2 and all(torch.equal(b, batch.batch) for b in seen), name


def test_mask_frequency_follows_the_schedule_and_is_drawn_once_per_pass():
    torch.manual_seed(0)
    edge_index, n = torch.tensor([[1, 2, 3, 2, 3, 3], [0, 0, 0, 1, 1, 2]]), 4
    # In-degrees 3, 2, 1, 0: ranks 3, 2, 1, 0 -> p = 0.8, 0.55, 0.3, 0.05 (p_min 0.05, p_max 0.8).
    expected = torch.tensor([0.8, 0.55, 0.3, 0.05])
    samples = 4000
    counts = torch.zeros(n)
    for _ in range(samples):
        graph = GraphContext(edge_index, n)
        mask = protected_nodes(graph, 0.05, 0.8)
        assert protected_nodes(graph, 0.05, 0.8) is mask  # one draw per pass (and layer)
        counts += mask
    freq = counts / samples
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / samples)
    assert torch.all((freq - expected).abs() <= tolerance), freq


def test_quantizers_of_one_layer_share_the_mask_and_a_new_pass_redraws_it():
    torch.manual_seed(0)
    n = 400
    layer = nn.ModuleDict({"a": activation(p_min=0.5, p_max=0.5), "b": activation(p_min=0.5,
                                                                                  p_max=0.5)})
    edge_index = torch.randint(0, n, (2, 4 * n))
    x = torch.randn(n, 3)
    passthrough = []
    for _ in range(2):
        share_graph(layer, edge_index, n)
        rows = [(q(x) == x).all(dim=1) for q in (layer["a"], layer["b"])]
        assert torch.equal(rows[0], rows[1])  # the same nodes protected in both
        passthrough.append(rows[0])
    assert not torch.equal(passthrough[0], passthrough[1])
    assert 0.35 < passthrough[0].float().mean() < 0.65


# -- protected rows --------------------------------------------------------------------------
def test_protected_rows_pass_unchanged_in_training_and_all_are_quantized_in_eval():
    edge_index, n = star(6), 7
    q = activation(bits=4, p_min=0.0, p_max=1.0)  # the hub is always protected, leaves never
    x = torch.randn(n, 5) * 3
    q.train()
    q.set_graph(GraphContext(edge_index, n))
    out = q(x)
    quantized = fake_quantize(x, *percentile_range(x, 0.0), 4)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1:], quantized[1:]) and not torch.equal(out[1:], x[1:])
    # Per-edge rows follow their target node: edges into the hub pass, the others don't.
    messages = torch.randn(edge_index.size(1), 5)
    q.set_graph(GraphContext(edge_index, n))
    out = q(messages, edge_index[1])
    into_hub = edge_index[1] == 0
    assert torch.equal(out[into_hub], messages[into_hub])
    assert (out[~into_hub] != messages[~into_hub]).any(dim=1).all()
    # Eval: no protection, every row on the grid (EMA ranges).
    q.eval()
    q.set_graph(GraphContext(edge_index, n))
    out = q(x)
    assert torch.equal(out, fake_quantize(x, q.lo, q.hi, 4))
    assert q.bit_cost() == BitCost(elements=35.0, bits=35.0 * 4)


def test_context_is_used_for_one_pass_only():
    q = activation(p_min=1.0, p_max=1.0).train()
    x = torch.randn(5, 2)
    q.set_graph(GraphContext(torch.tensor([[0], [1]]), 5))
    assert torch.equal(q(x), x)  # everything protected
    assert not torch.equal(q(x), x)  # the next pass had no share_graph: nothing protected


# -- ranges ----------------------------------------------------------------------------------
def test_percentile_range_is_the_order_statistic_of_a_known_tensor():
    x = torch.arange(1001.0)[torch.randperm(1001)].view(7, 143)
    lo, hi = percentile_range(x, 0.01)  # j = floor(0.01 * 1000) = 10 values outside each end
    assert (lo.item(), hi.item()) == (10.0, 990.0)
    assert [float(v) for v in percentile_range(x, 0.0)] == [0.0, 1000.0]
    y = torch.randn(4999)
    for q in (0.001, 0.01, 0.1):
        lo, hi = percentile_range(y, q)
        assert lo == torch.quantile(y, q, interpolation="lower")
        assert hi == torch.quantile(y, 1 - q, interpolation="higher")


def test_percentile_range_never_collapses_on_sparse_binary_features():
    """CiteSeer-like bag of words: 0.8 % ones, so both 1 % order statistics are 0; the range
    falls back to min/max instead of quantizing every word to 0."""
    torch.manual_seed(0)
    x = (torch.rand(300, 500) < 0.008).float()
    assert [float(v) for v in percentile_range(x, 0.01)] == [0.0, 1.0]
    dense = (torch.rand(300, 500) < 0.05).float()  # enough ones: the percentile itself
    assert [float(v) for v in percentile_range(dense, 0.01)] == [0.0, 1.0]
    assert [float(v) for v in percentile_range(torch.full((50,), 3.0), 0.01)] == [3.0, 3.0]


@pytest.mark.parametrize("kind", ["normal", "sparse", "ties"])
def test_sampled_tail_order_statistics_are_exact_on_large_tensors(kind):
    torch.manual_seed(1)
    n = 300_001
    x = {"normal": torch.randn(n), "sparse": (torch.rand(n) < 0.013) * torch.rand(n),
         "ties": torch.randint(0, 4, (n,)).float()}[kind]
    s = x.sort().values
    for k in (1, 7, 301, 3001, 40_000):
        assert tail_order_statistics(x, k) == (s[k - 1], s[n - k])


def test_sampled_tail_order_statistics_see_every_channel(monkeypatch):
    """A [rows, 64] activation whose channels differ in scale (every 16th thrice the others),
    the shape of GIN's hidden tensors: a stride that divides the width samples only some
    channels, misplaces its threshold and falls back to searching all 1.3M values."""
    torch.manual_seed(2)
    scale = 1.0 + 2.0 * (torch.arange(64) % 16 == 0)
    x = (torch.randn(20_000, 64) * scale).reshape(-1)
    searched = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk",
                        lambda t, *a, **kw: searched.append(t.numel()) or topk(t, *a, **kw))
    s = x.sort().values
    assert tail_order_statistics(x, 12_800) == (s[12_799], s[-12_800])
    assert max(searched) < x.numel() // 10


def test_training_passes_update_the_ema_and_eval_uses_it():
    q = activation(bits=8, clip=0.0, momentum=0.25).train()
    q(torch.tensor([[-1.0, 3.0]]))
    assert (q.lo.item(), q.hi.item()) == (-1.0, 3.0)  # the first pass sets the range
    q(torch.tensor([[-5.0, 7.0]]))
    assert q.lo.item() == pytest.approx(0.75 * -1 + 0.25 * -5)
    assert q.hi.item() == pytest.approx(0.75 * 3 + 0.25 * 7)
    q.eval()
    x = torch.tensor([[-4.0, -1.0, 0.5, 6.0]])
    assert torch.equal(q(x), fake_quantize(x, q.lo, q.hi, 8))
    step = grid(q.lo, q.hi, 8)[0].item()
    assert q(x)[0, -1] == pytest.approx(q.hi.item(), abs=step / 2)  # clipped to the EMA range
    before = torch.stack([q.lo, q.hi])
    q(x * 10)
    assert torch.equal(torch.stack([q.lo, q.hi]), before)  # eval never moves the range
    dynamic = activation(bits=8, eval_ranges="dynamic").eval()
    dynamic.load_state_dict(q.state_dict())
    assert torch.equal(dynamic(x), fake_quantize(x, *percentile_range(x, 0.0), 8))


@pytest.mark.parametrize("train_ranges", ["batch", "ema"])
def test_training_quantizes_with_its_own_or_the_updated_range(train_ranges):
    q = activation(bits=4, momentum=0.25, train_ranges=train_ranges).train()
    q(torch.tensor([[-1.0, 3.0]]))
    x = torch.tensor([[-5.0, -1.0, 2.0, 7.0]])
    out = q(x)
    expected = (q.lo, q.hi) if train_ranges == "ema" else (torch.tensor(-5.0), torch.tensor(7.0))
    assert torch.equal(out, fake_quantize(x, *expected, 4))
    assert (out[0, -1] < 7.0) == (train_ranges == "ema")  # the EMA (-2, 4) clips 7


# -- the grid --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_grid_codes_and_error_within_half_a_step(bits):
    torch.manual_seed(0)
    lo, hi = torch.tensor(-0.7), torch.tensor(2.3)
    x = torch.linspace(-0.7, 2.3, 5001)
    scale, zero = grid(lo, hi, bits)
    assert scale.item() == pytest.approx(3.0 / (2 ** bits - 1))
    out = fake_quantize(x, lo, hi, bits)
    codes = out / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2 ** bits - 1
    assert out.unique().numel() <= 2 ** bits
    assert (out - x).abs().max() <= scale / 2 + 1e-6
    assert fake_quantize(torch.zeros(3), lo, hi, bits).eq(0).all()  # zero is exact
    outside = fake_quantize(torch.tensor([-9.0, 9.0]), lo, hi, bits)
    assert (outside - torch.tensor([-0.7, 2.3])).abs().max() <= scale / 2 + 1e-6


def test_straight_through_gradient_is_zero_only_where_clipped():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 4.0], requires_grad=True)
    fake_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 4).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0]))
    x.grad = None
    fake_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 4, masked=False).sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_ops_give_pytorchs_results_bit_for_bit(monkeypatch, bits):
    x = adversarial_values()

    def compute():
        leaf = x.clone().reshape(-1, 1).requires_grad_()
        lo, hi = percentile_range(leaf[:-3], 0.001)  # the finite values
        out = fake_quantize(leaf, lo, hi, bits, kept=torch.tensor([0, 7, 250_020]))
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        low, high = tail_order_statistics(leaf.detach()[:-3].reshape(-1), 301)
        results = [lo, hi, out.detach(), leaf.grad, low, high]
        # Grids where x itself falls halfway between codes, and the degenerate ones.
        for scale, zero in ((1.0, 0.0), (0.5, 3.0), (torch.finfo().tiny, 0.0), (1.0, -0.0)):
            leaf = x.clone().requires_grad_()
            out = _FakeQuantize.apply(leaf, torch.tensor(scale), torch.tensor(zero),
                                      2 ** bits - 1, True, None)
            out.backward(torch.ones_like(out))
            results += [out.detach(), leaf.grad]
        return results

    fused, plain = fused_and_plain(monkeypatch, compute)
    for a, b in zip(fused, plain):
        assert same_bits(a, b)


def test_fused_ops_train_a_model_to_the_same_weights(monkeypatch):
    quant = {"name": "degree_quant", "bits": 4, "p_min": 0.2, "p_max": 0.6}

    def compute():
        task, batch = graph_task()
        model = build_model(ModelConfig(name="gin", hidden=16, layers=2), task,
                            build_quantizers(quant))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):  # protection draws and EMA ranges included
            optimizer.zero_grad()
            model(batch.x, batch.edge_index, batch.batch).square().sum().backward()
            optimizer.step()
        return model.state_dict()

    fused, plain = fused_and_plain(monkeypatch, compute)
    assert all(torch.equal(fused[k], plain[k]) for k in plain)


def test_kept_rows_pass_unchanged_with_their_whole_gradient():
    x = torch.tensor([[-3.0, 0.5], [4.0, 0.2], [-3.0, 0.9]], requires_grad=True)
    out = fake_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 4, kept=torch.tensor([1]))
    assert torch.equal(out[1], x[1].detach())
    assert not torch.equal(out[[0, 2]], x[[0, 2]].detach())
    out.sum().backward()
    # Clipped elements get no gradient, except in the kept (protected) row.
    assert torch.equal(x.grad, torch.tensor([[0.0, 1], [1, 1], [0, 1]]))


def test_weights_use_their_min_max_and_never_the_graph():
    w = torch.randn(6, 4)
    q = WeightQuantizer(4, True)
    assert not q.uses_graph and not q.counts_in_average
    assert torch.equal(q(w), fake_quantize(w, w.min(), w.max(), 4))


# -- models and bits -------------------------------------------------------------------------
def node_task(num_nodes=40, features=6, classes=3):
    torch.manual_seed(0)
    g = Data(x=torch.randn(num_nodes, features),
             edge_index=torch.randint(0, num_nodes, (2, 4 * num_nodes)),
             y=torch.randint(0, classes, (num_nodes,)))
    return Task("toy", "node", features, classes, "acc", split=None, graph=g)


def graph_task(features=4, classes=2):
    torch.manual_seed(0)
    graphs = [Data(x=torch.randn(n, features), edge_index=torch.randint(0, n, (2, 3 * n)))
              for n in (7, 9, 12, 5)]
    task = Task("toy_graphs", "graph", features, classes, "acc", split=None, graphs=graphs)
    return task, Batch.from_data_list(graphs)


def _run(model, *inputs):
    model.train()
    model(*inputs).square().sum().backward()
    trained_bits = average_bits(model)
    model.eval()
    with torch.no_grad():
        model(*inputs)
    return trained_bits


@pytest.mark.parametrize("name, level", [("gcn", "node"), ("gin", "node"), ("gat", "node"),
                                         ("gin", "graph"), ("gcn", "graph")])
@pytest.mark.parametrize("bits", [4, 8])
def test_models_train_and_report_their_bits(name, level, bits):
    quant = {"name": "degree_quant", "bits": bits, "p_min": 0.5, "p_max": 1.0}
    if level == "node":
        task = node_task()
        inputs = (task.graph.x, task.graph.edge_index)
    else:
        task, batch = graph_task()
        inputs = (batch.x, batch.edge_index, batch.batch)
    model = build_model(ModelConfig(name=name, hidden=8, layers=2), task,
                        build_quantizers(quant))
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    roles = {r for m in model.modules() if isinstance(m, RoleQuantizers) for r in m.by_role}
    expected = {"input", "weight", "feature", "message", "aggregate", "update"}
    assert expected | ({"attention", "score"} if name == "gat" else set()) == roles
    trained_bits = _run(model, *inputs)
    assert trained_bits > bits  # protected rows ran FP32 (and count 32 bits) in training
    assert all(p.grad is not None for n, p in model.named_parameters()
               if "weight" in n and p.requires_grad)
    assert average_bits(model) == bits  # inference: every node quantized
    assert compression_ratio(model) == pytest.approx(32 / bits)
    assert all(q.bit_cost() is not None for q in quantizers)


def test_raw_input_can_stay_fp32():
    task = node_task()
    for flag, has_input in ((True, True), (False, False)):
        model = build_model(ModelConfig(name="gcn"), task, build_quantizers(
            {"name": "degree_quant", "quantize_raw_input": flag}))
        assert model.convs[0].lin.q.has("input") == has_input
        assert model.convs[1].lin.q.has("input")


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("option, fragments", [
    ({"bits": 3}, ["quant.bits", "3", "4, 8"]),
    ({"p_min": 0.3, "p_max": 0.2}, ["quant.p_min", "0.3", "quant.p_max", "0.2", "p_min <= p_max"]),
    ({"p_max": 1.5}, ["quant.p_max", "1.5", "<= 1.0"]),
    ({"percentile": 0.5}, ["quant.percentile", "0.5", "< 0.5"]),
    ({"eval_ranges": "max"}, ["quant.eval_ranges", "'max'", "dynamic, ema"]),
    ({"train_ranges": "ewma"}, ["quant.train_ranges", "'ewma'", "batch, ema"]),
    ({"momentum": 0.0}, ["quant.momentum", "> 0.0"]),
    ({"foo": 1}, ["quant.foo", "p_max", "percentile"]),
])
def test_invalid_options_name_the_value_and_the_valid_choices(option, fragments):
    with pytest.raises(GnnqError) as err:
        build_quantizers({"name": "degree_quant", **option})
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_the_config_group_composes_and_its_overrides_are_checked():
    # In-process composition of conf/quant/degree_quant.yaml, as `gnnq train` does it (the
    # CLI's GnnqError -> clean message path is tested in test_cli.py).
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate(compose("train", overrides=["+quant=degree_quant"]))
        bad = validate(compose("train", overrides=["+quant=degree_quant", "quant.bits=3"]))
    factory = build_quantizers(cfg.quant)
    assert (factory.cfg.bits, factory.cfg.p_min, factory.cfg.p_max) == (8, 0.0, 0.1)
    assert cfg.strategy.name == "task_gradient"
    with pytest.raises(GnnqError, match=r"quant\.bits: 3\b.*4, 8"):
        build_quantizers(bad.quant)


# -- the hook leaves other quantizers alone ---------------------------------------------------
class _Halve(Quantizer):
    def forward(self, x):  # the old signature: no index
        return x / 2

    def bit_cost(self):
        return None


def test_quantizers_without_uses_graph_get_no_index_and_no_context():
    q = RoleQuantizers({"message": _Halve()})
    x = torch.ones(3, 2)
    assert torch.equal(q("message", x, index=torch.tensor([0, 1, 1])), x / 2)
    share_graph(q, torch.tensor([[0], [1]]), 2)  # nothing to hand a context to: no error
    assert math.isclose(float(q("message", x).sum()), 3.0)
