"""Ordinary LoRA files with random weights in the formats ComfyUI reads, for any of the devkit's models.

* ``kohya``: ``lora_unet_<diffusers path>`` / ``lora_te_<...>`` with ``lora_down``/``lora_up`` and ``alpha``;
  Linear layers (and ``scope="all"``: every conv too, LoCon style with ``[r, in, k, k]`` downs);
* ``peft``: diffusers/PEFT names (``unet.<path with processor>.lora_A/lora_B``, ``text_encoder.<path>``), attention only
  (the layers ComfyUI maps for that format);
* ``loha``: LyCORIS LoHa (``hada_w1_a`` ... ``hada_w2_b`` and ``alpha``) on Linear layers;
* ``lokr``: LyCORIS LoKr (``lokr_w1``, ``lokr_w2``: a Kronecker product) on Linear layers whose sides are even;
* ``dora``: kohya names plus ``dora_scale`` (weight decomposition) on Linear layers.

Module names come from ComfyUI's own key maps, so a file written here is what core LoraLoader loads.
"""

from __future__ import annotations

import json

import comfy.lora
import comfy.utils
import torch

FORMATS = ("kohya", "peft", "loha", "lokr", "dora")


def lora_targets(model, clip, scope: str = "attention") -> list[tuple[str, str, tuple[int, ...]]]:
    """``(kohya name, model key, weight shape)`` of every layer a LoRA of ``scope`` adapts, sorted by name.

    ``attention``: q/k/v/out of every UNet and CLIP attention; ``transformer``: what kohya's standard LoRA adapts
    (every Linear and 1x1 conv of the UNet's spatial transformers: attention, feed-forward, proj_in/out; CLIP
    attention and MLP); ``linear``: every Linear of both (also the time embedding); ``all``: also every convolution
    (LoCon)."""
    out = []
    if model is not None:
        shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
        diffusers = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        for dkey, ldm in sorted(diffusers.items()):
            key = f"diffusion_model.{ldm}"
            if not dkey.endswith(".weight") or key not in shapes or len(shapes[key]) < 2:
                continue
            attention = any(f".attn{i}.{p}" in dkey for i in (1, 2) for p in ("to_q.", "to_k.", "to_v.", "to_out.0."))
            conv = len(shapes[key]) == 4 and shapes[key][2:] != (1, 1)
            if scope == "attention" and not attention:
                continue
            if scope == "transformer" and ".attentions." not in dkey:
                continue
            if scope == "linear" and conv:
                continue
            out.append(("lora_unet_" + dkey[: -len(".weight")].replace(".", "_"), key, shapes[key]))
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
        # SDXL LoRAs name their two encoders lora_te1_/lora_te2_ (core also maps lora_te_ onto CLIP-L there)
        prefixes = ("lora_te1_", "lora_te2_") if any(n.startswith("lora_te2_") for n in key_map) else ("lora_te_",)
        for name, key in sorted(key_map.items()):
            if not name.startswith(prefixes) or not isinstance(key, str):
                continue
            if scope == "attention" and "self_attn" not in name:
                continue
            out.append((name, key, shapes[key]))
    return sorted(out)


def _peft_name(kohya: str, key: str, model) -> str | None:
    if kohya.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
        encoder = "text_encoder_2." if key.startswith("clip_g.") else "text_encoder."
        return encoder + key.split(".transformer.", 1)[1][: -len(".weight")]
    diffusers = {
        f"diffusion_model.{v}": k for k, v in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()
    }
    path = diffusers[key][: -len(".weight")].replace(".to_", ".processor.to_")
    return "unet." + (path[:-2] if path.endswith(".to_out.0") else path)


def make_lora(
    model,
    clip,
    kind: str = "kohya",
    scope: str = "attention",
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.05,
    tags: dict[str, int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a random LoRA of ``kind`` over the layers of ``scope`` (see :func:`lora_targets`)."""
    if kind not in FORMATS:
        raise ValueError(f"kind must be one of {FORMATS}")
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * scale

    tensors: dict[str, torch.Tensor] = {}
    for name, key, shape in lora_targets(model, clip, scope):
        out_f, in_f, *kernel = shape
        kernel = tuple(kernel) if kernel and tuple(kernel) != (1, 1) else ()
        fan_in = in_f * (kernel[0] * kernel[1] if kernel else 1)
        if kind == "peft":
            peft = _peft_name(name, key, model)
            tensors[f"{peft}.lora_A.weight"] = randn(rank, in_f)
            tensors[f"{peft}.lora_B.weight"] = randn(out_f, rank)
        elif kind == "loha":
            tensors[f"{name}.hada_w1_a"] = randn(out_f, rank)
            tensors[f"{name}.hada_w1_b"] = randn(rank, fan_in)
            tensors[f"{name}.hada_w2_a"] = randn(out_f, rank) + 1.0
            tensors[f"{name}.hada_w2_b"] = randn(rank, fan_in) + 1.0
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        elif kind == "lokr":
            if out_f % 2 or in_f % 2 or kernel:
                continue
            tensors[f"{name}.lokr_w1"] = randn(2, 2) + 1.0
            tensors[f"{name}.lokr_w2"] = randn(out_f // 2, in_f // 2)
        else:
            down = randn(rank, in_f, *kernel) if kernel else randn(rank, in_f)
            up = randn(out_f, rank, 1, 1) if kernel else randn(out_f, rank)
            if len(shape) == 4 and not kernel:  # a 1x1 convolution keeps its 4-D layout
                down, up = down.reshape(rank, in_f, 1, 1), up.reshape(out_f, rank, 1, 1)
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
            if kind == "dora":
                tensors[f"{name}.dora_scale"] = 1.0 + randn(out_f, *([1] * (len(shape) - 1))).abs()
    metadata = {"ss_network_module": "networks.lora", "mixofshow.devkit": "random weights, for tests"}
    if tags:
        metadata["ss_tag_frequency"] = json.dumps({"10_concept": tags})
    return tensors, metadata


def write_lora(path: str, model, clip, **kwargs) -> str:
    """Write :func:`make_lora` to a safetensors file."""
    tensors, metadata = make_lora(model, clip, **kwargs)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path
