"""A²Q: the quantizer's grid and gradients, the penalty, Local Gradient, NNS, metrics, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data

from conftest import (adversarial_values, assert_clean_error, fused_and_plain, run_gnnq,
                      same_bits)
from gnnq.config import ModelConfig, StrategyConfig
from gnnq.data.task import Task
from gnnq.errors import GnnqError
from gnnq.models import QLinear, build_model
from gnnq.quant import build_quantizers
from gnnq.quant.a2q import A2QQuantizer, NNSQuantizer, _FakeQuantize
from gnnq.quant.a2q_analysis import spearman
from gnnq.quant.base import RoleQuantizers
from gnnq.quant.cost import average_bits, compression_ratio
from gnnq.train.strategies import build_strategy

KB = 8192


def quantizer(groups=1, bits=3.0, learn_bits=True, unsigned=False, step=0.5,
              bit_range=(1, 8), local=False, masked=True) -> A2QQuantizer:
    return A2QQuantizer(groups, 0, bits, learn_bits=learn_bits, bit_range=bit_range,
                        step_init=(step, 0.0), lr=(0.01, 0.1), local=local, masked_ste=masked,
                        unsigned=unsigned)


def nns_table(steps, bits=3.0) -> NNSQuantizer:
    table = NNSQuantizer(len(steps), bits, learn_bits=True, bit_range=(1, 8),
                         step_init=(0.0, 0.0), lr=(0.01, 0.1), unsigned=False)
    with torch.no_grad():
        table.step.copy_(torch.as_tensor(steps, dtype=torch.float).view(-1, 1))
    return table


def node_task(num_nodes=24, features=6, classes=3, nonnegative=False):
    torch.manual_seed(0)
    x = torch.randn(num_nodes, features)
    g = Data(x=x.abs() if nonnegative else x,
             edge_index=torch.randint(0, num_nodes, (2, 4 * num_nodes)),
             y=torch.randint(0, classes, (num_nodes,)))
    return Task("toy", "node", features, classes, "acc", split=None, graph=g)


# -- forward ---------------------------------------------------------------------------------
def test_signed_grid_clips_and_rounds_half_away_from_zero():
    q = quantizer(bits=3, step=0.5)  # levels -3..3
    x = torch.tensor([[-2.0, -0.76, -0.25, 0.25, 0.26, 0.74, 0.75, 1.6, 5.0]])
    expected = 0.5 * torch.tensor([[-3.0, -2, -1, 1, 1, 1, 2, 3, 3]])
    assert torch.equal(q(x), expected)
    assert int(q.unsigned) == 0


def test_unsigned_grid_on_non_negative_input_is_detected_once():
    q = quantizer(bits=2, step=1.0, unsigned=None)  # 2 effective bits: levels 0..3
    x = torch.tensor([[0.0, 0.4, 1.5, 2.6, 9.0]])
    assert torch.equal(q(x), torch.tensor([[0.0, 0, 2, 3, 3]]))
    assert int(q.unsigned) == 1
    q(-x)
    assert int(q.unsigned) == 1  # decided once, on the first pass


@pytest.mark.parametrize("raw, grid_bits", [(2.4, 2), (2.5, 2), (3.5, 4), (3.6, 4)])
def test_bits_round_to_nearest_even_in_forward_only(raw, grid_bits):
    q = quantizer(bits=raw, step=1.0)
    levels = 2 ** (grid_bits - 1) - 1
    out = q(torch.tensor([[100.0, -100.0]]))
    assert torch.equal(out, torch.tensor([[levels, -levels]], dtype=torch.float))
    assert q.bits.item() == pytest.approx(raw)  # the parameter itself is not rounded


# -- gradients -------------------------------------------------------------------------------
def _fake_quant(x, step, levels, masked=True):
    return _FakeQuantize.apply(x, step, levels, masked)


def test_step_gradient_matches_finite_differences_on_clipped_values():
    x = torch.tensor([[-3.0, 2.5, 4.0]], dtype=torch.float64)  # all beyond Q * s = 1.4
    step = torch.tensor([[0.2]], dtype=torch.float64, requires_grad=True)
    levels = torch.tensor([[7.0]], dtype=torch.float64)
    _fake_quant(x, step, levels).sum().backward()
    eps = 1e-6
    numeric = ((_fake_quant(x, step.detach() + eps, levels)
                - _fake_quant(x, step.detach() - eps, levels)).sum() / (2 * eps))
    assert step.grad.item() == pytest.approx(numeric.item(), rel=1e-6)


def test_step_gradient_inside_the_range_is_lsq_without_scale():
    x = torch.tensor([[0.33, -0.71]])
    step = torch.tensor([[0.2]], requires_grad=True)
    _fake_quant(x, step, torch.tensor([[7.0]])).sum().backward()
    ratio = x / 0.2
    code = torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)
    assert step.grad.item() == pytest.approx((code - ratio).sum().item(), rel=1e-5)


def test_bit_gradient_matches_finite_differences_of_the_clipped_values():
    # Clipped values are sign(x) * s * Q(b), Q(b) = 2^(b-1) - 1: smooth in b once the
    # rounding of b is taken straight through.
    x = torch.tensor([[-3.0, 0.1, 2.5, 4.0]], dtype=torch.float64)
    q = quantizer(bits=3.0, step=0.2)
    q.double()
    q(x).sum().backward()
    clipped = x.abs() > 3 * 0.2

    def clipped_sum(b):
        return (torch.sign(x) * 0.2 * (2.0 ** (b - 1) - 1))[clipped].sum()

    eps = 1e-6
    numeric = (clipped_sum(3.0 + eps) - clipped_sum(3.0 - eps)) / (2 * eps)
    assert q.bits.grad.item() == pytest.approx(numeric.item(), rel=1e-6)
    # the spec's closed form: sum over clipped values of sign(x) (Q + 1) ln2 s
    assert q.bits.grad.item() == pytest.approx((-1 + 1 + 1) * 4 * math.log(2) * 0.2, rel=1e-6)


def test_bit_gradient_reaches_the_parameter_through_rounding():
    q = quantizer(bits=2.8, step=0.1)  # grid bits 3: Q = 3, Q + 1 = 4
    x = torch.tensor([[1.0, 2.0, -5.0, 0.05]])
    q(x).sum().backward()
    assert q.bits.grad.item() == pytest.approx((1 + 1 - 1) * 4 * math.log(2) * 0.1, rel=1e-5)


@pytest.mark.parametrize("masked, expected", [(True, [0.0, 1.0, 0.0]),
                                              (False, [1.0, 1.0, 1.0])])
def test_input_gradient_is_straight_through(masked, expected):
    x = torch.tensor([[-9.0, 0.3, 9.0]], requires_grad=True)
    q = quantizer(bits=3, step=0.5, masked=masked)
    q(x).sum().backward()
    assert x.grad.tolist() == [expected]


def test_learned_bits_are_clamped_to_the_range():
    q = quantizer(groups=3, bits=4, bit_range=(1, 6), unsigned=None)
    with torch.no_grad():
        q.bits.copy_(torch.tensor([[-3.0], [0.2], [11.0]]))
    q(torch.randn(3, 4))  # signed input: a signed grid needs at least 2 bits
    assert q.bits.view(-1).tolist() == [2.0, 2.0, 6.0]
    q = quantizer(groups=2, bits=4, bit_range=(1, 6), unsigned=None)
    with torch.no_grad():
        q.bits.copy_(torch.tensor([[0.2], [7.0]]))
    q(torch.rand(2, 4))  # non-negative: 1 bit ({0, s}) is allowed
    assert q.bits.view(-1).tolist() == [1.0, 6.0]


# -- penalty ---------------------------------------------------------------------------------
def _a2q(**quant):
    return build_quantizers({"name": "a2q", **quant})


def _penalty_model(factory, task, bits):
    model = build_model(ModelConfig(name="gcn", hidden=4, dropout=0.0), task, factory)
    (q,) = [m for m in model.modules() if isinstance(m, A2QQuantizer) and m.learn_bits]
    with torch.no_grad():
        q.bits.copy_(torch.tensor(bits).view(-1, 1))
    model(task.graph.x, task.graph.edge_index)
    return model, q


def test_kb_penalty_value_and_gradient():
    task = node_task(num_nodes=4)
    factory = _a2q(memory_target_kb=0.001, penalty_weight=3.0, memory_dim=16)
    model, q = _penalty_model(factory, task, [1.2, 2.0, 2.9, 4.0])
    stored = q.bits.detach().view(-1) + 1  # post-ReLU input: unsigned, +1 sign bit
    memory = 16 * stored.sum() / KB
    penalty = factory.penalty(model)
    assert penalty.item() == pytest.approx(3.0 * (memory - 0.001).item() ** 2, rel=1e-5)
    penalty.backward()
    expected = 2 * 3.0 * (memory - 0.001) * 16 / KB
    assert torch.allclose(q.bits.grad.view(-1), expected.expand(4), rtol=1e-5)


@pytest.mark.parametrize("bits, budget", [([2.0, 2.0, 2.0, 2.0], 1.9),    # 0.1 above: ramp
                                          ([4.0, 4.0, 3.0, 3.0], 2.0),    # 1.5 above: linear
                                          ([1.0, 1.0, 2.0, 2.0], 2.0)])   # below: off
def test_budget_penalty_value_and_gradient(bits, budget):
    task = node_task(num_nodes=4)
    factory = _a2q(bit_budget=budget, penalty_weight=2.0, init_bits=4)
    model, q = _penalty_model(factory, task, bits)
    excess = max(sum(bits) / 4 - budget, 0.0)
    huber = excess ** 2 / 0.5 if excess < 0.25 else excess - 0.125
    slope = min(excess / 0.25, 1.0)
    penalty = factory.penalty(model)
    assert penalty.item() == pytest.approx(2.0 * 4 * huber, abs=1e-6)
    if excess > 0:
        penalty.backward()
        # each node: lambda * G * h'(excess) * 1/G, its share of the average
        assert torch.allclose(q.bits.grad.view(-1), torch.full((4,), 2.0 * slope), rtol=1e-5)


def test_no_penalty_without_budget_or_target():
    task = node_task()
    factory = _a2q(bit_budget=None)
    model, _ = _penalty_model(factory, task, [3.0] * 24)
    assert factory.penalty(model) is None


# -- Local Gradient --------------------------------------------------------------------------
def _gradients(strategy_name, task, factory):
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="gcn", hidden=8, dropout=0.0), task, factory)
    out = model(task.graph.x, task.graph.edge_index)
    loss = F.cross_entropy(out, task.graph.y)
    build_strategy(StrategyConfig(name=strategy_name)).backward(loss, model,
                                                                factory.penalty(model))
    return model, {n: (p.grad.clone() if p.grad is not None else None)
                   for n, p in model.named_parameters()}


def test_local_gradient_touches_only_quantizer_parameters():
    task = node_task(nonnegative=True)
    factory = _a2q(bit_budget=1.0)
    model, task_grads = _gradients("task_gradient", task, factory)
    _, local_grads = _gradients("local_gradient", task, factory)
    local = {f"{name}.{p}" for name, m in model.named_modules()
             if isinstance(m, A2QQuantizer) and m.local for p, _ in m.named_parameters()}
    assert local  # per-node feature steps and bits, XW steps
    for name, grad in task_grads.items():
        if name in local:
            assert not torch.allclose(grad, local_grads[name]), name
        else:
            assert torch.equal(grad, local_grads[name]), name


def test_local_error_gradient_is_the_spec_sign_of_error_rule():
    q = quantizer(groups=2, bits=2.0, step=0.3, local=True, masked=False)  # Q = 1
    x = torch.tensor([[0.2, 0.7, -1.9], [0.05, 0.4, 0.9]], requires_grad=True)
    q.train()
    out = q(x)
    (out * torch.tensor([5.0, -3.0, 2.0])).sum().backward(inputs=[x])
    q.local_error().backward()

    s, levels = 0.3, 1.0
    ratio = (x.detach() / s).clamp(-levels, levels)
    inside = x.detach().abs() <= levels * s
    error_sign = torch.sign(out.detach() - x.detach())
    d_step = torch.where(inside, torch.round(ratio) - ratio, torch.sign(x.detach()) * levels)
    d_bits = (~inside) * torch.sign(x.detach()) * (levels + 1) * math.log(2) * s
    assert torch.allclose(q.step.grad.view(-1), (error_sign * d_step).mean(dim=1))
    assert torch.allclose(q.bits.grad.view(-1), (error_sign * d_bits).mean(dim=1))
    # the input still gets the task gradient (identity straight-through here)
    assert torch.equal(x.grad, torch.tensor([[5.0, -3.0, 2.0], [5.0, -3.0, 2.0]]))


# -- fused CPU ops ---------------------------------------------------------------------------
# Steps where values fall halfway between codes (0.5, 1.0), the smallest one the quantizer
# allows, and drawn ones; levels of 1 to 16 bits.
GROUP_STEPS = [0.5, 1.0, torch.finfo().tiny, 0.013, 3.7, 0.21, 1e-3, 25.0]
GROUP_LEVELS = [1.0, 3.0, 7.0, 127.0, 32767.0, 1.0, 15.0, 65535.0]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("layout", ["per row", "per column", "one for all"])
def test_fused_ops_give_pytorchs_results_bit_for_bit(monkeypatch, layout, masked):
    x = adversarial_values().reshape(-1, 8)  # every column holds every kind of value
    rows, cols = x.shape
    shape = {"per row": (rows, 1), "per column": (1, cols), "one for all": (1, 1)}[layout]
    count = shape[0] * shape[1]
    steps = torch.tensor(GROUP_STEPS).repeat(count // 8 + 1)[:count].reshape(shape)
    levels = torch.tensor(GROUP_LEVELS).repeat(count // 8 + 1)[:count].reshape(shape)

    def compute():
        leaves = [t.clone().requires_grad_() for t in (x, steps, levels)]
        out = _FakeQuantize.apply(*leaves, masked)
        out.backward(torch.linspace(-2, 2, out.numel()).reshape(out.shape))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    fused, plain = fused_and_plain(monkeypatch, compute)
    for a, b in zip(fused, plain):
        assert same_bits(a, b)


@pytest.mark.parametrize("level", ["node", "graph"])
def test_fused_ops_train_a_model_to_the_same_weights(monkeypatch, level):
    """Node level: GCN, per-node quantizers and the Local Gradient; graph level: GIN with
    Nearest-Neighbor-Strategy tables and the memory penalty (the REDDIT-BINARY preset's)."""

    def compute():
        torch.manual_seed(0)
        if level == "node":
            task = node_task(nonnegative=True)
            inputs, target = (task.graph.x, task.graph.edge_index), task.graph.y
            factory, config = _a2q(bit_budget=2.0), ModelConfig(name="gcn", hidden=8)
        else:
            graphs = [Data(x=torch.randn(n, 4), edge_index=torch.randint(0, n, (2, 3 * n)),
                           y=torch.tensor([n % 2])) for n in (7, 9, 12, 5)]
            task = Task("toy_graphs", "graph", 4, 2, "acc", split=None, graphs=graphs)
            batch = Batch.from_data_list(graphs)
            inputs, target = (batch.x, batch.edge_index, batch.batch), batch.y
            factory = _a2q(memory_target_kb=0.01)
            config = ModelConfig(name="gin", hidden=16, layers=2, pooling="mean")
        model = build_model(config, task, factory)
        strategy = build_strategy(StrategyConfig(name="local_gradient"))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(*inputs), target)
            strategy.backward(loss, model, factory.penalty(model))
            optimizer.step()
        return model.state_dict()

    fused, plain = fused_and_plain(monkeypatch, compute)
    assert all(same_bits(fused[k], plain[k]) for k in plain)


