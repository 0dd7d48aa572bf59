"""Smoothness-aware quantization: the QLR quantizer (grid, BT/BT*, range search, gradients),
SMP propagation (APPNP at lambda = 0, incidence matrix, multiplier, exact correction,
sparsity), the model, the factory on every architecture, metrics and config errors."""

from __future__ import annotations

import copy
import resource

import pytest
import scipy.stats
import torch
from torch_geometric.data import Data
from torch_geometric.nn import APPNP
from torch_geometric.utils import to_dense_adj, to_undirected

from conftest import adversarial_values, fused_and_plain, same_bits
from gnnq.config import ModelConfig, StrategyConfig, TrainerConfig
from gnnq.data.task import Task
from gnnq.errors import GnnqError
from gnnq.models import SMP, build_model, gcn_norm
from gnnq.models.smp_prop import (SMPProp, change_energy, multiplier_step,
                                  normalized_incidence)
from gnnq.quant import build_quantizers
from gnnq.quant import base as quant_base
from gnnq.quant.base import Quantizer, RoleQuantizers, csr_values, to_csr
from gnnq.quant.smoothness import (QLRQuantizer, make_grid, quantize_codes,
                                   sample_skewness)
from gnnq.quant import smoothness as smoothness_module
from gnnq.quant.cost import average_bits, compression_ratio
from gnnq.train.strategies import build_strategy


def small_graph(n=30, edges=90, seed=0):
    torch.manual_seed(seed)
    return to_undirected(torch.randint(0, n, (2, edges)), num_nodes=n)


def node_task(n=30, features=6, classes=3):
    torch.manual_seed(0)
    g = Data(x=torch.rand(n, features), edge_index=small_graph(n),
             y=torch.randint(0, classes, (n,)))
    return Task("toy", "node", features, classes, "acc", split=None, graph=g)


def smoothness(**quant):
    return build_quantizers({"name": "smoothness", **quant})


def dense_operators(edge_index, n):
    loops, weight = gcn_norm(edge_index, n)
    adj = to_dense_adj(loops, edge_attr=weight, max_num_nodes=n)[0]
    return adj, torch.eye(n) - adj


# -- the QLR grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_codes_lie_in_range_and_are_integers(bits):
    q = QLRQuantizer(bits)
    x = 3 * torch.randn(500) + 1
    q(x)
    codes = q.codes(100 * x)  # far outside the range too: clipped to the grid
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    assert torch.equal(codes, codes.round())
    assert codes.max() == 2 ** bits - 1 and codes.min() == 0


@pytest.mark.parametrize("truncation", ["bt", "btstar"])
def test_bt_codes_lie_on_the_four_level_grid(truncation):
    q = QLRQuantizer(2, truncation=truncation)
    x = torch.distributions.Exponential(1.0).sample((2000,))  # right-skewed
    out = q(x)
    codes = q.codes(x)
    assert set(codes.unique().tolist()) <= {0.0, 85.0, 170.0, 255.0}
    assert len(set(codes.unique().tolist())) >= 3
    assert out.unique().numel() <= 4
    if truncation == "btstar":
        assert int(q.skew) == round(float(scipy.stats.skew(x.numpy()))) == 2


def test_btstar_shifts_the_rounding_thresholds_by_the_skewness():
    grid = make_grid(torch.tensor(0.0), torch.tensor(255.0), torch.tensor(1.0), 255)  # s = 1
    x = torch.tensor([38.0, 40.0, 42.0, 45.0, 126.0, 130.0])
    bt, _ = quantize_codes(x, grid, "bt")          # thresholds at 42.5 and 127.5
    star, _ = quantize_codes(x, grid, "btstar", skew=3)  # moved down by 3 codes
    assert bt.tolist() == [0, 0, 0, 85, 85, 170]
    assert star.tolist() == [0, 85, 85, 85, 170, 170]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantization_error_is_at_most_half_a_step_inside_the_range(bits):
    q = QLRQuantizer(bits)
    torch.manual_seed(1)
    x = torch.randn(4000)
    out = q(x)
    grid = make_grid(q.low, q.high, q.alpha.detach(), 2 ** bits - 1)
    inside = (x >= grid.low) & (x <= grid.high)
    assert inside.sum() > 100
    err = (out - x).abs()[inside]
    assert err.max() <= grid.scale / 2 + 1e-6
    # and a value exactly on the grid comes back unchanged
    on_grid = (torch.arange(2 ** bits) - grid.zero) * grid.scale
    torch.testing.assert_close(q.eval()(on_grid), on_grid)


