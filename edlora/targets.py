"""The Linear layers an ED-LoRA adapts on a ComfyUI model: names in the file, keys in ComfyUI, shapes.

Mix-of-Show puts a LoRA on q/k/v/out of every UNet attention (self and cross, all transformer blocks) and of every
CLIP self-attention (reference section 1.4); on SDXL, of both text encoders. Files name them by their diffusers paths; ComfyUI keeps the weights
under its own keys. Both lists are built from ComfyUI's own key maps, so whatever is trained here loads back
through :func:`.apply.module_keys` exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import comfy.lora
import comfy.utils

from . import keys as edkeys
from .arch import ENCODER_ORDER
from .format import EDLoRAError

_TEXT_ATTENTION_RE = re.compile(
    r"^(\w+)\.transformer\.(text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj)\.weight$"
)


@dataclass(frozen=True)
class Target:
    """One adapted Linear: ``name`` in ED-LoRA files, ``key`` of its weight in ComfyUI, weight ``shape``."""

    name: str
    key: str
    shape: tuple[int, ...]

    @property
    def module_path(self) -> str:
        """Path of the Linear module inside the model object that holds ``key``."""
        return self.key[: -len(".weight")]


def unet_attention_targets(model) -> list[Target]:
    """Every UNet attention projection of ``model`` (a ModelPatcher), sorted by name.

    Sorted because ComfyUI builds its diffusers key map from sets, whose order changes with Python's hash seed.
    """
    diffusers = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    out = []
    for dkey, ldm_key in diffusers.items():
        if not dkey.endswith(".weight") or ".attentions." not in dkey or ".transformer_blocks." not in dkey:
            continue
        module = dkey[: -len(".weight")]
        if module.rsplit(".attn", 1)[-1].split(".", 1)[-1] not in edkeys.UNET_ATTENTION_PROJECTIONS:
            continue
        out.append(Target(module, f"diffusion_model.{ldm_key}", shapes[ldm_key]))
    if not out:
        raise EDLoRAError(
            "The connected MODEL has no UNet attention layers that an ED-LoRA can adapt (is it an SD1.x or SDXL UNet?)."
        )
    return sorted(out, key=lambda t: t.name)


def text_attention_targets(clip) -> list[Target]:
    """Every self-attention projection of every text encoder of the CLIP, encoder by encoder in
    :data:`.arch.ENCODER_ORDER`, in layer order (q, k, v, out per layer).

    With one encoder (SD1.x) the names are the original's (``text_model.encoder.layers.0.self_attn.q_proj``); with
    several (SDXL) each starts with its encoder (``l.text_model...``, ``g.text_model...``)."""
    state = clip.cond_stage_model.state_dict()
    found: dict[str, list[tuple[int, int, str, str]]] = {}
    order = {p: i for i, p in enumerate(("q", "k", "v", "out"))}
    for key in state:
        match = _TEXT_ATTENTION_RE.match(key)
        if match:
            prefix, name, layer, proj = match.groups()
            found.setdefault(prefix.removeprefix("clip_"), []).append((int(layer), order[proj], name, key))
    if not found:
        raise EDLoRAError("The connected CLIP has no CLIP self-attention layers an ED-LoRA can adapt.")
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    out = []
    for encoder in [n for n in ENCODER_ORDER if n in found] + sorted(set(found) - set(ENCODER_ORDER)):
        for _, _, name, key in sorted(found[encoder]):
            module = name if len(found) == 1 else f"{encoder}.{name}"
            if key_map.get(edkeys.kohya_text_name(module)) != key:
                raise EDLoRAError(f"ComfyUI has no LoRA key for the text-encoder layer '{module}'; this CLIP is not supported.")
            out.append(Target(module, key, tuple(state[key].shape)))
    return out
