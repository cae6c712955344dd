"""Base weights as a MODEL/CLIP really computes them, read without touching the (shared) modules.

ComfyUI may keep patched weights in the modules (a loaded clone), or unpatched ones (lowvram, dynamic VRAM), so the
true original of a key is read through ``get_key_patches`` and the patcher's own patches are applied to a copy.
"""

from __future__ import annotations

import comfy.lora
import comfy.utils
import torch


def effective_weights(patcher, keys, key_patches: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights of ``keys`` as ``patcher`` would compute them (original + its patches), float32 on the CPU.

    ``key_patches`` is ``patcher.get_key_patches()`` when the caller already has it (it lists every key)."""
    key_patches = key_patches if key_patches is not None else patcher.get_key_patches()
    out = {}
    for key in keys:
        original, convert = key_patches[key][0]
        weight = convert(original.to(device="cpu", dtype=torch.float32, copy=True), inplace=True)
        patches = key_patches[key][1:]
        if patches:
            weight = comfy.lora.calculate_weight(patches, weight, key)
        out[key] = weight.detach().float()
    return out


class BaseWeights:
    """The effective weights of a base MODEL and CLIP by key, and the maps from the original's key names."""

    def __init__(self, model, clip):
        self.model = model
        self.clip = clip

    def __call__(self, keys) -> dict[str, torch.Tensor]:
        unet = [k for k in keys if k.startswith("diffusion_model.")]
        text = [k for k in keys if not k.startswith("diffusion_model.")]
        out = effective_weights(self.model, unet) if unet else {}
        if text:
            out.update(effective_weights(self.clip.patcher, text))
        return out

    def key_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """``({diffusers UNet weight key: model key}, {text_model... weight key: clip key})``."""
        unet = {
            k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(self.model.model.model_config.unet_config).items()
        }
        text = {}
        for lora_key, clip_key in comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, {}).items():
            if lora_key.startswith("text_encoder.text_model."):
                text[lora_key[len("text_encoder.") :] + ".weight"] = clip_key
        return unet, text
