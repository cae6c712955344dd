"""Applying an ED-LoRA's adapters to ComfyUI's MODEL and CLIP as patches on clones.

ED-LoRA module names are rewritten to their kohya names (:mod:`.keys`) and resolved through ComfyUI's own LoRA
key maps, so the patches are exactly what core's LoraLoader would build for a kohya file with scale 1:
``W + strength * up @ down``.

:func:`fit_to_model` is the one check of an ED-LoRA against a model, used by every path (loader, fusion, drift,
training): its embeddings have the text encoder's width and one vector per layer (or a single one), every module
exists in the model and its delta has exactly the weight's shape. Anything else stops with an error naming the
file and the first module or word at fault, before any work starts. (Whether values are finite and tensors pair
up is checked when the file is read, :mod:`.format`.)
"""

from __future__ import annotations

import math

import comfy.lora
import torch

from . import keys as edkeys
from .arch import architecture_name, layer_count, text_encoder_widths
from .concepts import ConceptEntry, ConceptSet
from .format import EDLoRA, EDLoRAError, to_kohya_state_dict
from .loras import lora_patches
from .routing import install_layer_routing


def _resolve(pairs, namer, key_map: dict, state_shapes: dict, what: str, edlora: EDLoRA) -> dict[str, str]:
    to_load: dict[str, str] = {}
    unmatched: list[str] = []
    for module, pair in pairs.items():
        kohya = namer(module)
        model_key = key_map.get(kohya)
        if model_key is None or model_key not in state_shapes:
            unmatched.append(module)
            continue
        want = tuple(state_shapes[model_key])
        got = (pair.up.shape[0], pair.down.shape[1], *pair.down.shape[2:])
        if not delta_fits(got, want):
            raise EDLoRAError(
                f"'{edlora.name}': the {what} LoRA for '{module}' has shape {list(got)} but the model's weight is "
                f"{list(want)}. The file is damaged or was trained for a different base architecture (an SD1.x file on an "
                "SDXL model, or the reverse?)."
            )
        to_load[kohya] = model_key
    if unmatched:
        raise EDLoRAError(
            f"'{edlora.name}': {len(unmatched)} of {len(pairs)} {what} LoRA modules do not exist in the connected "
            f"model (first: '{unmatched[0]}'). The file was trained for a different architecture."
        )
    return to_load


def delta_fits(delta_shape: tuple, weight_shape: tuple) -> bool:
    """A LoRA delta fits a weight when the shapes are equal, or differ only by trailing 1s (Linear vs 1x1 conv)."""
    delta_shape, weight_shape = tuple(delta_shape), tuple(weight_shape)
    if delta_shape == weight_shape:
        return True
    return delta_shape[:2] == weight_shape[:2] and math.prod(delta_shape[2:]) == 1 and math.prod(weight_shape[2:]) == 1


def _state_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def text_embedding_width(clip) -> int:
    """Width of a concept vector on this CLIP: its text encoders' token embeddings side by side (768 for SD1.x
    CLIP-L, 768 + 1280 for SDXL)."""
    widths = text_encoder_widths(clip)
    if not widths:
        raise EDLoRAError("The connected CLIP has no token embedding table; is it a CLIP text encoder?")
    return sum(widths.values())


def token_embedding(clip, token: int) -> torch.Tensor:
    """The embedding of token id ``token`` in every text encoder, side by side in :data:`.arch.ENCODER_ORDER`
    (``[width]``, float32), like a concept vector."""
    state = clip.cond_stage_model.state_dict()
    parts = []
    for name in text_encoder_widths(clip):
        table = state[f"clip_{name}.transformer.text_model.embeddings.token_embedding.weight"]
        # index_select copies the row: a view of an inference tensor (ComfyUI loads weights as such) cannot be taken
        # outside inference mode, where training runs
        parts.append(table.index_select(0, torch.tensor([token], device=table.device))[0])
    if not parts:
        raise EDLoRAError("The connected CLIP has no token embedding table; is it a CLIP text encoder?")
    return torch.cat([p.detach().float() for p in parts]).clone()


def module_keys(edlora: EDLoRA, model, clip) -> tuple[dict[str, str], dict[str, str]]:
    """``({unet module: model weight key}, {text module: clip weight key})``; mismatches raise like the loader."""
    unet, text = {}, {}
    if model is not None and edlora.unet:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        to_load = _resolve(edlora.unet, edkeys.kohya_unet_name, key_map, _state_shapes(model.model), "UNet", edlora)
        unet = {m: to_load[edkeys.kohya_unet_name(m)] for m in edlora.unet}
    if clip is not None and edlora.text_encoder:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        to_load = _resolve(
            edlora.text_encoder, edkeys.kohya_text_name, key_map, _state_shapes(clip.cond_stage_model), "text-encoder", edlora
        )
        text = {m: to_load[edkeys.kohya_text_name(m)] for m in edlora.text_encoder}
    return unet, text