def test_zero_is_exact_and_range_contains_zero():
    q = QLRQuantizer(4)
    x = torch.tensor([0.0, 0.5, 1.0, 3.0])  # non-negative: m_c = 0
    out = q(x)
    assert out[0] == 0
    grid = make_grid(q.low, q.high, q.alpha.detach(), 15)
    assert grid.low == 0 and grid.zero == 0


def test_range_search_picks_the_error_minimising_alpha_plus_the_post_rule():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000), torch.tensor([300.0])])  # one outlier: small alpha wins

    def error(alpha, bits):
        grid = make_grid(x.min(), x.max(), torch.tensor(alpha), 2 ** bits - 1)
        code, _ = quantize_codes(x, grid)
        return ((code - grid.zero) * grid.scale - x).abs().mean().item()

    q = QLRQuantizer(4)
    q(x)
    grid4 = [0.02 * k for k in range(1, 51)]
    best = min(grid4, key=lambda a: error(a, 4))
    assert best < 0.1  # so the official +0.1 applies
    assert q.alpha.item() == pytest.approx(best + 0.1)
    q2 = QLRQuantizer(2)
    q2(x)
    best2 = min([0.1 * k for k in range(1, 11)], key=lambda a: error(a, 2))
    assert q2.alpha.item() == pytest.approx(best2 + (0.1 if best2 < 0.1 else 0.0))
    assert q2.alpha.item() >= 0.1


def test_btstar_post_rule_lifts_alpha_below_one_half():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000), torch.tensor([60.0])])
    q = QLRQuantizer(2, truncation="btstar")
    q(x)
    assert 0.2 <= q.alpha.item() <= 1.0 + 1e-6


def test_evaluation_reuses_the_last_training_range():
    q = QLRQuantizer(4)
    q(torch.linspace(-1, 1, 100))
    alpha = q.alpha.item()
    q.eval()
    out = q(torch.tensor([5.0, -5.0, 0.3]))
    assert q.low.item() == -1 and q.high.item() == 1   # not re-observed in eval
    assert out[0].item() == pytest.approx(alpha * 1.0, abs=0.15)  # clipped at the old range
    q.train()
    q(torch.tensor([5.0, -5.0]))
    assert q.high.item() == 5                          # training observes every call


def test_skewness_matches_scipy():
    torch.manual_seed(0)
    x = torch.distributions.Gamma(0.3, 1.0).sample((3000,))
    assert sample_skewness(x) == round(float(scipy.stats.skew(x.numpy())))
    assert sample_skewness(torch.ones(10)) == 0


# -- fused CPU ops --------------------------------------------------------------------------
@pytest.mark.parametrize("bits, truncation", [(8, "none"), (4, "none"), (2, "none"),
                                              (2, "bt"), (2, "btstar")])
def test_fused_ops_give_pytorchs_results_bit_for_bit(monkeypatch, bits, truncation):
    x = adversarial_values()

    def compute():
        results = []
        # A range search's grid, unit grids (x itself halfway between codes) and a zero-wide one.
        for low, high, alpha in ((-1.3, 2.9, 0.83), (0.0, 255.0, 1.0), (-7.0, 8.0, 1.0),
                                 (0.0, 0.0, 1.0)):
            q = QLRQuantizer(bits, truncation=truncation)
            q.low.fill_(low), q.high.fill_(high), q.skew.fill_(3)
            q.observed.fill_(True), q.initialized.fill_(True)
            with torch.no_grad():
                q.alpha.fill_(alpha)
            # Training (observing the range: finite values only) and evaluation.
            for training, values in ((True, x[:-3]), (False, x)):
                q.train(training)
                leaf = values.clone().requires_grad_()
                out = q(leaf)
                if training:
                    out.backward(torch.linspace(-1, 1, out.numel()))
                    results += [leaf.grad, q.alpha.grad]
                results.append(out.detach())
        return results

    fused, plain = fused_and_plain(monkeypatch, compute)
    for a, b in zip(fused, plain, strict=True):
        assert same_bits(a, b)


def test_fused_ops_train_smp_to_the_same_weights(monkeypatch):
    def compute():
        task = node_task(n=400)
        quantizers = build_quantizers({"name": "smoothness", "bits": 2, "truncation": "btstar"})
        model = build_model(ModelConfig(name="smp", hidden=16, steps=3), task, quantizers)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            model(task.graph.x, task.graph.edge_index).logsumexp(-1).sum().backward()
            optimizer.step()
        return model.state_dict()

    fused, plain = fused_and_plain(monkeypatch, compute)
    assert all(torch.equal(fused[k], plain[k]) for k in plain)


