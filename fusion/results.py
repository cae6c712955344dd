"""What a fusion is asked to do and what it produces: settings, per-stage reports, the fused model, its fingerprint.

Kept apart from the procedure so that bundles (:mod:`.bundle`) read and write results without depending on how
they were computed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..edlora.arch import architecture_name
from ..edlora.concepts import ConceptSet
from ..edlora.errors import MixOfShowError
from ..edlora.routing import install_layer_routing
from .solvers import DEFAULT_RIDGE
from .stats import FusionStats

#: The stages of gradient fusion, in the original's order.
STAGES = ("text_encoder", "cross_attention_kv", "unet_spatial")


class FusionError(MixOfShowError):
    """A fusion that cannot run with these inputs; the message names the input at fault."""


@dataclass
class FusionSettings:
    text_encoder_iters: int = 500
    unet_iters: int = 50
    sample_steps: int = 20
    sample_resolution: int = 0  # 0: the model's own (512 SD1.x, 1024 SDXL)
    seed: int = 0
    solver: str = "lbfgs"
    device: str = "auto"
    ridge: float = DEFAULT_RIDGE  # the exact solver's, relative to each layer's mean eigenvalue (see fusion.solvers)
    #: which token positions of the fusion prompts feed the text-encoder and K/V statistics: "padded" = all of
    #: them, as ComfyUI encodes prompts (padded to 77 tokens); "original" = start..first end token for the text
    #: encoder and concept words + first end token for K/V, as the research code did with unpadded prompts.
    token_positions: str = "padded"
    #: memory for statistics (float64); layers whose statistics do not fit are weight-fused (see fusion.plan)
    statistics_budget_gb: float = 8.0
    #: k x k convolutions (LoCon files): "weight" = weight fusion, "statistics" = Gram of unfolded patches
    conv_layers: str = "weight"

    def __post_init__(self):
        if not (self.statistics_budget_gb >= 0):
            raise FusionError(f"statistics memory must be at least 0 GB, got {self.statistics_budget_gb!r}.")
        if self.conv_layers not in ("weight", "statistics"):
            raise FusionError(f"conv_layers must be 'weight' or 'statistics', got {self.conv_layers!r}.")

    def as_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


@dataclass
class StageReport:
    """How one stage went: layers solved and the summed objective before and after."""

    layers: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0

    def add(self, loss_before: float, loss_after: float) -> None:
        self.layers += 1
        self.loss_before += loss_before
        self.loss_after += loss_after


@dataclass
class FusedModel:
    """The outcome of a fusion: weight diffs against the base, the concepts, and how it was made."""

    method: str
    unet_diffs: dict[str, torch.Tensor]
    text_diffs: dict[str, torch.Tensor]
    concepts: ConceptSet
    settings: dict[str, str] = field(default_factory=dict)
    stage_reports: dict[str, StageReport] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    stats: dict[str, FusionStats] | None = None  # per stage, kept so a later fusion can add concepts
    base_fingerprint: str = ""
    layer_methods: dict[str, str] = field(default_factory=dict)  # weight key -> how it was fused (and why)
    notes: list[str] = field(default_factory=list)  # what the user should know: unused file keys, duplicate prompts
    #: the base's text encoders and widths (``{"l": 768, "g": 1280}`` for SDXL); empty: unrecorded (SD1.x bundles
    #: written before version 2)
    encoders: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return architecture_name(self.encoders) if self.encoders else "SD1.x"

    def apply(self, model, clip):
        """Clones of ``model``/``clip`` with the fused weights as diff patches and layer routing installed."""
        new_model = model.clone()
        new_model.add_patches({k: ("diff", (d,)) for k, d in self.unet_diffs.items()}, 1.0)
        install_layer_routing(new_model)
        new_clip = clip.clone()
        new_clip.add_patches({k: ("diff", (d,)) for k, d in self.text_diffs.items()}, 1.0)
        return new_model, new_clip

    def report(self) -> str:
        lines = [f"Mix-of-Show {self.method}: {len(self.concepts)} concepts ({self.concepts.describe()})"]
        for stage in STAGES:
            r = self.stage_reports.get(stage)
            if r is None or r.layers == 0:
                continue
            change = 100.0 * (r.loss_after - r.loss_before) / r.loss_before if r.loss_before > 0 else 0.0
            lines.append(f"  {stage}: {r.layers} layers, objective {r.loss_before:.4g} -> {r.loss_after:.4g} ({change:+.1f}%)")
        if self.layer_methods:
            counts: dict[str, int] = {}
            for method in self.layer_methods.values():
                counts[method.split(":")[0]] = counts.get(method.split(":")[0], 0) + 1
            lines.append("  layers by method: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items())))
            weight = [f"{k} ({m.split(': ', 1)[1]})" for k, m in sorted(self.layer_methods.items()) if ": " in m]
            for line in weight[:12]:
                lines.append(f"    weight-fused: {line}")
            if len(weight) > 12:
                lines.append(f"    ... and {len(weight) - 12} more weight-fused layers")
        if self.drift:
            lines.append("  identity drift (relative error of the noise prediction against each concept's own model):")
            for name, value in self.drift.items():
                lines.append(f"    {name}: {value:.4f}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


class Fingerprint:
    """A short hash of base weights, so a fusion is only saved, loaded or extended on the base it was made on; keys
    are added in sorted order one at a time, so no copy of every weight is held."""

    def __init__(self):
        self._digest = hashlib.sha256()

    def add(self, key: str, weight: torch.Tensor) -> None:
        self._digest.update(key.encode())
        self._digest.update(weight.detach().to(torch.float16).cpu().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:16]


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """:class:`Fingerprint` of a dict of weights."""
    digest = Fingerprint()
    for key in sorted(weights):
        digest.add(key, weights[key])
    return digest.hexdigest()
