"""Per-layer context routing: cross-attention layer *i* sees the prompt encoded with layer *i*'s vectors.

How the 16 encodings travel through ComfyUI (a design decision, see README "Design"):

* MoS Text Encode returns an ordinary conditioning whose tensor is the mean of the layer encodings (what
  ControlNet and any unrouted model see) and whose ``model_conds`` carry a :class:`LayerContextCond` with the
  full ``[batch, layers, tokens, width]`` stack. Core nodes that copy conditioning dicts keep it.
* A DIFFUSION_MODEL wrapper moves the stack from the model call's keyword arguments into
  ``transformer_options`` and an ``attn2_patch`` (:class:`LayerContextRouter`) swaps each cross-attention's
  context for its layer's slice, found from ``(block, block_index)``.
* A CALC_COND_BATCH wrapper gives conds without a stack (a plain negative prompt) their own context repeated
  over the layers, so ComfyUI still batches cond and uncond into one UNet call.

The layer order is discovered from the model (:mod:`.arch`: attn2 modules in execution order, one layer per
spatial transformer), which for SD1.x is the 16-layer order of ED-LoRA embeddings.
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.patcher_extension
import torch

from .arch import cross_attention_sites, layer_of_site
from .format import EDLoRAError

LAYER_CONTEXT_KEY = "mos_layer_context"
WRAPPER_KEY = "mixofshow_layer_context"


class LayerContextCond(comfy.conds.CONDRegular):
    """A ``[batch, layers, tokens, width]`` stack of layer-wise contexts, batched like cross-attention conds."""

    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a[:2] != b[:2] or a[3] != b[3]:
            return False
        if a[2] != b[2] and math.lcm(a[2], b[2]) // min(a[2], b[2]) > 4:
            return False
        return self.cond.device == other.cond.device

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = math.lcm(*[c.shape[2] for c in conds])
        return torch.cat([c.repeat(1, 1, length // c.shape[2], 1) if c.shape[2] < length else c for c in conds])


def layerwise_conditioning(stack: torch.Tensor, extra: dict) -> list:
    """A CONDITIONING entry for ``stack`` ``[batch, layers, tokens, width]``; ``extra`` holds pooled output etc."""
    model_conds = dict(extra.get("model_conds", {}))
    model_conds[LAYER_CONTEXT_KEY] = LayerContextCond(stack)
    return [stack.mean(dim=1), {**extra, "model_conds": model_conds}]


def layer_stack_of(entry) -> torch.Tensor | None:
    """The layer stack of one CONDITIONING entry, or None for a plain one."""
    cond = entry[1].get("model_conds", {}).get(LAYER_CONTEXT_KEY)
    return None if cond is None else cond.cond


class LayerContextRouter:
    """attn2_patch: give cross-attention layer *i* the slice *i* of the layer-context stack of its batch."""

    def __init__(self, layer_of: dict[tuple[str, int, int], int]):
        self.index = dict(layer_of)

    def __call__(self, n, context, value, extra_options):
        stack = extra_options.get(LAYER_CONTEXT_KEY)
        block = extra_options.get("block")
        if stack is None or block is None:
            return n, context, value
        layer = self.index.get((block[0], block[1], extra_options.get("block_index", 0)))
        if layer is None or stack.shape[0] != n.shape[0]:
            return n, context, value
        routed = stack[:, layer if stack.shape[1] > 1 else 0].to(device=context.device, dtype=context.dtype)
        return n, routed, routed


class LayerContextMover:
    """DIFFUSION_MODEL wrapper: hands the layer-context stack of a UNet call to the attn2 patches, after checking
    that it has one encoding per layer of this model (or one for all), so a prompt encoded for another model stops
    with an error instead of being routed to the wrong layers."""

    def __init__(self, layers: int):
        self.layers = layers

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        stack = kwargs.pop(LAYER_CONTEXT_KEY, None)
        if stack is not None:
            if stack.shape[1] not in (1, self.layers):
                raise EDLoRAError(
                    f"A prompt was encoded with {stack.shape[1]} layer-wise concept vectors per word, but this model has "
                    f"{self.layers} cross-attention layers: the concepts were made for another model."
                )
            transformer_options = {**transformer_options, LAYER_CONTEXT_KEY: stack}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def _fill_missing_stacks(executor, model, conds, x_in, timestep, model_options):
    layers = None
    for cond_list in conds:
        for cond in cond_list or []:
            stack = cond.get("model_conds", {}).get(LAYER_CONTEXT_KEY)
            if stack is not None:
                layers = stack.cond.shape[1]
    if layers is not None:
        conds = [None if cond_list is None else [_with_stack(c, layers) for c in cond_list] for cond_list in conds]
    return executor(model, conds, x_in, timestep, model_options)


def _with_stack(cond: dict, layers: int) -> dict:
    model_conds = cond.get("model_conds", {})
    crossattn = model_conds.get("c_crossattn")
    if LAYER_CONTEXT_KEY in model_conds or crossattn is None:
        return cond
    stack = crossattn.cond.unsqueeze(1).expand(-1, layers, -1, -1)
    return {**cond, "model_conds": {**model_conds, LAYER_CONTEXT_KEY: LayerContextCond(stack)}}


def is_routed(model_patcher) -> bool:
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    return any(isinstance(p, LayerContextRouter) for p in patches.get("attn2_patch", []))


def install_layer_routing(model_patcher) -> int:
    """Install routing on ``model_patcher`` (a clone the caller owns); returns the number of routed layers.

    Installing twice is a no-op, so chained loaders share one router.
    """
    layer_of = layer_of_site(cross_attention_sites(model_patcher.get_model_object("diffusion_model")))
    layers = len(set(layer_of.values()))
    if is_routed(model_patcher):
        return layers
    model_patcher.set_model_attn2_patch(LayerContextRouter(layer_of))
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, LayerContextMover(layers))
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, _fill_missing_stacks)
    return layers
