"""Module names of ED-LoRA files and their standard (kohya) LoRA names.

ED-LoRA files name each adapted Linear by its diffusers path: UNet modules such as
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` and text-encoder modules such as
``text_model.encoder.layers.0.self_attn.q_proj``. Two spellings of the LoRA tensor suffix exist
(reference section 1.1): the main branch writes ``<m>.lora_down.weight`` / ``<m>.lora_up.weight``,
the research branch ``<m>_lora.down.weight`` / ``<m>_lora.up.weight``.
"""

from __future__ import annotations

import re

_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
}
_SUFFIX_RE = re.compile(
    r"^(?P<module>.+?)(?P<suffix>\.lora_down\.weight|\.lora_up\.weight|_lora\.down\.weight|_lora\.up\.weight)$"
)

#: The modules the original trains: q/k/v/out of every UNet attention (self and cross) and of every
#: CLIP self-attention. 16 transformer blocks x 2 attentions x 4 = 128 UNet and 12 x 4 = 48 text
#: modules for SD1.x.
UNET_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def split_lora_key(key: str) -> tuple[str, str] | None:
    """Split an ED-LoRA tensor key into ``(module, "down" | "up")``; None when it is no LoRA key."""
    match = _SUFFIX_RE.match(key)
    if match is None:
        return None
    return match.group("module"), _SUFFIXES[match.group("suffix")]


def main_branch_key(module: str, part: str) -> str:
    """The main-branch spelling of one LoRA tensor key (``part`` is "down" or "up")."""
    return f"{module}.lora_{part}.weight"


def research_branch_key(module: str, part: str) -> str:
    """The research-branch spelling of one LoRA tensor key (``part`` is "down" or "up")."""
    return f"{module}_lora.{part}.weight"


def kohya_unet_name(module: str) -> str:
    """``down_blocks.0.attentions.0...attn1.to_q`` -> ``lora_unet_down_blocks_0_attentions_0_..._attn1_to_q``."""
    return "lora_unet_" + module.replace(".", "_")


#: kohya's prefix per text encoder on models with two (SDXL: ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G)
KOHYA_TEXT_PREFIX = {"l": "lora_te1_", "g": "lora_te2_"}


def kohya_text_name(module: str) -> str:
    """``text_model.encoder.layers.0.self_attn.q_proj`` -> ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``;
    with an encoder first (``g.text_model...``, SDXL) -> ``lora_te2_text_model_...``."""
    encoder, _, rest = module.partition(".")
    if encoder in KOHYA_TEXT_PREFIX and rest.startswith("text_model."):
        return KOHYA_TEXT_PREFIX[encoder] + rest.replace(".", "_")
    return "lora_te_" + module.replace(".", "_")


def is_cross_attention_kv(module: str) -> bool:
    """True for the UNet cross-attention key/value projections (the paper fuses these from text features)."""
    return ".attn2.to_k" in module or ".attn2.to_v" in module
