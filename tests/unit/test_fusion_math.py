"""Known-answer tests of the fusion statistics and solvers on synthetic linear layers."""

from __future__ import annotations

import torch

from mixofshow.fusion.solvers import DEFAULT_RIDGE, solve_exact, solve_lbfgs, solve_lbfgs_raw
from mixofshow.fusion.stats import FusionStats, GramGroup, LayerStats, objective


def synthetic(d=16, k=12, rows=(9, 11, 14), seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d, k, generator=g, dtype=torch.float64)
    targets = [w0 + 0.3 * torch.randn(d, k, generator=g, dtype=torch.float64) for _ in rows]
    inputs = [torch.randn(n, k, generator=g, dtype=torch.float64) for n in rows]
    return w0, targets, inputs


def statistics(targets, inputs, chunk=None, first=0):
    group = GramGroup.empty(inputs[0].shape[1])
    layer = LayerStats.empty("g", targets[0].shape[0], inputs[0].shape[1])
    for i, (w, x) in enumerate(zip(targets, inputs, strict=True)):
        concept = GramGroup.empty(x.shape[1])
        for start in range(0, x.shape[0], chunk or x.shape[0]):
            concept.add_rows(x[start : start + (chunk or x.shape[0])])
        layer.fold(concept, w, f"c{first + i}")
        group.add(concept)
    return group, layer


def raw_loss(w, targets, inputs):
    total = sum(((x @ w.T - x @ t.T) ** 2).sum() for t, x in zip(targets, inputs, strict=True))
    return float(total / (sum(x.shape[0] for x in inputs) * w.shape[0]))


def least_squares(targets, inputs):
    gram = sum(x.T @ x for x in inputs)
    cross = sum(t @ x.T @ x for t, x in zip(targets, inputs, strict=True))
    return cross @ torch.linalg.inv(gram)


def test_gram_objective_equals_raw_objective_and_streams_in_chunks():
    w0, targets, inputs = synthetic()
    group, layer = statistics(targets, inputs)
    chunked_group, chunked_layer = statistics(targets, inputs, chunk=4)
    assert torch.allclose(group.gram, chunked_group.gram) and torch.allclose(layer.cross, chunked_layer.cross)
    probe = w0 + 0.1
    assert (
        abs(float(objective(probe, group.gram, layer.cross, layer.const, layer.rows)) - raw_loss(probe, targets, inputs)) < 1e-10
    )
    assert layer.rows == 34 and layer.concepts == ["c0", "c1", "c2"]


def test_exact_solver_reaches_the_least_squares_optimum():
    w0, targets, inputs = synthetic()
    group, layer = statistics(targets, inputs)
    solution = solve_exact(w0, group.gram, layer.cross, layer.const, layer.rows, ridge=1e-12)
    assert torch.allclose(solution.weight, least_squares(targets, inputs), atol=1e-8)
    assert solution.loss_after < solution.loss_before


def test_lbfgs_approaches_the_optimum_and_matches_raw_feature_lbfgs():
    w0, targets, inputs = synthetic()
    group, layer = statistics(targets, inputs)
    optimum = raw_loss(least_squares(targets, inputs), targets, inputs)
    gram_solution = solve_lbfgs(w0, group.gram, layer.cross, layer.const, layer.rows, iters=200)
    raw_solution = solve_lbfgs_raw(w0, inputs, [x @ t.T for t, x in zip(targets, inputs, strict=True)], iters=200)
    assert (
        gram_solution.loss_before == raw_solution.loss_before or abs(gram_solution.loss_before - raw_solution.loss_before) < 1e-10
    )
    assert abs(gram_solution.loss_after - optimum) < 1e-8 * max(1.0, gram_solution.loss_before)
    assert abs(raw_solution.loss_after - optimum) < 1e-8 * max(1.0, raw_solution.loss_before)
    assert abs(raw_loss(gram_solution.weight, targets, inputs) - gram_solution.loss_after) < 1e-9
    few = solve_lbfgs(w0, group.gram, layer.cross, layer.const, layer.rows, iters=3)
    assert optimum < few.loss_after < few.loss_before, "a few iterations improve but do not finish"


def test_unexcited_directions_stay_at_w0():
    w0, targets, inputs = synthetic(rows=(3, 4))  # 7 rows < 12 inputs: G is rank deficient
    group, layer = statistics(targets, inputs)
    basis = torch.linalg.svd(torch.cat(inputs)).Vh  # rows 7.. span the unexcited directions
    null = basis[7:].T
    for solution in (
        solve_exact(w0, group.gram, layer.cross, layer.const, layer.rows, ridge=1e-6),
        solve_lbfgs(w0, group.gram, layer.cross, layer.const, layer.rows, iters=100),
    ):
        assert torch.allclose((solution.weight - w0) @ null, torch.zeros(w0.shape[0], null.shape[1], dtype=w0.dtype), atol=1e-8)
        assert solution.loss_after < 1e-10 * solution.loss_before or solution.loss_after < 1e-12