# -- gradients -------------------------------------------------------------------------------
def _fq(alpha_value, x, bits=4, truncation="none", alpha_grad="lsq", observe=(-1.0, 2.0),
        ste="identity"):
    """Fake-quantize ``x`` with a fixed observed range and a given alpha (no range search)."""
    q = QLRQuantizer(bits, truncation=truncation, alpha_grad=alpha_grad, ste=ste).double()
    q.low.fill_(observe[0]), q.high.fill_(observe[1])
    q.observed.fill_(True), q.initialized.fill_(True)
    q.eval()  # keep the fixed range
    with torch.no_grad():
        q.alpha.fill_(alpha_value)
    return q, q(x)


@pytest.mark.parametrize("truncation, bits", [("none", 4), ("none", 2), ("bt", 2)])
def test_range_gradient_matches_finite_differences_on_clipped_values(truncation, bits):
    # Clipped values are (q - z) s(alpha) with s proportional to alpha and z fixed: smooth.
    x = torch.tensor([-3.0, -2.5, 0.3, 0.71, 4.0, 9.0], dtype=torch.float64)
    weights = torch.tensor([1.0, -2.0, 0.0, 0.0, 3.0, 0.5], dtype=torch.float64)  # clipped only
    q, out = _fq(0.8, x, bits, truncation)
    (out * weights).sum().backward()
    eps = 1e-6
    plus = (_fq(0.8 + eps, x, bits, truncation)[1] * weights).sum()
    minus = (_fq(0.8 - eps, x, bits, truncation)[1] * weights).sum()
    numeric = ((plus - minus) / (2 * eps)).item()
    assert abs(numeric) > 0.5
    assert q.alpha.grad.item() == pytest.approx(numeric, rel=1e-6)


def test_range_gradient_inside_is_the_lsq_residual_and_code_form_differs():
    x = torch.tensor([0.33, -0.41, 1.07], dtype=torch.float64)  # inside [-0.8, 1.6]
    q, out = _fq(0.8, x)
    out.sum().backward()
    grid = make_grid(q.low, q.high, torch.tensor(0.8, dtype=torch.float64), 15)
    v = x / grid.scale + grid.zero
    expected = (grid.scale / 0.8 * (torch.round(v) - v)).sum().item()
    assert q.alpha.grad.item() == pytest.approx(expected, rel=1e-9)
    assert abs(expected) > 1e-3
    # The official backward works on the output: its inside residual is float noise.
    code_q, code_out = _fq(0.8, x, alpha_grad="code")
    code_out.sum().backward()
    assert abs(code_q.alpha.grad.item()) < 1e-9


@pytest.mark.parametrize("ste, expected", [("masked", [0.0, 1.0, 1.0, 0.0]),
                                           ("identity", [1.0, 1.0, 1.0, 1.0])])
def test_input_gradient_is_straight_through_and_masked_where_clipped(ste, expected):
    x = torch.tensor([-9.0, 0.3, 1.2, 9.0], dtype=torch.float64, requires_grad=True)
    _, out = _fq(0.8, x, ste=ste)
    out.sum().backward()
    assert x.grad.tolist() == expected


def test_code_form_sees_only_the_side_that_the_zero_point_rounding_pushed_out():
    # Range [-0.8, 1.84], s = 0.176: -m_c/s = 4.55 rounds up to z = 5, so the lowest level
    # -0.88 lies below m_c (flagged) while the highest, 1.76, lies inside (not flagged).
    x = torch.tensor([-9.0, 0.3, 1.2, 9.0], dtype=torch.float64, requires_grad=True)
    q, out = _fq(0.8, x, alpha_grad="code", observe=(-1.0, 2.3), ste="identity")
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]
    inside = out[1:].detach() / 0.176 + 5
    expected = -0.8 + (torch.round(inside) - inside).sum().item()
    assert q.alpha.grad.item() == pytest.approx(expected, abs=1e-9)
    lsq, lsq_out = _fq(0.8, x.detach(), observe=(-1.0, 2.3))
    lsq_out.sum().backward()
    assert abs(lsq.alpha.grad.item() - q.alpha.grad.item()) > 0.5  # the two forms differ


