"""Architecture facts in one place: where a UNet's cross-attention sits, how it groups into layers, which text
encoders a CLIP holds.

ComfyUI names a cross-attention call by ``(block name, block id, transformer index)`` in ``transformer_options``
(``block`` and ``block_index``). :func:`cross_attention_sites` walks a diffusion model's attn2 modules once, in
execution order (input blocks, middle, output blocks), and returns that name, the module path and the module.

A *layer* of layer-wise embeddings is one spatial transformer: the sites of one ``(block name, block id)``. SD1.x
has one transformer block per spatial transformer, so its 16 layers are its 16 cross-attentions, in the order of
the 16 vectors an ED-LoRA stores per concept word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: ComfyUI's key for SD1.x's one text encoder (CLIP-L) in tokenizer output and CLIP state dicts.
CLIP_L = "l"


@dataclass(frozen=True)
class CrossAttentionSite:
    """One cross-attention module: its ComfyUI name, its path inside the diffusion model, the module itself."""

    key: tuple[str, int, int]  # (block name, block id, transformer index)
    path: str  # e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    module: torch.nn.Module

    @property
    def unit(self) -> tuple[str, int]:
        """The spatial transformer the site belongs to: one layer of layer-wise embeddings."""
        return self.key[0], self.key[1]


def cross_attention_sites(diffusion_model: torch.nn.Module) -> list[CrossAttentionSite]:
    """Every cross-attention (attn2) of ``diffusion_model`` in execution order; temporal ones are skipped."""
    sites: list[CrossAttentionSite] = []
    groups = (
        ("input", "input_blocks", list(getattr(diffusion_model, "input_blocks", []))),
        ("middle", "middle_block", [getattr(diffusion_model, "middle_block", [])]),
        ("output", "output_blocks", list(getattr(diffusion_model, "output_blocks", []))),
    )
    for block_name, attribute, blocks in groups:
        for block_id, block in enumerate(blocks):
            prefix = f"{attribute}.{block_id}" if block_name != "middle" else attribute
            for index, module in enumerate(block):
                for t_index, tblock in enumerate(getattr(module, "transformer_blocks", [])):
                    attn2 = getattr(tblock, "attn2", None)
                    if attn2 is None or getattr(tblock, "switch_temporal_ca_to_sa", False):
                        continue
                    path = f"{prefix}.{index}.transformer_blocks.{t_index}.attn2"
                    sites.append(CrossAttentionSite((block_name, block_id, t_index), path, attn2))
    return sites


def layer_of_site(sites: list[CrossAttentionSite]) -> dict[tuple[str, int, int], int]:
    """``site key -> layer index``: sites of one spatial transformer share a layer, layers in execution order."""
    units: dict[tuple[str, int], int] = {}
    out = {}
    for site in sites:
        out[site.key] = units.setdefault(site.unit, len(units))
    return out


def layer_count(diffusion_model: torch.nn.Module) -> int:
    """How many layer-wise vectors a concept word needs on this model (its spatial transformers)."""
    return len({site.unit for site in cross_attention_sites(diffusion_model)})


def text_encoder_names(clip) -> list[str]:
    """The text encoders of a CLIP by ComfyUI's tokenizer keys (``["l"]`` for SD1.x), in tokenizer order."""
    return list(clip.tokenize("").keys())
