"""Streaming per-layer statistics for gradient fusion.

For a fused Linear layer with base weight ``W0`` ``[d, k]`` and per-concept targets ``W_i = W0 + a_i dW_i``, the
paper's objective ``sum_i ||W_i X_i - W X_i||_F^2`` (``X_i``: the layer's inputs while concept *i* runs alone)
depends on the data only through

* ``G = sum_i X_i X_i^T`` (``[k, k]``), shared by every layer that reads the same input (q/k/v of one attention),
* ``C = sum_i W_i X_i X_i^T`` (``[d, k]``) and ``const = sum_i tr(W_i X_i X_i^T W_i^T)`` per layer,
* ``rows``: how many input vectors were seen (the original's loss is a mean over rows and output features).

:class:`GramGroup` holds ``G`` for one input; :class:`LayerStats` holds ``C``, ``const`` for one layer and points at
its group. Concepts are folded in one at a time (:func:`fold_concept`), so memory does not grow with the number of
concepts, sampling steps or resolution, and statistics of the same layers simply add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STAT_DTYPE = torch.float64


@dataclass
class GramGroup:
    """``X^T X`` summed over every row any concept fed to the layers of this group."""

    gram: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, width: int, device=None) -> GramGroup:
        return cls(torch.zeros(width, width, dtype=STAT_DTYPE, device=device))

    def add_rows(self, rows: torch.Tensor) -> None:
        """Add a ``[n, k]`` block of input rows (computed in the rows' dtype, summed in float64)."""
        rows = rows.reshape(-1, rows.shape[-1])
        self.gram += (rows.T @ rows).to(STAT_DTYPE)
        self.rows += rows.shape[0]


@dataclass
class LayerStats:
    """Sufficient statistics of one fused layer; see the module docstring."""

    group: str
    cross: torch.Tensor
    const: torch.Tensor
    rows: int = 0
    concepts: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, group: str, out_features: int, in_features: int, device=None) -> LayerStats:
        return cls(
            group,
            torch.zeros(out_features, in_features, dtype=STAT_DTYPE, device=device),
            torch.zeros((), dtype=STAT_DTYPE, device=device),
        )


def fold_concept(layer: LayerStats, concept_gram: GramGroup, target_weight: torch.Tensor, concept: str) -> None:
    """Fold one concept's ``G_i`` and target ``W_i`` into ``layer`` (``C += W_i G_i``, ``const += tr(W_i G_i W_i^T)``)."""
    w = target_weight.to(device=concept_gram.gram.device, dtype=STAT_DTYPE).flatten(1)
    wg = w @ concept_gram.gram
    layer.cross += wg
    layer.const += (wg * w).sum()
    layer.rows += concept_gram.rows
    layer.concepts.append(concept)


def layer_statistics(inputs: list[torch.Tensor], targets: list[torch.Tensor], device=None) -> tuple[GramGroup, LayerStats]:
    """Statistics of one layer from each concept's input rows ``[n_i, k]`` and target weight ``[d, k]``."""
    width = inputs[0].shape[-1]
    group = GramGroup.empty(width, device=device)
    layer = LayerStats.empty("layer", targets[0].shape[0], width, device=device)
    for index, (rows, target) in enumerate(zip(inputs, targets, strict=True)):
        concept = GramGroup.empty(width, device=device)
        concept.add_rows(rows)
        fold_concept(layer, concept, target, f"concept {index}")
        add_gram(group, concept)
    return group, layer


def add_gram(total: GramGroup, part: GramGroup) -> None:
    total.gram += part.gram.to(total.gram.device)
    total.rows += part.rows


def objective(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, const: torch.Tensor, rows: int) -> torch.Tensor:
    """The original's mean squared error ``sum_i ||W_i X_i - W X_i||^2 / (rows * d)`` from the statistics."""
    w = weight.to(gram.dtype).flatten(1)
    total = ((w @ gram) * w).sum() - 2.0 * (w * cross).sum() + const
    return total.clamp_min(0.0) / max(rows * w.shape[0], 1)


def merge_stats(a: dict, b: dict) -> dict:
    """Sum two statistics dicts ``{"groups": {name: GramGroup}, "layers": {key: LayerStats}}`` (additivity)."""
    out_groups = {k: GramGroup(v.gram.clone(), v.rows) for k, v in a["groups"].items()}
    for k, v in b["groups"].items():
        if k in out_groups:
            add_gram(out_groups[k], v)
        else:
            out_groups[k] = GramGroup(v.gram.clone(), v.rows)
    out_layers = {
        k: LayerStats(v.group, v.cross.clone(), v.const.clone(), v.rows, list(v.concepts)) for k, v in a["layers"].items()
    }
    for k, v in b["layers"].items():
        if k in out_layers:
            layer = out_layers[k]
            layer.cross += v.cross.to(layer.cross.device)
            layer.const += v.const.to(layer.const.device)
            layer.rows += v.rows
            layer.concepts.extend(v.concepts)
        else:
            out_layers[k] = LayerStats(v.group, v.cross.clone(), v.const.clone(), v.rows, list(v.concepts))
    return {"groups": out_groups, "layers": out_layers}