def bag_of_words(rows=400, cols=50, signed=False, density=0.05):
    """Mostly zeros like bag-of-words features; ``signed``: one negative entry, so the zeros
    are not the range's end."""
    torch.manual_seed(0)
    x = torch.rand(rows, cols) * (torch.rand(rows, cols) < density)
    if signed:
        x[0, 0] = -0.3
    return x


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("alpha_grad", ["lsq", "code"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sparse_inputs_quantize_on_their_nonzeros_as_the_dense_path_does(
        monkeypatch, bits, alpha_grad, signed):
    x = bag_of_words(signed=signed)
    runs = {}
    for path in ("dense", "support", "csr"):
        monkeypatch.setattr(quant_base, "SPARSE_MIN_ELEMENTS",
                            x.numel() + (path == "dense"))
        assert (smoothness_module.sparse_support(x, "none") is None) == (path == "dense")
        q = QLRQuantizer(bits, alpha_grad=alpha_grad)
        gradient = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        if path == "csr":
            trained = q(to_csr(x))
            values = csr_values(trained)
            (values * gradient[x != 0]).sum().backward()
            trained = trained.to_dense()
            q.eval()
            evaluated = q(to_csr(2 * x)).to_dense()
        else:
            trained = q(x)
            (trained * gradient).sum().backward()
            q.eval()
            evaluated = q(2 * x)
        runs[path] = (q.alpha.detach().clone(), q.alpha.grad.clone(), trained.detach(),
                      evaluated, q.low.clone(), q.high.clone())
    dense = runs["dense"]
    assert dense[4] == (-0.3 if signed else 0.0)      # the zeros are in the range
    # (the official form's gradient is float noise unless values fall below the range)
    assert dense[1].abs() > 1e-3 or (alpha_grad == "code" and not signed)
    for path in ("support", "csr"):
        alpha, grad, trained, evaluated, low, high = runs[path]
        assert torch.equal(alpha, dense[0])           # the range search picks the same α
        assert torch.allclose(grad, dense[1], rtol=1e-5, atol=1e-7)
        assert torch.equal(trained, dense[2]) and torch.equal(evaluated, dense[3])
        assert torch.equal(low, dense[4]) and torch.equal(high, dense[5])


def test_sparse_path_is_skipped_where_zeros_would_change(monkeypatch):
    monkeypatch.setattr(quant_base, "SPARSE_MIN_ELEMENTS", 1)
    x = torch.zeros(100)
    x[:3] = 1.0
    assert smoothness_module.sparse_support(x, "btstar") is None      # truncation moves 0
    assert smoothness_module.sparse_support(x.requires_grad_(), "none") is None  # input grad
    assert smoothness_module.sparse_support(torch.ones(100), "none") is None  # dense
    assert smoothness_module.sparse_support(torch.zeros(100), "none") is None  # nothing to do


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("truncation", ["bt", "btstar"])
def test_truncated_sparse_input_matches_dense_whether_or_not_zeros_move(truncation, signed):
    """Unsigned bag-of-words: 0 is the grid's first level and stays; with a negative entry
    it lies between levels, and BT/BT* move it (the output is then dense)."""
    x = bag_of_words(signed=signed)
    sparse_count = int((x != 0).sum())
    assert smoothness_module.sample_skewness(x[x != 0], x.numel()) == (
        smoothness_module.sample_skewness(x))
    runs = []
    for features in (x, to_csr(x)):
        q = QLRQuantizer(2, truncation=truncation)
        out = q(features)
        (csr_values(out) if out.layout == torch.sparse_csr else out).sum().backward()
        runs.append((q.alpha.detach().clone(), q.alpha.grad.clone(), q.skew.clone(),
                     out.detach(), q.zero_image(q_grid(q), int(q.skew)).item()))
    dense, sparse = runs
    assert torch.equal(dense[0], sparse[0]) and torch.equal(dense[2], sparse[2])
    assert (sparse[3].layout == torch.sparse_csr) == (sparse[4] == 0)
    assert (sparse[4] == 0) == (not signed)
    sparse_out = sparse[3].to_dense() if sparse[3].layout == torch.sparse_csr else sparse[3]
    assert torch.equal(sparse_out, dense[3])
    if sparse[4] == 0:   # the gradient sums over the stored values only, in another order
        assert torch.allclose(dense[1], sparse[1], rtol=1e-5) and sparse_count < x.numel()


def q_grid(q):
    return smoothness_module.make_grid(q.low, q.high, q.alpha.detach(), q.grid_qmax)


def sparse_feature_models(monkeypatch, x, **quant):
    """Two copies of one SMP model on ``x``: the first takes it as sparse CSR, the second as
    it is (dense)."""
    task = node_task(n=x.size(0), features=x.size(1))
    task.graph.x = x
    factory = smoothness(**quant) if quant else None
    monkeypatch.setattr(quant_base, "SPARSE_MIN_ELEMENTS", x.numel())
    torch.manual_seed(3)
    sparse = build_model(ModelConfig(name="smp", hidden=8, steps=3), task, factory)
    dense = copy.deepcopy(sparse)
    dense.features = lambda features: features
    assert sparse.features(x).layout == torch.sparse_csr
    return task, sparse, dense


@pytest.mark.parametrize("quant", [{"bits": 4}, {}], ids=["int4", "fp32"])
def test_smp_on_sparse_features_is_the_dense_model(monkeypatch, quant):
    x = bag_of_words(rows=30, cols=50)
    task, sparse, dense = sparse_feature_models(monkeypatch, x, **quant)
    edge_index = task.graph.edge_index
    for model in (sparse, dense):
        model.eval()       # no dropout: the two draw differently
        model(x, edge_index).square().mean().backward()
    assert torch.allclose(sparse(x, edge_index), dense(x, edge_index), atol=1e-6)
    for (name, a), (_, b) in zip(sparse.named_parameters(), dense.named_parameters()):
        assert a.grad is not None, name
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-8), name
    sparse.train()     # in training the dropout keeps the zeros and drops stored values
    out = sparse(x, edge_index)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert sparse.features(x) is sparse.features(x)      # converted once
    x.mul_(2)                                            # an in-place change is seen
    assert torch.equal(sparse.features(x).to_dense(), x)


def test_sparse_features_never_densify_in_backward(monkeypatch):
    """PyTorch's own CSR backward forms a dense gradient of the features' shape; ours must
    not (on Coauthor CS that is 125M entries a step)."""
    x = bag_of_words(rows=300, cols=4000, density=0.01)     # 4.8 MB dense, 12k stored
    task, sparse, _ = sparse_feature_models(monkeypatch, x, bits=4)
    sparse.train()
    out = sparse(x, task.graph.edge_index)
    with torch.profiler.profile(profile_memory=True) as prof:
        out.square().mean().backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < x.numel() * x.element_size() / 4
    assert sparse.lin1.q.by_role["input"].alpha.grad.abs() > 0


# -- SMP propagation -------------------------------------------------------------------------
def test_lambda_zero_reproduces_pyg_appnp_exactly():
    n = 30
    edge_index = small_graph(n)
    h = torch.randn(n, 5)
    reference = APPNP(K=10, alpha=0.1)(h, edge_index)
    appnp = SMPProp(10, alpha=0.1, propagation="appnp")(h, edge_index)
    frozen = SMPProp(10, alpha=0.1, propagation="smp", multiplier_init=0.0,
                     multiplier_lr=0.0)(h, edge_index)
    torch.testing.assert_close(appnp, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(frozen, reference, atol=1e-6, rtol=1e-5)
    # ...and the multiplier, when it moves, changes the result
    moving = SMPProp(10, alpha=0.1, threshold=1.0, multiplier_lr=1e-3)(h, edge_index)
    assert torch.isfinite(moving).all() and (moving - reference).abs().max() > 1e-3


def test_incidence_gram_is_the_normalized_laplacian():
    n = 25
    edge_index = small_graph(n, edges=70, seed=3)
    edge_index = torch.cat([edge_index, torch.tensor([[4], [4]])], dim=1)  # a self-loop
    b = normalized_incidence(edge_index, n).to_dense()
    _, laplacian = dense_operators(edge_index, n)
    torch.testing.assert_close(b.T @ b, laplacian, atol=1e-6, rtol=1e-5)
    assert b.size(0) == (to_undirected(edge_index)[0] > to_undirected(edge_index)[1]).sum()
    delta = torch.randn(n, 4)
    torch.testing.assert_close(change_energy(delta, normalized_incidence(edge_index, n)),
                               torch.trace(delta.T @ laplacian @ delta), rtol=1e-5, atol=1e-5)


def test_multiplier_rises_under_budget_and_falls_over_it():
    lam, slack = torch.tensor(0.001), torch.tensor(0.001)
    up, _ = multiplier_step(lam, slack, torch.tensor(2.0), budget=5.0,
                            multiplier_lr=0.1, slack_lr=1e-5)
    down, _ = multiplier_step(lam, slack, torch.tensor(8.0), budget=5.0,
                              multiplier_lr=0.1, slack_lr=1e-5)
    assert up.item() == pytest.approx(0.001 + 0.1 * (5.0 - 2.0 - (0.001 * (1 + 2e-8)) ** 2))
    assert down.item() < 0.001 < up.item()
    # slack: descent on -lambda s^2 grows it while lambda > 0
    _, grown = multiplier_step(torch.tensor(0.5), slack, torch.tensor(0.0), 0.0, 0.0, 0.1)
    assert grown.item() == pytest.approx(0.001 * (1 + 2 * 0.1 * 0.5))
    # inside the propagation: a large budget drives lambda up at every step, none down
    n = 30
    edge_index, h = small_graph(n), torch.randn(n, 5)
    generous = SMPProp(6, threshold=100.0)
    generous(h, edge_index)
    assert all(b > a for a, b in zip([1e-3] + generous.trace["multiplier"],
                                     generous.trace["multiplier"]))
    strict = SMPProp(6, threshold=0.0, multiplier_lr=1e-3)
    strict(h, edge_index)
    assert all(b < a for a, b in zip([1e-3] + strict.trace["multiplier"],
                                     strict.trace["multiplier"]))


def test_multiplier_bound_clips_lambda_and_keeps_deep_propagation_finite():
    lam, slack = torch.tensor(0.001), torch.tensor(0.001)
    clipped, _ = multiplier_step(lam, slack, torch.tensor(1e6), budget=0.0,
                                 multiplier_lr=1e-5, slack_lr=1e-5, bound=2.5)
    assert clipped.item() == -2.5
    inside, _ = multiplier_step(lam, slack, torch.tensor(1.0), 0.0, 1e-5, 1e-5, bound=2.5)
    assert inside.item() == multiplier_step(lam, slack, torch.tensor(1.0), 0.0, 1e-5, 1e-5)[0]
    # Large features put the first step's change energy far over budget: the unbounded
    # multiplier drops below -1/(2 alpha), the correction amplifies the change's
    # high frequencies at every step and 64 steps overflow; the bounded one stays finite.
    n = 40
    edge_index, h = small_graph(n, edges=120, seed=7), 300 * torch.randn(n, 4)
    unbounded = SMPProp(64, threshold=0.0)
    assert not torch.isfinite(unbounded(h, edge_index)).all()
    bounded = SMPProp(64, threshold=0.0, multiplier_bound=2.5)
    out = bounded(h, edge_index)
    assert torch.isfinite(out).all() and min(bounded.trace["multiplier"]) == -2.5
    assert out.abs().max() <= h.abs().max()


@pytest.mark.parametrize("correction, exact", [("laplacian", True), ("adjacency", False)])
def test_laplacian_correction_is_the_exact_lagrangian_gradient(correction, exact):
    """X_{k+1} = X~ - eta * d/dX [lambda (c - s^2 - g(X - X_k))] at X = X~ (descent in X)."""
    n = 20
    edge_index = small_graph(n, edges=60, seed=5)
    h = torch.randn(n, 3)
    prop = SMPProp(1, alpha=0.1, correction=correction, multiplier_init=0.7, multiplier_lr=0.0)
    out = prop(h, edge_index)
    adj, _ = dense_operators(edge_index, n)
    x_tilde = 0.9 * adj @ h + 0.1 * h
    x = x_tilde.clone().requires_grad_(True)
    incidence = normalized_incidence(edge_index, n)
    lagrangian_term = 0.7 * (5.0 - 0.001 ** 2 - change_energy(x - h, incidence))
    (grad,) = torch.autograd.grad(lagrangian_term, x)
    expected = x_tilde - 0.1 * grad
    assert torch.allclose(out, expected, atol=1e-5) == exact
    assert (out - x_tilde).abs().max() > 1e-3


def test_gradients_flow_through_the_multiplier():
    n = 20
    edge_index, h = small_graph(n), torch.randn(n, 3, requires_grad=True)
    prop = SMPProp(4, threshold=1.0, multiplier_lr=1e-2)
    prop(h, edge_index).sum().backward()
    with_mult = h.grad.clone()
    h.grad = None
    detached = SMPProp(4, propagation="appnp")
    detached(h, edge_index).sum().backward()
    assert not torch.allclose(with_mult, h.grad)


def test_smp_runs_sparse_on_a_one_million_edge_graph(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dense matrix materialised")
    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)

    torch.manual_seed(0)
    n, e, f, c = 100_000, 1_000_000, 8, 3
    task = Task("big", "node", f, c, "acc", split=None,
                graph=Data(x=torch.rand(n, f), edge_index=torch.randint(0, n, (2, e)),
                           y=torch.zeros(n, dtype=torch.long)))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = build_model(ModelConfig(name="smp", hidden=8, steps=3), task,
                        smoothness(bits=4))
    out = model(task.graph.x, task.graph.edge_index)
    assert out.shape == (n, c) and torch.isfinite(out).all()
    out.mean().backward()
    assert model.lin1.weight.grad is not None
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    # A dense 100k x 100k float matrix is 37 GiB; the sparse model needs well under 2.
    assert grown_gib < 2.0


# -- the model and the factory -----------------------------------------------------------------
def test_fp32_smp_is_mlp_then_appnp():
    task = node_task()
    model = build_model(ModelConfig(name="smp", hidden=8, dropout=0.0, propagation="appnp"),
                        task).eval()
    x, edge_index = task.graph.x, task.graph.edge_index
    h = model.lin2(torch.relu(model.lin1(x)))
    torch.testing.assert_close(model(x, edge_index), APPNP(10, 0.1)(h, edge_index),
                               atol=1e-6, rtol=1e-5)
    assert len(model.prop.gap) == 0


def test_every_stage_of_smp_has_its_own_quantizer():
    task = node_task()
    model = build_model(ModelConfig(name="smp", hidden=8, steps=3), task,
                        smoothness(bits=4))
    model(task.graph.x, task.graph.edge_index)
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, QLRQuantizer)}
    expected = {f"lin{i}.q.{r}" for i in (1, 2) for r in ("input", "weight", "feature")}
    expected |= {f"prop.{kind}.{k}.{r}" for kind in ("base", "gap") for k in range(3)
                 for r in ("message", "aggregate", "update")}
    assert set(quantizers) == expected
    assert all(q.bit_cost() is not None for q in quantizers.values())
    assert len({id(q.alpha) for q in quantizers.values()}) == len(expected)
    messages = quantizers["prop.base.0.message"].bit_cost()
    edges_with_loops = gcn_norm(task.graph.edge_index, 30)[0].size(1)
    assert messages.elements == edges_with_loops * 3
    assert not quantizers["lin1.q.weight"].counts_in_average
    assert average_bits(model) == 4.0 and compression_ratio(model) == pytest.approx(8.0)