# -- NNS -------------------------------------------------------------------------------------
def test_nns_selects_the_nearest_largest_level_on_an_unseen_graph():
    torch.manual_seed(0)
    table = nns_table(torch.rand(50))
    with torch.no_grad():
        table.bits.copy_(torch.randint(2, 6, (50, 1)).float())
    table.train()
    table(torch.randn(64, 8)).sum().backward()  # a training graph
    unseen = 3 * torch.randn(40, 8)
    table.eval()
    out = table(unseen)

    largest = table.step.view(-1) * (2.0 ** (table.bits.view(-1) - 1) - 1)
    wanted = unseen.abs().amax(dim=1)
    nearest = (wanted[:, None] - largest[None, :]).abs().argmin(dim=1)
    index = table.select(unseen)
    assert torch.allclose(largest[index], largest[nearest])  # the same level (ties aside)
    for i, k in enumerate(index.tolist()):
        row = quantizer(bits=table.bits[k].item(), step=table.step[k].item())(unseen[i:i + 1])
        assert torch.allclose(out[i], row[0])
    table.train()
    assert torch.equal(table(unseen), out)  # one rule in training and inference


def test_nns_gradients_scatter_into_the_table():
    table = nns_table([0.1, 0.2, 0.4, 0.8, 1.6])  # largest levels 0.3 0.6 1.2 2.4 4.8
    x = torch.tensor([[0.6, -0.1], [0.65, 0.2], [5.0, 1.0]])  # entries 1, 1 and 4
    table(x).sum().backward()
    assert (table.step.grad.view(-1) != 0).tolist() == [False, True, False, False, True]
    single = quantizer(bits=3.0, step=0.2)
    single(x[:2]).sum().backward()
    assert table.step.grad[1].item() == pytest.approx(single.step.grad.item())


