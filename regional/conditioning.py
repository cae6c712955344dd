"""Regional conditioning on a MODEL/CLIP: encode every region's prompt and negative, install the region patch.

What MoS Regional Conditioning does, as a plain function: the global prompt and negative become ordinary
CONDITIONING for any sampler; each region's prompt and negative are encoded layer-wise (with their concepts'
vectors) and a clone of the model gets layer routing plus :class:`.patch.RegionalCrossAttention`.
"""

from __future__ import annotations

import torch

from ..edlora.apply import check_concepts_fit
from ..edlora.concepts import ConceptSet
from ..edlora.encode import encode_prompt
from ..edlora.format import EDLoRAError
from ..edlora.routing import install_layer_routing, layer_stack_of
from .patch import RegionalCrossAttention, RegionContexts
from .spec import Region, RegionError


def encode_region(clip, concepts: ConceptSet, region: Region, index: int) -> RegionContexts:
    """The region's prompt and negative as ``[1, layers, tokens, width]`` stacks (layers 1 for plain prompts)."""

    def stack_of(text: str, what: str) -> torch.Tensor:
        try:
            entry = encode_prompt(clip, concepts, text)[0]
        except EDLoRAError as exc:
            raise RegionError(f"{region.label(index)} {what}: {exc}") from None
        layered = layer_stack_of(entry)
        return layered if layered is not None else entry[0].unsqueeze(1)

    return RegionContexts(region, stack_of(region.prompt, "prompt"), stack_of(region.negative, "negative prompt"))


def regional_conditioning(
    model, clip, prompt: str, negative: str, regions: tuple[Region, ...], concepts: ConceptSet | None = None
) -> tuple[object, list, list]:
    """``(model with region-aware cross-attention, global positive, global negative)``; inputs are not modified."""
    concepts = concepts or ConceptSet()
    check_concepts_fit(concepts, model, clip)
    if not regions:
        raise RegionError("MoS Regional Conditioning: no regions; connect MoS Region or MoS Regions From Text.")
    for index, region in enumerate(regions):
        region.validate(index)
    contexts = [encode_region(clip, concepts, region, i) for i, region in enumerate(regions)]
    positive = encode_prompt(clip, concepts, prompt)
    if {c.positive.shape[-1] for c in contexts} != {positive[0][0].shape[-1]}:
        raise RegionError("MoS Regional Conditioning: region prompts and the global prompt encode to different widths.")
    new_model = model.clone()
    install_layer_routing(new_model)
    RegionalCrossAttention(new_model.get_model_object("diffusion_model"), contexts).install(new_model)
    return new_model, positive, encode_prompt(clip, concepts, negative)
