"""Per-layer solvers of ``min_W sum_i ||W_i X_i - W X_i||^2`` (mean over rows and output features).

* :func:`solve_lbfgs`: the paper's optimiser (torch LBFGS, lr 1, history 25, strong-Wolfe line search, tolerances
  1e-16, one ``step`` of ``iters`` iterations, started at ``W0``, best iterate kept) on the Gram form: the same
  objective and gradients as over raw activations, at ``O(d k^2)`` per evaluation instead of ``O(d k N)``.
* :func:`solve_exact`: the ridge-regularised minimiser near ``W0``: ``(W - W0)(G + lambda I) = C - W0 G``. Directions
  no concept excites get no update, as with LBFGS started from ``W0``; the ridge ``lambda`` (:data:`DEFAULT_RIDGE`
  times the mean eigenvalue of ``G``) also holds back directions the concepts' samples barely excited, where the
  plain minimiser fits the concepts' conflicts with large weights that a prompt using those directions (a word the
  fusion prompts never held) then amplifies; LBFGS stopped after a few iterations from ``W0`` does the same
  implicitly. A direction with eigenvalue ``e`` gets ``e / (e + lambda)`` of its least-squares update.
* :func:`solve_lbfgs_raw`: the original's way (all activations kept, MSE in chunks of 5,000 rows), kept as the
  reference the benchmarks compare against.

All solvers work on ``delta = W - W0`` in float64, which avoids cancellation between large constant terms.
:data:`SOLVERS` is the table the fusion procedure dispatches through and MoS Gradient Fusion lists as options: a new
solver is one entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .stats import LayerStats, objective

#: the exact solver's ridge relative to the mean eigenvalue of G. 1e-6 (enough for a stable factorisation) matched
#: LBFGS on random-weight models, but on the small world's text encoder, where every word is its own feature, it
#: extrapolated into the evaluation prompts' unseen words (every image lost its background); 1e-3 kept them, came
#: within 3 points of LBFGS's concept colour share at 2 and 5 concepts and beat it at 10 (README, "The small world").
DEFAULT_RIDGE = 1e-3


@dataclass
class Solution:
    weight: torch.Tensor
    loss_before: float
    loss_after: float
    evaluations: int = 0


def _check_interrupt(check: Callable[[], None] | None) -> None:
    if check is not None:
        check()


def _lbfgs_best(
    parameter: torch.Tensor,
    loss_fn: Callable[[], torch.Tensor],
    iters: int,
    history: int,
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[float, float, torch.Tensor, int]:
    """One ``LBFGS.step`` with the original's settings (lr 1, strong-Wolfe, tolerances 1e-16) from ``parameter``'s
    value; returns the first loss, the best loss, the best iterate and the number of evaluations."""
    best = {"loss": float("inf"), "value": parameter.detach().clone()}
    first: dict[str, float] = {}
    evaluations = 0

    def closure():
        nonlocal evaluations
        _check_interrupt(check_interrupt)
        evaluations += 1
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        value = float(loss.detach())
        first.setdefault("loss", value)
        if value < best["loss"]:
            best["loss"] = value
            best["value"] = parameter.detach().clone()
        return loss

    optimizer = torch.optim.LBFGS(
        [parameter],
        lr=1,
        max_iter=iters,
        history_size=history,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-16,
        tolerance_change=1e-16,
    )
    with torch.enable_grad():
        if iters > 0:
            optimizer.step(closure)
        else:
            closure()
    return first["loss"], best["loss"], best["value"], evaluations


def solve_lbfgs(
    w0: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    const: torch.Tensor,
    rows: int,
    iters: int,
    history: int = 25,
    check_interrupt: Callable[[], None] | None = None,
) -> Solution:
    """LBFGS on the Gram form from ``w0``; returns the best weight seen (in ``w0``'s dtype and device)."""
    w0d = w0.detach().to(device=gram.device, dtype=gram.dtype).flatten(1)
    residual = cross - w0d @ gram
    scale = 1.0 / max(rows * w0d.shape[0], 1)
    base = objective(w0d, gram, cross, const, rows)
    delta = torch.zeros_like(w0d, requires_grad=True)

    def loss():
        # loss(W0 + D) = loss(W0) + (tr(D G D^T) - 2 tr(D R^T)) / (rows d), with R = C - W0 G
        return base + scale * (((delta @ gram) * delta).sum() - 2.0 * (delta * residual).sum())

    _, best_loss, best_delta, evaluations = _lbfgs_best(delta, loss, iters, history, check_interrupt)
    weight = (w0d + best_delta).reshape(w0.shape).to(dtype=w0.dtype, device=w0.device)
    return Solution(weight, float(base), best_loss, evaluations)


def solve_exact(
    w0: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    const: torch.Tensor,
    rows: int,
    ridge: float = DEFAULT_RIDGE,
) -> Solution:
    """The ridge-regularised minimiser near ``w0``: ``delta (G + lambda I) = C - W0 G``, ``lambda = ridge`` times the
    mean eigenvalue of ``G``."""
    dtype = gram.dtype
    w0d = w0.detach().to(device=gram.device, dtype=dtype).flatten(1)
    residual = cross - w0d @ gram
    k = gram.shape[0]
    lam = ridge * max(float(torch.trace(gram)) / k, 1e-30)
    eye = torch.eye(k, dtype=dtype, device=gram.device)
    # G is positive semi-definite, but summed from float32 products it can be indefinite by rounding in directions
    # the data barely excites; a ridge ten times larger per try restores a factorisation (a least-squares solve of
    # the same system costs ~100x more)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            break
        lam *= 10.0
    if int(info) == 0:
        delta = torch.cholesky_solve(residual.T, factor).T
    else:
        delta = torch.linalg.lstsq(gram + lam * eye, residual.T).solution.T
    weight = w0d + delta
    return Solution(
        weight.reshape(w0.shape).to(dtype=w0.dtype, device=w0.device),
        float(objective(w0d, gram, cross, const, rows)),
        float(objective(weight, gram, cross, const, rows)),
    )


def solve_lbfgs_raw(
    w0: torch.Tensor, inputs: list[torch.Tensor], targets: list[torch.Tensor], iters: int, history: int = 25, chunk: int = 5000
) -> Solution:
    """The original's LBFGS over stored activations: ``inputs[i]`` ``[n_i, k]``, ``targets[i] = inputs[i] W_i^T``."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets])
    weight = w0.detach().clone().flatten(1).to(x.dtype).requires_grad_(True)
    count = x.shape[0] * weight.shape[0]

    def chunked_mse():
        total = 0.0
        for start in range(0, x.shape[0], chunk):
            part = torch.nn.functional.linear(x[start : start + chunk], weight)
            total = total + ((part - y[start : start + chunk]) ** 2).sum()
        return total / count

    first, best_loss, best, evaluations = _lbfgs_best(weight, chunked_mse, iters, history)
    return Solution(best.reshape(w0.shape).to(w0.dtype), first, best_loss, evaluations)


@dataclass(frozen=True)
class Solver:
    """One way to solve a fused layer from its statistics: ``solve(w0, gram, layer, iters, ridge, check_interrupt)``."""

    name: str
    description: str
    solve: Callable[..., Solution]


def _lbfgs_layer(w0, gram, layer: LayerStats, iters: int, ridge: float, check_interrupt=None) -> Solution:
    return solve_lbfgs(w0, gram, layer.cross, layer.const, layer.rows, iters, check_interrupt=check_interrupt)


def _exact_layer(w0, gram, layer: LayerStats, iters: int, ridge: float, check_interrupt=None) -> Solution:
    return solve_exact(w0, gram, layer.cross, layer.const, layer.rows, ridge=ridge)


SOLVERS: dict[str, Solver] = {
    solver.name: solver
    for solver in (
        Solver("lbfgs", "the paper's optimiser (LBFGS, strong-Wolfe, best iterate), on the Gram form", _lbfgs_layer),
        Solver(
            "exact",
            "the closed-form ridge-regularised least-squares solution near weight fusion's weights (faster)",
            _exact_layer,
        ),
    )
}