def test_placement_node_gcn_and_graph_gin():
    task = node_task()
    model = build_model(ModelConfig(name="gcn", hidden=8), task, _a2q())
    roles = {n: type(m).__name__ for n, m in model.named_modules()
             if isinstance(m, A2QQuantizer)}
    assert roles == {"convs.0.lin.q.weight": "A2QQuantizer",
                     "convs.0.lin.q.feature": "A2QQuantizer",
                     "convs.1.lin.q.input": "A2QQuantizer",
                     "convs.1.lin.q.weight": "A2QQuantizer",
                     "convs.1.lin.q.feature": "A2QQuantizer"}
    learned = model.convs[1].lin.q.input
    assert learned.learn_bits and learned.groups == 24 and learned.local

    graphs = [Data(x=torch.rand(5, 1), edge_index=torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]]),
                   y=torch.tensor([0])) for _ in range(3)]
    gtask = Task("toy", "graph", 1, 2, "acc", split=None, graphs=graphs)
    model = build_model(ModelConfig(name="gin", hidden=8, layers=2), gtask,
                        _a2q(nns_table_size=7))
    tables = {n for n, m in model.named_modules() if isinstance(m, NNSQuantizer)}
    assert tables == {"convs.0.nn.2.q.input", "convs.1.nn.0.q.input", "convs.1.nn.2.q.input",
                      "head.0.q.input", "head.1.q.input"}  # the degree feature stays FP32
    assert all(model.get_submodule(n).groups == 7 for n in tables)
    assert not model.convs[1].q.input.learn_bits  # GIN's per-channel XW


