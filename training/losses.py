"""The losses of single-client tuning as plain tensor functions (paper 3.3.1, reference 1.7).

The denoising loss is the mean squared error to the model's target (noise for epsilon models, v for v-prediction),
averaged over the subject mask when masks are used; the attention regulariser keeps each concept word's
cross-attention on the subject (main branch's ``attn_reg``).
"""

from __future__ import annotations

import comfy.model_sampling
import torch
import torch.nn.functional as F

from ..edlora.format import EDLoRAError


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per image over the pixels ``mask`` ([B, 1, h, w], weights in 0..1) selects, averaged over the batch."""
    error = (prediction.float() - target.float()).pow(2)
    if mask is None:
        return error.mean()
    weights = mask.float().expand_as(error)
    per_image = (error * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    return per_image.mean()


def latent_masks(subject_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Subject masks ``[B, 1, H, W]`` averaged down to the latent grid ``size``."""
    return F.interpolate(subject_masks.float(), size=size, mode="area")


def attention_regularisation(maps: list[tuple[torch.Tensor, tuple[int, int]]], subject_masks: torch.Tensor) -> torch.Tensor:
    """How much the concept words attend outside the subject (main branch's ``attn_reg``, ``reg_full_identity`` off).

    ``maps`` holds, per cross-attention layer, the head-averaged attention of every pixel to each concept word
    (``[B, h*w, words]``) and the layer's grid ``(h, w)``. Layers of one resolution are averaged; each word's
    map is divided by its maximum; the penalty is the map's mean over the pixels outside the mask. Images whose
    mask covers everything contribute nothing (the original skips the NaN). Summed over words and resolutions,
    averaged over the batch.
    """
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for attention, grid in maps:
        groups.setdefault(grid, []).append(attention.float())
    total = torch.zeros((), device=subject_masks.device)
    for (height, width), layer_maps in groups.items():
        attention = torch.stack(layer_maps).mean(0)
        batch, _, words = attention.shape
        attention = attention.transpose(1, 2).reshape(batch, words, height, width)
        attention = attention / attention.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        outside = 1.0 - F.interpolate(subject_masks.float().to(attention.device), size=(height, width), mode="area")
        area = outside.sum(dim=(-2, -1))
        penalty = (attention * outside).sum(dim=(-2, -1)) / area.clamp_min(1e-8)
        penalty = torch.where(area > 1e-6, penalty, torch.zeros_like(penalty))
        total = total + penalty.mean(0).sum()
    return total


def mean_embedding_norm(embeddings: dict[str, torch.Tensor]) -> float:
    """Mean L2 norm over every layer vector of every concept word (what the freeze threshold compares)."""
    return float(torch.cat([e.detach().float() for e in embeddings.values()]).norm(dim=-1).mean())


def diffusion_target(model_sampling, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the UNet should output: the noise for epsilon models, v (``(noise - sigma x0) / sqrt(sigma^2 + 1)`` at
    sigma_data 1) for v-prediction models, in ComfyUI's sigma parametrisation (``x_t = x0 + sigma noise``)."""
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        s = sigma.reshape(-1, *([1] * (latent.dim() - 1)))
        data = float(model_sampling.sigma_data)
        return (noise * data - s * latent / data) / (s**2 + data**2).sqrt()
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return noise
    raise EDLoRAError(f"ED-LoRA training supports epsilon and v-prediction models, not {type(model_sampling).__name__}.")