def test_shared_prop_alpha_is_one_parameter_per_role_and_per_model():
    task = node_task()
    factory = smoothness(bits=4, share_prop_alpha=True)
    first = build_model(ModelConfig(name="smp", hidden=8, steps=3), task, factory)
    second = build_model(ModelConfig(name="smp", hidden=8, steps=3), task, factory)
    for model in (first, second):
        alphas = {role: {id(getattr(q, role).alpha) for q in [*model.prop.base, *model.prop.gap]}
                  for role in ("message", "aggregate", "update")}
        assert all(len(ids) == 1 for ids in alphas.values())
    assert first.prop.base[0].message.alpha is not second.prop.base[0].message.alpha
    groups = build_strategy(StrategyConfig()).param_groups(first, TrainerConfig())
    params = [id(p) for g in groups for p in g["params"]]
    assert len(params) == len(set(params)) == len(list(first.parameters()))
    torch.optim.Adam(groups)  # no parameter in two groups


@pytest.mark.parametrize("reinit_every", [0, 2])
def test_shared_prop_alpha_trains(reinit_every):
    """Every step's first-call initialisation (and each re-initialisation) overwrites the
    shared α after earlier steps of the same pass have used it; backward must still work
    and reach the one shared α."""
    task = node_task()
    factory = smoothness(bits=4, share_prop_alpha=True, alpha_grad="code",
                         reinit_every=reinit_every)
    model = build_model(ModelConfig(name="smp", hidden=8, steps=3, correction="adjacency"),
                        task, factory)
    optimizer = torch.optim.Adam(build_strategy(StrategyConfig()).param_groups(
        model, TrainerConfig()))
    shared = model.prop.base[0].message.alpha
    for _ in range(4):  # with reinit_every=2 the third call re-initialises mid-pass
        optimizer.zero_grad()
        model(task.graph.x, task.graph.edge_index).sum().backward()
        assert shared.grad is not None and torch.isfinite(shared.grad)
        optimizer.step()
    assert all(q.message.alpha is shared for q in [*model.prop.base, *model.prop.gap])