def test_uniform_bits_ablation_keeps_init_bits_and_counts_them():
    task = node_task()
    model = build_model(ModelConfig(name="gcn", hidden=8), task,
                        _a2q(learn_bits=False, init_bits=2, bit_budget=1.0))
    features = model.convs[1].lin.q.input
    assert not features.learn_bits and "bits" not in dict(features.named_parameters())
    assert _a2q(learn_bits=False).penalty(model) is None
    model(task.graph.x, task.graph.edge_index)
    assert average_bits(model) == 2.0  # the budget does not lower fixed bits


@pytest.mark.parametrize("rule", ["lsq", "official"])
def test_weight_steps_start_from_the_weights_by_default(rule):
    task = node_task()
    model = build_model(ModelConfig(name="gcn", hidden=8), task,
                        _a2q(weight_step_init=rule))
    lin = model.convs[0].lin
    drawn = lin.q.weight.step.detach().clone()
    model(task.graph.x, task.graph.edge_index)
    model(task.graph.x, task.graph.edge_index)  # the second pass keeps the first one's steps
    if rule == "lsq":  # LSQ: 2 mean|w| / sqrt(Q) per output channel, Q = 7 at 4 bits
        expected = 2 * lin.weight.detach().abs().mean(dim=1, keepdim=True) / math.sqrt(7)
        assert torch.allclose(lin.q.weight.step, expected)
    else:
        assert torch.equal(lin.q.weight.step.detach(), drawn)


