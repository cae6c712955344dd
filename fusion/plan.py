"""Which method fuses each layer a concept touches, decided before any work starts.

Linear layers (and 1x1 convolutions, which are Linear layers over channels) are solved from Gram statistics of their
inputs (:mod:`.stats`). A ``k x k`` convolution is a Linear layer over the patches it sees, so its statistics are the
Gram matrix of those unfolded patches (``in_channels * k * k`` wide): exact, but large (SD1.5's 1280-channel 3x3
convolutions need 1 GB each in float64, those that read a skip connection 4 GB). Statistics are float64 and held
for the whole fusion (a saved fusion can keep them), so they get a memory budget: groups are admitted in order of
how much they matter to identity and how cheap they are (text encoder, cross-attention K/V, attention projections,
other Linear layers, 1x1 then ``k x k`` convolutions, each narrowest first), and every layer that does not fit, or
is not a weight matrix at all (a bias, a norm), is weight-fused: the base plus the mean of the concepts' changes, the
paper's baseline. The report says per layer which method was used and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..edlora.keys import is_cross_attention_kv
from .capture import input_group

GRAM = "gram"
UNFOLDED = "gram over unfolded patches"
WEIGHT = "weight fusion"
BYTES_PER_VALUE = 8  # float64 statistics


@dataclass(frozen=True)
class LayerPlan:
    key: str
    stage: str
    method: str
    group: str
    width: int = 0  # inputs per statistics row (0 for weight fusion)
    reason: str = ""
    outputs: int = 0  # rows of the weight (its cross term is outputs x width)

    @property
    def gram(self) -> bool:
        return self.method != WEIGHT


def stage_of(key: str) -> str:
    if not key.startswith("diffusion_model."):
        return "text_encoder"
    return "cross_attention_kv" if is_cross_attention_kv(key) else "unet_spatial"


def statistics_width(module: torch.nn.Module | None) -> tuple[str, int, int, str]:
    """``(method, width, outputs, reason)`` for a module whose ``.weight`` is fused."""
    if isinstance(module, torch.nn.Linear):
        return GRAM, module.in_features, module.out_features, ""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return WEIGHT, 0, 0, "a grouped or specially padded convolution"
        kh, kw = module.kernel_size
        if (kh, kw) == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0):
            return GRAM, module.in_channels, module.out_channels, ""
        return UNFOLDED, module.in_channels * kh * kw, module.out_channels, ""
    return WEIGHT, 0, 0, "not a Linear or Conv2d weight"


def _priority(plan: LayerPlan) -> tuple:
    stage_rank = {"text_encoder": 0, "cross_attention_kv": 1, "unet_spatial": 2}[plan.stage]
    attention = ".attn1." in plan.key or ".attn2." in plan.key or ".self_attn." in plan.key
    kind = 0 if attention else (1 if plan.method == GRAM else 2)
    return stage_rank, kind, plan.width, plan.key


def plan_layers(
    keys, module_of: Callable[[str], torch.nn.Module | None], budget_bytes: float, unfold_convolutions: bool = False
) -> dict[str, LayerPlan]:
    """A :class:`LayerPlan` for every fused key; Gram groups are admitted in priority order until ``budget_bytes``.

    ``k x k`` convolutions are weight-fused unless ``unfold_convolutions``: on our measurements their unfolded-patch
    statistics, exact as they are, fused identities worse than weight fusion (README, Design), and they are large."""
    candidates: dict[str, LayerPlan] = {}
    for key in sorted(set(keys)):
        stage = stage_of(key)
        if not key.endswith(".weight"):
            candidates[key] = LayerPlan(key, stage, WEIGHT, key, 0, "not a weight (a bias or another parameter)")
            continue
        method, width, outputs, reason = statistics_width(module_of(key))
        if method == UNFOLDED and not unfold_convolutions:
            method, width, outputs, reason = WEIGHT, 0, 0, "a k x k convolution (conv_layers = weight)"
        candidates[key] = LayerPlan(key, stage, method, input_group(key), width, reason, outputs)
    plans: dict[str, LayerPlan] = {k: p for k, p in candidates.items() if not p.gram}
    admitted: dict[str, bool] = {}
    used = 0.0
    for plan in sorted((p for p in candidates.values() if p.gram), key=_priority):
        cost = plan.width * plan.outputs * BYTES_PER_VALUE
        if plan.group not in admitted:
            cost += plan.width * plan.width * BYTES_PER_VALUE
            admitted[plan.group] = used + cost <= budget_bytes
        if admitted[plan.group] and used + cost <= budget_bytes:
            used += cost
            plans[plan.key] = plan
        else:
            size = cost / 2**20
            plans[plan.key] = LayerPlan(
                plan.key, plan.stage, WEIGHT, plan.group, 0, f"its statistics ({size:.0f} MB) do not fit the memory budget"
            )
    return plans


def statistics_bytes(plans: dict[str, LayerPlan]) -> float:
    """Memory the admitted statistics take (float64 Gram groups and cross terms)."""
    widths = {p.group: p.width for p in plans.values() if p.gram}
    cross = sum(p.width * p.outputs for p in plans.values() if p.gram)
    return float((sum(w * w for w in widths.values()) + cross) * BYTES_PER_VALUE)