@pytest.mark.parametrize("name", ["gcn", "gin", "gat"])
def test_the_same_quantizer_works_with_gcn_gin_gat(name):
    task = node_task()
    model = build_model(ModelConfig(name=name, hidden=8, heads=2), task,
                        smoothness(bits=2, truncation="btstar"))
    out = model(task.graph.x, task.graph.edge_index)
    out.sum().backward()
    quantizers = [m for m in model.modules() if isinstance(m, QLRQuantizer)]
    roles = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, QLRQuantizer)}
    assert {"input", "message", "aggregate", "update"} <= roles
    assert all(q.bit_cost() is not None for q in quantizers)  # every one saw its tensor
    assert all(q.alpha.grad is not None for q in quantizers)
    assert average_bits(model) == 2.0 and compression_ratio(model) == pytest.approx(16.0)


@pytest.mark.parametrize("raw", [True, False])
def test_the_raw_input_is_quantized_unless_switched_off(raw):
    task = node_task()
    model = build_model(ModelConfig(name="gin", hidden=8, layers=3), task,
                        smoothness(quantize_raw_input=raw))
    first, later = model.convs[0], model.convs[1]
    assert first.q.has("input") is raw and later.q.has("input")
    assert first.q.has("message") and first.nn[0].q.has("weight")
    model(task.graph.x, task.graph.edge_index).sum().backward()  # still trains either way