# -- metrics ---------------------------------------------------------------------------------
def test_avg_bits_and_compression_on_known_bits():
    linear = QLinear(3, 2, quantizers=RoleQuantizers({
        "input": quantizer(groups=4, bits=1.0, unsigned=None),  # non-negative: unsigned grid
        "weight": quantizer(groups=2, bits=4.0, learn_bits=False)}))
    with torch.no_grad():
        linear.q.input.bits.copy_(torch.tensor([[1.0], [2.0], [3.0], [6.0]]))
    linear(torch.rand(4, 3))
    assert average_bits(linear) == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    bits = 3 * (1 + 2 + 3 + 6) + 6 * 4
    assert compression_ratio(linear) == pytest.approx(32 * (12 + 6) / bits)


def test_spearman_with_ties():
    import numpy as np

    assert spearman(np.array([1, 2, 2, 3]), np.array([10, 20, 20, 40])) == pytest.approx(1.0)
    assert math.isnan(spearman(np.array([1, 1]), np.array([1, 2])))


# -- config and CLI --------------------------------------------------------------------------
@pytest.mark.parametrize("quant, fragments", [
    ({"min_bits": 9, "max_bits": 2}, ["quant.min_bits", "quant.max_bits", "1..16"]),
    ({"foo": 1}, ["quant.foo", "bit_budget", "min_bits"]),
    ({"lr": {"bitz": 1}}, ["quant.lr.bitz", "bits", "feature"]),
    ({"ste": "soft"}, ["quant.ste", "identity", "masked"]),
    ({"bit_budget": 12}, ["quant.bit_budget", "<= 8"]),
    ({"init_bits": 12}, ["quant.init_bits: 12", "1..8", "learn_bits=false"]),
])
def test_bad_options_name_the_key(quant, fragments):
    with pytest.raises(GnnqError) as err:
        _a2q(**quant)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_local_gradient_without_local_quantizers_is_the_task_gradient():
    model = torch.nn.Linear(2, 1)
    loss = model(torch.ones(1, 2)).sum()
    build_strategy(StrategyConfig(name="local_gradient")).backward(loss, model)
    assert torch.equal(model.weight.grad, torch.ones(1, 2))


def test_cli_train_a2q_end_to_end(tmp_path):
    proc = run_gnnq("train", "+quant=a2q", "dataset=synthetic", "trainer.epochs=3",
                    "tracking=none", "trainer.progress=none", f"hydra.run.dir={tmp_path}/out",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 1 <= summary["metrics"]["avg_bits"] <= 8
    assert summary["metrics"]["compression_ratio"] > 1
    assert (tmp_path / "out" / "analysis" / "bit_histograms.png").exists()
    assert "avg_bits" in proc.stdout


def test_cli_bad_quant_values(tmp_path):
    proc = run_gnnq("train", "+quant=a2q", "quant.min_bits=9", "quant.max_bits=2",
                    "dataset=synthetic", "tracking=none", f"hydra.run.dir={tmp_path}/out",
                    cwd=tmp_path)
    assert_clean_error(proc, "quant.min_bits", "quant.max_bits", "1..16")
    proc = run_gnnq("train", "+quant=a2q", "+quant.foo=1", "dataset=synthetic",
                    "tracking=none", f"hydra.run.dir={tmp_path}/out2", cwd=tmp_path)
    assert_clean_error(proc, "quant.foo", "bit_budget", "nns_table_size")
