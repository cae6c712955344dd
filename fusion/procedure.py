"""Gradient fusion and weight fusion of a CONCEPTS stack on ComfyUI's MODEL and CLIP: the two entry points.

Gradient fusion runs the original's three stages in order (:mod:`.stages`: text encoder, then cross-attention K/V
with the fused text encoder, then the other UNet layers) and solves each layer from streamed Gram statistics
(:mod:`.stats`, :mod:`.solvers`). Weight fusion is the paper's baseline. Both return a :class:`~.results.FusedModel`
of diff patches; base weights are read through ``get_key_patches`` (:mod:`.weights`) and never modified.
"""

from __future__ import annotations

import logging

import comfy.utils
import torch

from ..edlora.concepts import ConceptSet
from .drift import identity_drift
from .results import FusedModel, FusionError, FusionSettings, fingerprint
from .stages import concept_loras, cross_attention_stage, run_fingerprint, spatial_stage, start_run, text_encoder_stage
from .weights import effective_weights

log = logging.getLogger("mixofshow")


def gradient_fusion(
    model, clip, concepts: ConceptSet, settings: FusionSettings, previous: FusedModel | None = None, measure_drift: bool = True
) -> FusedModel:
    """Fuse ``concepts`` into ``model``/``clip`` (never modified) with the paper's gradient fusion.

    With ``previous`` (a fusion that kept its statistics), concepts already in it are not re-sampled: their
    statistics are reused and the new concepts' statistics are added before solving again.
    """
    run = start_run(model, clip, concepts, settings, previous)
    run.progress = comfy.utils.ProgressBar(run.total_steps())
    with torch.inference_mode(False), torch.no_grad():
        text_diffs = run.solve("text_encoder", text_encoder_stage(run), settings.text_encoder_iters)
        clip_fused = clip.clone()
        clip_fused.add_patches({k: ("diff", (d,)) for k, d in text_diffs.items()}, 1.0)
        kv_diffs = run.solve("cross_attention_kv", cross_attention_stage(run, clip_fused), settings.text_encoder_iters)
        spatial_diffs = run.solve("unet_spatial", spatial_stage(run, clip_fused, kv_diffs), settings.unet_iters)
    fused = FusedModel(
        method=f"gradient fusion ({settings.solver})",
        unet_diffs={**kv_diffs, **spatial_diffs},
        text_diffs=text_diffs,
        concepts=concepts,
        settings=settings.as_metadata(),
        stage_reports=run.reports,
        stats={stage: stats.to("cpu") for stage, stats in run.stats.items()},
        base_fingerprint=run_fingerprint(run),
    )
    if measure_drift:
        fused.drift = identity_drift(model, clip, fused)
    log.info("%s", fused.report())
    return fused


def weight_fusion(
    model, clip, concepts: ConceptSet, weights: list[float] | None = None, measure_drift: bool = True
) -> FusedModel:
    """The paper's baseline (Eq. 2): ``W0 + sum_i w_i a_i dW_i`` with ``sum_i w_i = 1`` (equal weights by default)."""
    loras = concept_loras(concepts, model, clip)
    weights = list(weights) if weights else [1.0] * len(loras)
    if len(weights) != len(loras):
        raise FusionError(f"weights has {len(weights)} values but CONCEPTS holds {len(loras)} ED-LoRAs.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError("weights must be non-negative and not all zero.")
    weights = [w / sum(weights) for w in weights]
    unet_diffs: dict[str, torch.Tensor] = {}
    text_diffs: dict[str, torch.Tensor] = {}
    for concept, w in zip(loras, weights, strict=True):
        for section, keys, out in (("unet", concept.unet_keys, unet_diffs), ("text", concept.text_keys, text_diffs)):
            for key in keys.values():
                delta = concept.delta(section, key)
                out[key] = out.get(key, 0) + w * delta
    shapes = model.model.state_dict()
    unet_diffs = {k: v.reshape(shapes[k].shape).float() for k, v in unet_diffs.items()}
    clip_shapes = clip.cond_stage_model.state_dict()
    text_diffs = {k: v.reshape(clip_shapes[k].shape).float() for k, v in text_diffs.items()}
    w0 = {**effective_weights(clip.patcher, sorted(text_diffs)), **effective_weights(model, sorted(unet_diffs))}
    fused = FusedModel(
        method="weight fusion",
        unet_diffs=unet_diffs,
        text_diffs=text_diffs,
        concepts=concepts,
        settings={"weights": ",".join(f"{w:.6g}" for w in weights)},
        base_fingerprint=fingerprint(w0),
    )
    if measure_drift:
        fused.drift = identity_drift(model, clip, fused)
    log.info("%s", fused.report())
    return fused
