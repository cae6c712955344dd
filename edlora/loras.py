"""Ordinary LoRA files (kohya, diffusers/PEFT, LyCORIS LoCon/LoHa/LoKr, DoRA...) as concepts.

Nothing here computes a LoRA's weights: ComfyUI's own key maps and weight adapters do (``comfy.lora``), so every
adapter type core LoraLoader reads works the same way here, and the fused target of a concept is exactly what
LoraLoader would apply. This module reads the file safely, turns it into ComfyUI patches for a MODEL/CLIP, reports
the keys that fit nothing in the model, and suggests prompts from the file's own training metadata.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import torch

from .arch import architecture_name, text_encoder_widths
from .errors import ModelFileError
from .files import is_safetensors, read_safetensors, read_torch

#: How many of a file's most frequent training tags make the suggested prompts.
SUGGESTED_TAGS = 6


class LoRAFileError(ModelFileError):
    """A LoRA file that cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA file's tensors and metadata, read safely and checked to be finite."""

    name: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.name))[0]


def load_lora_file(path: str, name: str | None = None) -> LoRAFile:
    """Read a LoRA (``.safetensors``/``.sft``, or a weights-only ``.pt``/``.pth``/``.ckpt``) and check its tensors."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise LoRAFileError(f"LoRA file '{name}' does not exist ({path}).")
    if is_safetensors(path):
        tensors, metadata = read_safetensors(path, name, LoRAFileError)
    else:
        state = read_torch(path, name, LoRAFileError)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise LoRAFileError(f"'{name}' is not a LoRA: it does not map key names to tensors.")
        tensors, metadata = dict(state), {}
    if not tensors:
        raise LoRAFileError(f"'{name}' holds no tensors; it is empty or not a LoRA.")
    if metadata.get("format_name", "").startswith("mixofshow."):
        raise LoRAFileError(f"'{name}' is a Mix-of-Show {metadata['format_name'].split('.', 1)[1]} file, not an ordinary LoRA.")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoRAFileError(f"'{name}': tensor '{key}' contains NaN or infinite values; the file is damaged.")
    return LoRAFile(name, tensors, metadata)


def suggested_prompts(lora: LoRAFile) -> list[str]:
    """Prompts from the file's training metadata: a trigger phrase (``modelspec.trigger_phrase``) or the most
    frequent tags of kohya's ``ss_tag_frequency``; empty when the file has neither."""
    phrase = lora.metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [phrase]
    try:
        datasets = json.loads(lora.metadata.get("ss_tag_frequency", "") or "{}")
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    if isinstance(datasets, dict):
        for tags in datasets.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(tag, str) and tag.strip() and isinstance(count, (int, float)):
                        counts[tag.strip()] += count
    ranked = [tag for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:SUGGESTED_TAGS]
    if not ranked:
        return []
    prompts = [", ".join(ranked)]
    if len(ranked) > 2:
        prompts.append(", ".join(ranked[:2]))
    return prompts


@contextmanager
def comfy_warnings():
    """Collect the warnings ComfyUI's LoRA code logs (which keys it left unused, which patches failed)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)


@dataclass
class LoRAPatches:
    """A LoRA as ComfyUI patches for one MODEL/CLIP (strength 1), and the file's keys that fit neither."""

    unet: dict[str, object]
    clip: dict[str, object]
    unused: list[str]


def lora_patches(lora: LoRAFile, model, clip) -> LoRAPatches:
    """ComfyUI's patches for ``lora`` on ``model``/``clip`` (either may be None), through core's key maps.

    A file none of whose keys fits the model is refused, naming the first keys; keys that fit nothing while others
    do are returned in ``unused`` for the caller to report (core LoraLoader logs them as "lora key not loaded")."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(dict(lora.tensors))
    with comfy_warnings() as messages:
        loaded = comfy.lora.load_lora(converted, key_map, log_missing=True)
    prefix = "lora key not loaded: "
    unused = sorted(m[len(prefix) :] for m in messages if m.startswith(prefix))
    unet_keys = set(model.model.state_dict()) if model is not None else set()
    clip_keys = set(clip.cond_stage_model.state_dict()) if clip is not None else set()
    unet, text = {}, {}
    for key, patch in loaded.items():
        name = key[0] if isinstance(key, tuple) else key
        if name in unet_keys:
            unet[key] = patch
        elif name in clip_keys:
            text[key] = patch
        else:
            unused.append(str(name))
    if not unet and not text:
        first = ", ".join(sorted(lora.tensors)[:3])
        raise LoRAFileError(
            f"'{lora.name}' does not fit the connected model: none of its {len(lora.tensors)} tensors matches a layer "
            f"(first keys: {first}). It was made for another architecture (an SDXL LoRA on an SD1.x model, or the reverse?)."
        )
    _check_patch_shapes(lora, model, clip, {**unet, **text})
    return LoRAPatches(unet, text, unused)


def _check_patch_shapes(lora: LoRAFile, model, clip, patches: dict) -> None:
    """Refuse a file some of whose patches cannot produce their weight's shape.

    Names alone do not tell architectures apart: SD1.x and SDXL share kohya names for many layers (and CLIP-L
    entirely), so an SD1.x LoRA on SDXL fits most names but not the 2048-wide cross-attention keys and values, where
    ComfyUI would log an error and leave the weight alone. Each patch is computed once, by ComfyUI, on a weight of the
    right shape on the meta device (no memory, no arithmetic); a failure there is confirmed on the real weight, since
    an adapter may not support the meta device."""
    shapes = {}
    for module in (model.model if model is not None else None, clip.cond_stage_model if clip is not None else None):
        if module is not None:
            shapes.update(module.state_dict())
    for key, patch in patches.items():
        if isinstance(key, tuple):  # a patch on a slice of a fused weight (not used by SD1.x/SDXL key maps)
            continue
        name = key
        weight = shapes[name]
        if _patch_problem(patch, torch.empty(weight.shape, device="meta"), name) is None:
            continue
        problem = _patch_problem(patch, weight.detach().float().clone(), name)
        if problem is not None:
            connected = architecture_name(text_encoder_widths(clip)) if clip is not None else "connected"
            raise LoRAFileError(
                f"'{lora.name}' does not fit the {connected} model: its patch for '{name}' cannot make a weight of shape "
                f"{list(weight.shape)} ({problem}). It was made for another architecture (an SD1.x LoRA on an SDXL "
                "model, or the reverse?) or is damaged."
            )


def _patch_problem(patch, weight: torch.Tensor, key: str) -> str | None:
    """What ComfyUI reports when it computes ``patch`` onto ``weight`` (None: it fits)."""
    with comfy_warnings() as messages:
        try:
            out = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key)
        except Exception as exc:  # an adapter that raises instead of logging
            return f"{type(exc).__name__}: {exc}"
    problem = next((m for m in messages if key in m or "ERROR" in m), None)
    if problem is None and tuple(out.shape) != tuple(weight.shape):
        problem = f"it gives shape {list(out.shape)}"
    return problem
