"""Gradient fusion and weight fusion of a CONCEPTS stack on ComfyUI's MODEL and CLIP: the two entry points.

Gradient fusion runs the original's three stages in order (:mod:`.stages`: text encoder, then cross-attention K/V
with the fused text encoder, then the other UNet layers) and solves each planned layer from streamed Gram statistics
(:mod:`.plan`, :mod:`.stats`, :mod:`.solvers`); the layers the plan weight-fuses take the mean of the concepts'
changes. Weight fusion is the paper's baseline for every layer. Both return a :class:`~.results.FusedModel` of diff
patches; base weights are read through ``get_key_patches`` (:mod:`.weights`) and never modified.
"""

from __future__ import annotations

import logging

import comfy.utils
import torch

from ..edlora.arch import require_supported, text_encoder_widths
from ..edlora.concepts import ConceptSet
from .drift import identity_drift
from .plan import WEIGHT, LayerPlan
from .results import Fingerprint, FusedModel, FusionError, FusionSettings
from .stages import (
    BaseReader,
    FusionConcept,
    cross_attention_stage,
    fusion_concepts,
    spatial_stage,
    start_run,
    text_encoder_stage,
)

log = logging.getLogger("mixofshow")


def _method(plan: LayerPlan) -> str:
    return f"{WEIGHT}: {plan.reason}" if plan.method == WEIGHT else plan.method


def concept_notes(members: list[FusionConcept]) -> list[str]:
    """What a user should know about the concepts: keys of their files that fit nothing, prompts shared by two."""
    notes = []
    for concept in members:
        if concept.unused:
            shown = ", ".join(concept.unused[:8]) + (f" and {len(concept.unused) - 8} more" if len(concept.unused) > 8 else "")
            notes.append(
                f"'{concept.entry.source}': {len(concept.unused)} keys fit no layer of this model and were not used: {shown}"
            )
    seen: dict[tuple, str] = {}
    for concept in members:
        prompts = tuple(sorted(concept.entry.text_prompts()))
        if prompts in seen:
            notes.append(
                f"{concept.name} and {seen[prompts]} use the same prompts; fusion cannot tell them apart where they differ "
                "(give each concept prompts of its own)."
            )
        seen.setdefault(prompts, concept.name)
    for note in notes:
        log.warning("Mix-of-Show fusion: %s", note)
    return notes


def gradient_fusion(
    model, clip, concepts: ConceptSet, settings: FusionSettings, previous: FusedModel | None = None, measure_drift: bool = True
) -> FusedModel:
    """Fuse ``concepts`` into ``model``/``clip`` (never modified) with the paper's gradient fusion.

    With ``previous`` (a fusion that kept its statistics), concepts already in it are not re-sampled: their
    statistics are reused and the new concepts' statistics are added before solving again.
    """
    run = start_run(model, clip, concepts, settings, previous)
    notes = concept_notes(run.members)
    run.progress = comfy.utils.ProgressBar(run.total_steps())
    with torch.inference_mode(False), torch.no_grad():
        text_diffs = run.solve("text_encoder", text_encoder_stage(run), settings.text_encoder_iters)
        text_diffs.update(run.weight_fuse("text_encoder"))
        clip_fused = clip.clone()
        clip_fused.add_patches({k: ("diff", (d,)) for k, d in text_diffs.items()}, 1.0)
        kv_diffs = run.solve("cross_attention_kv", cross_attention_stage(run, clip_fused), settings.text_encoder_iters)
        kv_diffs.update(run.weight_fuse("cross_attention_kv"))
        spatial_diffs = run.solve("unet_spatial", spatial_stage(run, clip_fused, kv_diffs), settings.unet_iters)
        spatial_diffs.update(run.weight_fuse("unet_spatial"))
        if len(run.members) == 1:
            # one concept: its own weights reach the objective's minimum (zero) on every input, where the minimum-norm
            # solution would leave the directions its samples did not excite at the base; fusing one concept gives it
            (concept,) = run.members
            for diffs in (text_diffs, kv_diffs, spatial_diffs):
                for key in diffs:
                    w0 = run.base(key)
                    diffs[key] = concept.target(key, w0) - w0
    fused = FusedModel(
        method=f"gradient fusion ({settings.solver})",
        unet_diffs={**kv_diffs, **spatial_diffs},
        text_diffs=text_diffs,
        concepts=concepts,
        settings=settings.as_metadata(),
        stage_reports=run.reports,
        stats={stage: stats.to("cpu") for stage, stats in run.stats.items()},
        base_fingerprint=run.base_fingerprint,
        layer_methods={key: _method(plan) for key, plan in run.plans.items()},
        notes=notes,
        encoders=text_encoder_widths(clip),
    )
    if measure_drift:
        fused.drift = identity_drift(model, clip, fused)
    log.info("%s", fused.report())
    return fused


def weight_fusion(
    model, clip, concepts: ConceptSet, weights: list[float] | None = None, measure_drift: bool = True
) -> FusedModel:
    """The paper's baseline (Eq. 2): ``W0 + sum_i w_i (W_i - W0)`` with ``sum_i w_i = 1`` (equal weights by default),
    ``W_i`` being what ComfyUI computes for concept *i*'s file at its strength."""
    require_supported(model, clip, "MoS Weight Fusion")
    members = fusion_concepts(concepts, model, clip)
    weights = list(weights) if weights else [1.0] * len(members)
    if len(weights) != len(members):
        raise FusionError(f"weights has {len(weights)} values but CONCEPTS holds {len(members)} concepts.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError("weights must be non-negative and not all zero.")
    weights = [w / sum(weights) for w in weights]
    base = BaseReader(model, clip)
    keys = sorted(set().union(*(c.patched_keys() for c in members)))
    unet_diffs: dict[str, torch.Tensor] = {}
    text_diffs: dict[str, torch.Tensor] = {}
    digest = Fingerprint()
    for key in keys:
        w0 = base(key)
        digest.add(key, w0)
        diff = torch.zeros_like(w0)
        for concept, w in zip(members, weights, strict=True):
            if key in concept.unet_patches or key in concept.clip_patches:
                diff += w * (concept.target(key, w0) - w0)
        (unet_diffs if key.startswith("diffusion_model.") else text_diffs)[key] = diff
    fused = FusedModel(
        method="weight fusion",
        unet_diffs=unet_diffs,
        text_diffs=text_diffs,
        concepts=concepts,
        settings={"weights": ",".join(f"{w:.6g}" for w in weights)},
        base_fingerprint=digest.hexdigest(),
        layer_methods={key: WEIGHT for key in keys},
        notes=concept_notes(members),
        encoders=text_encoder_widths(clip),
    )
    if measure_drift:
        fused.drift = identity_drift(model, clip, fused)
    log.info("%s", fused.report())
    return fused