def test_alpha_gets_its_own_learning_rate_and_weight_decay():
    task = node_task()
    model = build_model(ModelConfig(name="smp", hidden=8, steps=2), task,
                        smoothness(lr=3e-4, weight_decay=5e-5))
    groups = build_strategy(StrategyConfig()).param_groups(
        model, TrainerConfig(lr=0.01, weight_decay=1e-5))
    alpha_groups = [g for g in groups if g.get("lr") == 3e-4]
    assert len(alpha_groups) == 6 + 2 * 2 * 3
    assert all(g["weight_decay"] == 5e-5 for g in alpha_groups)
    assert groups[0]["weight_decay"] == 1e-5


@pytest.mark.parametrize("quant, fragments", [
    ({"bits": 3}, ["quant.bits", "2, 4, 8"]),
    ({"bits": 4, "truncation": "bt"}, ["quant.truncation", "quant.bits=2"]),
    ({"truncation": "bt*"}, ["bt*", "btstar", "none"]),
    ({"alpha_grad": "ste"}, ["ste", "code", "lsq"]),
    ({"ste": "clipped"}, ["quant.ste", "identity", "masked"]),
    ({"bitz": 4}, ["quant.bitz", "truncation", "alpha_grad"]),
])
def test_bad_options_name_the_key_and_the_valid_choices(quant, fragments):
    with pytest.raises(GnnqError) as err:
        smoothness(**quant)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("field, value", [("propagation", "elastic"), ("correction", "diag"),
                                          ("steps", -1), ("alpha", 0.0)])
