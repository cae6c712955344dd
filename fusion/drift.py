"""Identity drift: how far a fused model's noise prediction moves from each concept's own model.

One protocol for every fusion method, so their reports compare: a 512x512 latent, three noise levels, a fixed
noise seed per concept, the concept's first sample prompt (``photo of a {concept}`` for an ED-LoRA), no CFG.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from ..edlora.apply import concept_patches
from ..edlora.concepts import ConceptSet
from ..edlora.encode import encode_prompt
from ..edlora.routing import install_layer_routing
from .results import FusedModel

DRIFT_SIGMAS = (8.0, 1.0, 0.2)
DRIFT_RESOLUTION = 512
DRIFT_SEED = 1000


def denoiser_outputs(model, positive, latent: torch.Tensor, sigmas: list[float], seed: int) -> list[torch.Tensor]:
    """The model's noise predictions (no CFG) at ``latent + noise * sigma`` for each sigma, through ComfyUI's sampler stack."""
    outputs: list[torch.Tensor] = []
    sigma_list = list(sigmas)

    def evaluate(model_k, x, sigma_schedule, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        base_noise = x / sigma_schedule[0]
        for sigma in sigma_list:
            s = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
            x_s = base_noise * sigma
            denoised = model_k(x_s, s, **extra_args)
            outputs.append(((x_s - denoised) / sigma).float().cpu())
        return x

    sampler = comfy.samplers.KSAMPLER(evaluate)
    noise = comfy.sample.prepare_noise(latent, seed)
    schedule = torch.tensor(sigma_list + [0.0])
    with torch.no_grad():
        comfy.sample.sample_custom(model, noise, 1.0, sampler, schedule, positive, positive, latent, disable_pbar=True, seed=seed)
    return outputs


def identity_drift(model, clip, fused: FusedModel, resolution: int = DRIFT_RESOLUTION) -> dict[str, float]:
    """Per concept: ``||eps_fused - eps_single|| / ||eps_single||`` on the concept's prompt at a few noise levels.
    (``resolution``: the square latent's side in pixels; models trained at another size use their own.)

    ``eps_single`` comes from the base model with only that concept's own LoRA (at its fusion strengths), the
    reference the fusion tries to preserve; ``eps_fused`` from the fused model with the same prompt (the concept's
    first sample prompt), latent and noise.
    """
    fused_model, fused_clip = fused.apply(model, clip)
    sampling = model.get_model_object("model_sampling")
    sigmas = [min(max(s, float(sampling.sigma_min)), float(sampling.sigma_max)) for s in DRIFT_SIGMAS]
    side = resolution // 8
    latent = torch.zeros(1, 4, side, side)
    out = {}
    for index, entry in enumerate(fused.concepts.entries):
        comfy.model_management.throw_exception_if_processing_interrupted()
        name = entry.name
        single = ConceptSet((entry,))
        unet_patches, text_patches, _ = concept_patches(entry, model, clip)
        single_model = model.clone()
        if unet_patches:
            single_model.add_patches(unet_patches, entry.unet_strength)
        install_layer_routing(single_model)
        single_clip = clip.clone()
        if text_patches:
            single_clip.add_patches(text_patches, entry.text_encoder_strength)
        prompt = entry.sample_prompts()[0]
        seed = DRIFT_SEED + index
        reference = denoiser_outputs(single_model, encode_prompt(single_clip, single, prompt), latent, sigmas, seed)
        fused_out = denoiser_outputs(fused_model, encode_prompt(fused_clip, fused.concepts, prompt), latent, sigmas, seed)
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(fused_out, reference, strict=True))
        den = sum(float((b**2).sum()) for b in reference)
        out[name] = (num / max(den, 1e-30)) ** 0.5
    return out