def fit_to_model(edlora: EDLoRA, model, clip) -> tuple[dict[str, str], dict[str, str]]:
    """The one check of ``edlora`` against ``model``/``clip`` (either may be None); returns :func:`module_keys`."""
    check_embeddings_fit(edlora, model, clip)
    return module_keys(edlora, model, clip)


def edlora_patches(edlora: EDLoRA, model, clip) -> tuple[dict, dict]:
    """ComfyUI patch dicts ``(unet_patches, clip_patches)`` for ``edlora`` on ``model``/``clip`` (either may be None)."""
    unet_keys, text_keys = module_keys(edlora, model, clip)
    kohya_sd = to_kohya_state_dict(edlora)
    unet_patches, clip_patches = {}, {}
    if unet_keys:
        to_load = {edkeys.kohya_unet_name(m): key for m, key in unet_keys.items()}
        unet_patches = comfy.lora.load_lora(kohya_sd, to_load, log_missing=False)
    if text_keys:
        to_load = {edkeys.kohya_text_name(m): key for m, key in text_keys.items()}
        clip_patches = comfy.lora.load_lora(kohya_sd, to_load, log_missing=False)
    return unet_patches, clip_patches


def check_embeddings_fit(edlora: EDLoRA, model, clip) -> None:
    """Refuse embeddings whose width or layer count cannot serve this CLIP / UNet (none: nothing to check)."""
    if not edlora.embeddings:
        return
    if clip is not None:
        have, want = edlora.encoder_widths(), text_encoder_widths(clip)
        if have != want:
            mine, theirs = architecture_name(have), architecture_name(want)
            if mine != theirs:
                raise EDLoRAError(
                    f"'{edlora.name}' is an {mine} ED-LoRA (text encoders {_widths(have)}) but the connected model is "
                    f"{theirs} ({_widths(want)}); use it with an {mine} model."
                )
            raise EDLoRAError(
                f"'{edlora.name}': concept embeddings are {edlora.width} wide ({_widths(have)}) but the connected text "
                f"encoder uses {sum(want.values())}-wide token embeddings ({_widths(want)}; SD1.x CLIP-L is 768)."
            )
    if model is not None:
        layers = layer_count(model.get_model_object("diffusion_model"))
        if edlora.layers not in (1, layers):
            raise EDLoRAError(
                f"'{edlora.name}': concept embeddings have {edlora.layers} layer-wise vectors per word "
                f"but the connected model has {layers} cross-attention layers."
            )


def concept_patches(entry: ConceptEntry, model, clip) -> tuple[dict, dict, list[str]]:
    """``(unet patches, clip patches, unused file keys)`` of one concept on ``model``/``clip``, at strength 1.

    ED-LoRAs are checked with :func:`fit_to_model` (any misfit is an error); ordinary LoRAs go through ComfyUI's own
    key maps and adapters (:func:`.loras.lora_patches`), which leave keys that fit nothing for the caller to report.
    """
    if entry.lora is not None:
        patches = lora_patches(entry.lora, model, clip)
        return patches.unet, patches.clip, patches.unused
    fit_to_model(entry.edlora, model, clip)
    unet, text = edlora_patches(entry.edlora, model, clip)
    return unet, text, []


def _widths(widths: dict[str, int]) -> str:
    return " + ".join(f"{name} {width}" for name, width in widths.items()) or "none"


def check_concepts_fit(concepts: ConceptSet | None, model, clip) -> None:
    """:func:`check_embeddings_fit` for every concept of a CONCEPTS value (either model or clip may be None)."""
    for entry in concepts.entries if concepts is not None else ():
        check_embeddings_fit(entry.edlora, model, clip)


def load_edlora_into(
    model, clip, edlora: EDLoRA, unet_strength: float, text_encoder_strength: float, concepts: ConceptSet | None = None
):
    """Patched clones of ``model`` and ``clip`` plus the extended :class:`ConceptSet`.

    The inputs are never modified. Concept-word clashes and architecture mismatches raise before anything is built.
    """
    concepts = (concepts or ConceptSet()).add(ConceptEntry(edlora, unet_strength, text_encoder_strength))
    fit_to_model(edlora, model, clip)
    unet_patches, clip_patches = edlora_patches(edlora, model, clip)
    new_model = None
    if model is not None:
        new_model = model.clone()
        if unet_strength != 0 and unet_patches:
            new_model.add_patches(unet_patches, unet_strength)
        install_layer_routing(new_model)
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        if text_encoder_strength != 0 and clip_patches:
            new_clip.add_patches(clip_patches, text_encoder_strength)
    return new_model, new_clip, concepts