def test_bad_model_options_are_refused(field, value):
    with pytest.raises(GnnqError, match=f"model.{field}"):
        ModelConfig(name="smp", **{field: value})


def test_smp_is_node_level_only():
    graph_task = Task("g", "graph", 4, 2, "acc", split=None, graphs=[])
    with pytest.raises(GnnqError, match="smp"):
        build_model(ModelConfig(name="smp"), graph_task)


def test_smp_learns_a_planted_partition_at_two_bits():
    from torch_geometric.utils import stochastic_blockmodel_graph
    torch.manual_seed(0)
    y = torch.arange(3).repeat_interleave(60)
    edge_index = stochastic_blockmodel_graph([60, 60, 60], [[0.08 if a == b else 0.005
                                                             for b in range(3)] for a in range(3)])
    x = 0.8 * torch.nn.functional.one_hot(y, 3).float() @ torch.randn(3, 12) + torch.randn(180, 12)
    task = Task("sbm", "node", 12, 3, "acc", split=None, graph=Data(x=x, edge_index=edge_index, y=y))
    model = build_model(ModelConfig(name="smp", hidden=16, dropout=0.2, steps=5), task,
                        smoothness(bits=2, truncation="btstar"))
    groups = build_strategy(StrategyConfig()).param_groups(model, TrainerConfig(weight_decay=0))
    optimizer = torch.optim.Adam(groups, lr=0.02)
    train = torch.rand(180) < 0.3
    for _ in range(60):
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x, edge_index)[train], y[train]).backward()
        optimizer.step()
    pred = model.eval()(x, edge_index).argmax(-1)
    assert (pred[~train] == y[~train]).float().mean() > 0.8


def test_smp_runs_log_the_multiplier_range_per_epoch(tmp_path):
    from mlflow.tracking import MlflowClient

    from gnnq.config import (DatasetConfig, ModelConfig, TrackingConfig, TrainConfig,
                             TrainerConfig)
    from gnnq.train.experiment import run_experiment

    store = f"sqlite:///{tmp_path}/mlflow.db"
    config = TrainConfig(dataset=DatasetConfig(name="synthetic"),
                         model=ModelConfig(name="smp", steps=3),
                         trainer=TrainerConfig(epochs=3, progress="none"),
                         tracking=TrackingConfig(uri=store))
    run_id = run_experiment(config, tmp_path / "out")["mlflow_run_id"]
    client = MlflowClient(tracking_uri=store)
    low = client.get_metric_history(run_id, "run0.multiplier_min")
    high = client.get_metric_history(run_id, "run0.multiplier_max")
    assert [m.step for m in low] == [1, 2, 3] and len(high) == 3
    assert all(lo.value <= hi.value for lo, hi in zip(low, high))
    assert len(client.get_metric_history(run_id, "run0.val_acc")) == 3
