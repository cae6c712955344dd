"""Streaming per-layer statistics for gradient fusion.

For a fused Linear layer with base weight ``W0`` ``[d, k]`` and per-concept targets ``W_i = W0 + a_i dW_i``, the
paper's objective ``sum_i ||W_i X_i - W X_i||_F^2`` (``X_i``: the layer's inputs while concept *i* runs alone)
depends on the data only through

* ``G = sum_i X_i X_i^T`` (``[k, k]``), shared by every layer that reads the same input (q/k/v of one attention),
* ``C = sum_i W_i X_i X_i^T`` (``[d, k]``) and ``const = sum_i tr(W_i X_i X_i^T W_i^T)`` per layer,
* ``rows``: how many input vectors were seen (the original's loss is a mean over rows and output features).

:class:`GramGroup` holds ``G`` for one input; :class:`LayerStats` holds ``C``, ``const`` for one layer and points at
its group; :class:`FusionStats` holds both for one fusion stage. Concepts are folded in one at a time
(:meth:`FusionStats.fold_concept`), so memory does not grow with the number of concepts, sampling steps or
resolution, and statistics of the same layers simply add (:meth:`FusionStats.merged`).
"""

from __future__ import annotations

from collections.abc import Callable
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

    def add(self, other: GramGroup) -> None:
        self.gram += other.gram.to(self.gram.device)
        self.rows += other.rows

    def copy(self, device=None) -> GramGroup:
        return GramGroup(self.gram.to(device=device, copy=True), self.rows)


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

    def fold(self, concept_gram: GramGroup, target_weight: torch.Tensor, concept: str) -> None:
        """Fold one concept's ``G_i`` and target ``W_i`` in (``C += W_i G_i``, ``const += tr(W_i G_i W_i^T)``)."""
        w = target_weight.to(device=concept_gram.gram.device, dtype=STAT_DTYPE).flatten(1)
        wg = w @ concept_gram.gram
        self.cross += wg
        self.const += (wg * w).sum()
        self.rows += concept_gram.rows
        self.concepts.append(concept)

    def copy(self, device=None) -> LayerStats:
        return LayerStats(
            self.group,
            self.cross.to(device=device, copy=True),
            self.const.to(device=device, copy=True),
            self.rows,
            list(self.concepts),
        )


@dataclass
class FusionStats:
    """The statistics of one fusion stage: Gram groups by input name and per-layer cross terms by weight key."""

    groups: dict[str, GramGroup] = field(default_factory=dict)
    layers: dict[str, LayerStats] = field(default_factory=dict)

    def fold_layer(self, key: str, group: str, concept_gram: GramGroup, target: torch.Tensor, concept: str) -> None:
        """Fold one concept's target weight for layer ``key``, whose input statistics are ``concept_gram``."""
        if key not in self.layers:
            self.layers[key] = LayerStats.empty(
                group, target.shape[0], target.flatten(1).shape[1], device=concept_gram.gram.device
            )
        self.layers[key].fold(concept_gram, target, concept)

    def add_groups(self, groups: dict[str, GramGroup]) -> None:
        """Add one concept's Gram groups (after its layers were folded with them)."""
        for name, gram in groups.items():
            if name in self.groups:
                self.groups[name].add(gram)
            else:
                self.groups[name] = gram

    def fold_concept(
        self, concept: str, groups: dict[str, GramGroup], targets: dict[str, torch.Tensor], group_of: Callable[[str], str]
    ) -> None:
        """Add one concept: the Gram groups captured while it ran alone and its target weight per layer key.

        Every target's group (``group_of(key)``) must be among ``groups``; the caller checks that.
        """
        for key, target in targets.items():
            self.fold_layer(key, group_of(key), groups[group_of(key)], target, concept)
        self.add_groups(groups)

    def merged(self, other: FusionStats) -> FusionStats:
        """The sum of two statistics of the same stage (they are additive); neither input changes."""
        out = self.to(None)
        for name, gram in other.groups.items():
            if name in out.groups:
                out.groups[name].add(gram)
            else:
                out.groups[name] = gram.copy()
        for key, layer in other.layers.items():
            if key in out.layers:
                mine = out.layers[key]
                mine.cross += layer.cross.to(mine.cross.device)
                mine.const += layer.const.to(mine.const.device)
                mine.rows += layer.rows
                mine.concepts.extend(layer.concepts)
            else:
                out.layers[key] = layer.copy()
        return out

    def to(self, device) -> FusionStats:
        """A copy on ``device`` (None: where each tensor is)."""
        return FusionStats(
            {k: v.copy(device) for k, v in self.groups.items()}, {k: v.copy(device) for k, v in self.layers.items()}
        )

    def gram_of(self, key: str) -> torch.Tensor:
        return self.groups[self.layers[key].group].gram

    # ---------------------------------------------------------------------------------------- in bundles

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``<prefix>.gram.<group>``, ``<prefix>.cross.<key>``, ``<prefix>.const.<key>`` and their index."""
        tensors: dict[str, torch.Tensor] = {}
        index: dict = {"groups": {}, "layers": {}}
        for name, group in self.groups.items():
            tensors[f"{prefix}.gram.{name}"] = group.gram.contiguous()
            index["groups"][name] = group.rows
        for key, layer in self.layers.items():
            tensors[f"{prefix}.cross.{key}"] = layer.cross.contiguous()
            tensors[f"{prefix}.const.{key}"] = layer.const.reshape(1).contiguous()
            index["layers"][key] = {"group": layer.group, "rows": layer.rows, "concepts": layer.concepts}
        return tensors, index

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], index: dict, prefix: str) -> FusionStats:
        """Inverse of :meth:`to_tensors`; a tensor the index names but the file lacks raises ``KeyError``."""
        groups = {g: GramGroup(tensors[f"{prefix}.gram.{g}"].to(STAT_DTYPE), rows) for g, rows in index["groups"].items()}
        layers = {
            k: LayerStats(
                v["group"],
                tensors[f"{prefix}.cross.{k}"].to(STAT_DTYPE),
                tensors[f"{prefix}.const.{k}"].to(STAT_DTYPE).reshape(()),
                v["rows"],
                list(v["concepts"]),
            )
            for k, v in index["layers"].items()
        }
        return cls(groups, layers)


def layer_statistics(inputs: list[torch.Tensor], targets: list[torch.Tensor], device=None) -> tuple[GramGroup, LayerStats]:
    """Statistics of one layer from each concept's input rows ``[n_i, k]`` and target weight ``[d, k]``."""
    width = inputs[0].shape[-1]
    stats = FusionStats()
    for index, (rows, target) in enumerate(zip(inputs, targets, strict=True)):
        concept = GramGroup.empty(width, device=device)
        concept.add_rows(rows)
        stats.fold_concept(f"concept {index}", {"layer": concept}, {"layer": target}, lambda key: "layer")
    return stats.groups["layer"], stats.layers["layer"]


def objective(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, const: torch.Tensor, rows: int) -> torch.Tensor:
    """The original's mean squared error ``sum_i ||W_i X_i - W X_i||^2 / (rows * d)`` from the statistics."""
    w = weight.to(gram.dtype).flatten(1)
    total = ((w @ gram) * w).sum() - 2.0 * (w * cross).sum() + const
    return total.clamp_min(0.0) / max(rows * w.shape[0], 1)