def test_the_ridge_holds_back_barely_excited_directions_and_keeps_the_rest():
    """Two concepts whose inputs share a strong direction and differ in one the samples barely excite (eigenvalue
    1e-6 of the mean): the plain minimiser fits their conflict there with huge weights, which a new input along that
    direction (a word no fusion prompt held) then amplifies; the default ridge gives each eigen-direction ``e / (e +
    lambda)`` of its least-squares update, so that direction stays near the anchor and the rest is fitted."""
    g = torch.Generator().manual_seed(3)
    d, k = 6, 5
    w0 = torch.randn(d, k, generator=g, dtype=torch.float64)
    targets = [w0 + 0.5 * torch.randn(d, k, generator=g, dtype=torch.float64) for _ in range(2)]
    common = torch.randn(40, k - 1, generator=g, dtype=torch.float64)
    weak = 1e-3 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    inputs = [torch.cat([common, weak], 1), torch.cat([common, weak + 1e-3], 1)]  # they differ only in the weak column
    group, layer = statistics(targets, inputs)
    plain = solve_exact(w0, group.gram, layer.cross, layer.const, layer.rows, ridge=1e-12)
    default = solve_exact(w0, group.gram, layer.cross, layer.const, layer.rows)
    eigenvalues, vectors = torch.linalg.eigh(group.gram)
    lam = DEFAULT_RIDGE * float(eigenvalues.mean())
    residual = layer.cross - w0 @ group.gram
    expected = (residual @ vectors) / (eigenvalues + lam) @ vectors.T
    assert torch.allclose(default.weight - w0, expected, atol=1e-9), "each direction gets e / (e + lambda) of its update"
    probe = torch.zeros(k, dtype=torch.float64)
    probe[-1] = 1.0  # an input along the barely-excited direction only
    plain_change = float(((plain.weight - w0) @ probe).norm())
    default_change = float(((default.weight - w0) @ probe).norm())
    concepts_change = max(float(((t - w0) @ probe).norm()) for t in targets)
    assert plain_change > 100 * concepts_change, "the plain minimiser extrapolates far beyond any concept"
    assert default_change < concepts_change, "the ridge keeps the output within the concepts' own changes"
    optimum = plain.loss_after
    assert optimum < default.loss_after < default.loss_before
    assert default.loss_after - optimum < 0.05 * (default.loss_before - optimum), "the excited directions are still fitted"


def test_statistics_are_additive():
    w0, targets, inputs = synthetic()
    all_group, all_layer = statistics(targets, inputs)
    g1, l1 = statistics(targets[:2], inputs[:2])
    g2, l2 = statistics(targets[2:], inputs[2:], first=2)
    merged = FusionStats({"g": g1}, {"w": l1}).merged(FusionStats({"g": g2}, {"w": l2}))
    assert torch.allclose(merged.groups["g"].gram, all_group.gram)
    assert torch.allclose(merged.layers["w"].cross, all_layer.cross)
    assert torch.allclose(merged.layers["w"].const, all_layer.const)
    assert merged.layers["w"].rows == all_layer.rows and merged.layers["w"].concepts == ["c0", "c1", "c2"]
    assert torch.allclose(g1.gram, statistics(targets[:2], inputs[:2])[0].gram), "merging must not modify its inputs"


def test_lbfgs_is_deterministic_and_keeps_dtype():
    w0, targets, inputs = synthetic()
    group, layer = statistics(targets, inputs)
    a = solve_lbfgs(w0.float(), group.gram, layer.cross, layer.const, layer.rows, iters=20)
    b = solve_lbfgs(w0.float(), group.gram, layer.cross, layer.const, layer.rows, iters=20)
    assert a.weight.dtype == torch.float32 and torch.equal(a.weight, b.weight)


def test_layer_statistics_helper_matches_streamed_statistics():
    from mixofshow.fusion.stats import layer_statistics

    w0, targets, inputs = synthetic()
    group, layer = statistics(targets, inputs, chunk=5)
    helper_group, helper_layer = layer_statistics(inputs, targets)
    assert torch.allclose(helper_group.gram, group.gram) and torch.allclose(helper_layer.cross, layer.cross)
    assert torch.allclose(helper_layer.const, layer.const) and helper_layer.rows == layer.rows == helper_group.rows


def test_fusion_stats_round_trip_through_tensors_and_devices():
    w0, targets, inputs = synthetic()
    group, layer = statistics(targets, inputs)
    stats = FusionStats({"g": group}, {"w": layer})
    tensors, index = stats.to_tensors("stats.stage")
    assert set(tensors) == {"stats.stage.gram.g", "stats.stage.cross.w", "stats.stage.const.w"}
    back = FusionStats.from_tensors(tensors, index, "stats.stage")
    assert torch.equal(back.groups["g"].gram, group.gram) and back.groups["g"].rows == group.rows
    assert torch.equal(back.layers["w"].cross, layer.cross) and torch.equal(back.layers["w"].const, layer.const)
    assert back.layers["w"].concepts == layer.concepts and torch.equal(back.gram_of("w"), group.gram)
    moved = stats.to("cpu")
    moved.groups["g"].gram += 1
    assert not torch.equal(moved.groups["g"].gram, group.gram), "to() copies"
