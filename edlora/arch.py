"""Architecture facts in one place: which model family a MODEL/CLIP is, where a UNet's cross-attention sits, how it
groups into layers, which text encoders a CLIP holds and how wide they are.

ComfyUI names a cross-attention call by ``(block name, block id, transformer index)`` in ``transformer_options``
(``block`` and ``block_index``). :func:`cross_attention_sites` walks a diffusion model's attn2 modules once, in
execution order (input blocks, middle, output blocks), and returns that name, the module path and the module.

A *layer* of layer-wise embeddings is one spatial transformer: the sites of one ``(block name, block id)``. SD1.x
has one transformer block per spatial transformer, so its 16 layers are its 16 cross-attentions, in the order of
the 16 vectors an ED-LoRA stores per concept word. SDXL has 70 cross-attention blocks in 11 spatial transformers,
so 11 layers (README, Design: why a spatial transformer and not a block).

Text encoders go by ComfyUI's names: ``l`` (CLIP-L, SD1.x and SDXL), ``g`` (OpenCLIP bigG, SDXL), ``h`` (SD2.x). A
concept word's vector is the concatenation of one vector per encoder in :data:`ENCODER_ORDER`, the order in which
ComfyUI concatenates their outputs into SDXL's 2048-wide context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import MixOfShowError

#: ComfyUI's key for SD1.x's one text encoder (CLIP-L) in tokenizer output and CLIP state dicts.
CLIP_L = "l"
#: The order of text encoders in a concept vector (and in SDXL's context: CLIP-L's 768 then CLIP-G's 1280).
ENCODER_ORDER = ("l", "h", "g")
#: Architectures the pack supports, by ComfyUI's text encoders: what each is called in messages.
ARCHITECTURES = {("l",): "SD1.x", ("h",): "SD2.x", ("l", "g"): "SDXL"}
_TOKEN_EMBEDDING = re.compile(r"^clip_(\w+)\.transformer\.text_model\.embeddings\.token_embedding\.weight$")


class UnsupportedModelError(MixOfShowError):
    """A MODEL or CLIP of a family the pack does not handle (Flux, SD3 and other DiT models)."""


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


def text_encoder_widths(clip) -> dict[str, int]:
    """``{encoder: token embedding width}`` in :data:`ENCODER_ORDER` (``{"l": 768}`` for SD1.x)."""
    found = {}
    for key, tensor in clip.cond_stage_model.state_dict().items():
        match = _TOKEN_EMBEDDING.match(key)
        if match:
            found[match.group(1)] = int(tensor.shape[1])
    return {name: found[name] for name in ENCODER_ORDER if name in found} | {
        name: width for name, width in found.items() if name not in ENCODER_ORDER
    }


def architecture_name(encoders) -> str:
    """``SD1.x``, ``SDXL``... for a set of text encoder names; the names themselves when unknown."""
    ordered = tuple(name for name in ENCODER_ORDER if name in encoders)
    return ARCHITECTURES.get(ordered, "+".join(sorted(encoders)) or "no text encoder")


def native_resolution(model) -> int:
    """The image side a model was trained at: 1024 for SDXL-family models (those conditioned on the image size
    through ADM), 512 otherwise (SD1.x)."""
    return 1024 if getattr(model.model, "adm_channels", 0) else 512


def require_supported(model=None, clip=None, what: str = "this node") -> None:
    """Refuse, plainly, a MODEL or CLIP of a family the pack does not handle (DiT models such as Flux or SD3: they
    have no UNet cross-attention for layer-wise prompts, fusion or regions)."""
    if model is not None:
        diffusion_model = model.get_model_object("diffusion_model")
        if not cross_attention_sites(diffusion_model):
            family = type(model.model).__name__
            raise UnsupportedModelError(
                f"{what}: the connected MODEL is {family}, which has no UNet cross-attention; Mix-of-Show works on "
                "SD1.x and SDXL-family models (SDXL base, Pony, Illustrious, NoobAI...). Flux, SD3 and other DiT "
                "models are not supported."
            )
    if clip is not None:
        widths = text_encoder_widths(clip)
        if tuple(n for n in ENCODER_ORDER if n in widths) not in ARCHITECTURES or set(widths) - set(ENCODER_ORDER):
            names = ", ".join(text_encoder_names(clip))
            raise UnsupportedModelError(
                f"{what}: the connected CLIP holds the text encoders {names or 'none'}; Mix-of-Show works with SD1.x "
                "(CLIP-L) and SDXL (CLIP-L + CLIP-G) text encoders."
            )
