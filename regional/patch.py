"""Region-aware cross-attention (Mix-of-Show regionally controllable sampling, reference section 3.3).

At every cross-attention layer and step: the global prompt is attended as usual; each region's queries attend to
that region's own prompt (its own layer-wise context); a query covered by regions takes the mean of their outputs
(soft masks weight it) and uncovered queries keep the global result; the unconditional half of CFG uses each
region's own negative prompt. Generalised to soft masks by

    out = (w_g * global + sum_r m_r * region_r) / (w_g + sum_r m_r),   w_g = max(0, 1 - sum_r m_r),

which is the original's rule for binary masks (covered: the mean of the covering regions; uncovered: global).

An ``attn2_patch`` (:meth:`RegionalCrossAttention.remember_query`) keeps the attention's query input; an
``attn2_output_patch`` (:meth:`RegionalCrossAttention.__call__`) receives the usual (global) output after ``to_out``
and replaces it on region-covered tokens. Neither replaces the attention itself, so IP-Adapter-style
``attn2_replace`` patches, other pre/post patches and this pack's layer routing keep working. Because ``to_out`` is
affine and the blend weights sum to one, blending region outputs in head space and applying ``to_out`` once equals
blending the projected outputs, as the original does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.patcher_extension
import torch

from ..edlora.arch import cross_attention_sites, layer_of_site
from .attention import multihead_attention
from .spec import Region, check_masks_fit, region_weights


@dataclass
class RegionContexts:
    """One region's encoded prompt ``[1, layers, tokens, width]`` (layers 1 for plain prompts) and negative."""

    region: Region
    positive: torch.Tensor
    negative: torch.Tensor

    def context(self, layer: int, uncond: bool) -> torch.Tensor:
        stack = self.negative if uncond else self.positive
        return stack[:, layer if stack.shape[1] > 1 else 0]


def _repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    return context if context.shape[1] == length else context.repeat(1, length // context.shape[1], 1)


class RegionalCrossAttention:
    def __init__(self, diffusion_model: torch.nn.Module, regions: list[RegionContexts]):
        sites = cross_attention_sites(diffusion_model)
        self.layer_of = layer_of_site(sites)
        self.modules = {site.key: site.module for site in sites}
        self.regions = regions
        self._query: torch.Tensor | None = None
        self._weights: dict[tuple, torch.Tensor] = {}

    def remember_query(self, n, context, value, extra_options):
        self._query = n
        return n, context, value

    def weights(self, height: int, width: int, device, dtype) -> torch.Tensor:
        key = (height, width, device, dtype)
        if key not in self._weights:
            grids = [region_weights(r.region, height, width, r.region.label(i)).flatten() for i, r in enumerate(self.regions)]
            self._weights[key] = torch.stack(grids).to(device=device, dtype=dtype)
        return self._weights[key]

    def __call__(self, out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        query, self._query = self._query, None
        if not self.regions:
            return out
        block = extra_options.get("block")
        shape = extra_options.get("activations_shape")
        if query is None or block is None or shape is None or len(shape) != 4:
            return out
        site = (block[0], block[1], extra_options.get("block_index", 0))
        layer = self.layer_of.get(site)
        height, width = int(shape[2]), int(shape[3])
        if layer is None or height * width != out.shape[1] or query.shape[:2] != out.shape[:2]:
            return out
        weights = self.weights(height, width, out.device, out.dtype)
        coverage = weights.sum(0)
        covered = torch.nonzero(coverage > 0).flatten()
        if covered.numel() == 0:
            return out
        chunks = extra_options.get("cond_or_uncond") or [0]
        per_chunk = out.shape[0] // len(chunks)
        attn = self.modules[site]
        heads = extra_options.get("n_heads", attn.heads)
        q = attn.to_q(query[:, covered])
        mixed = torch.zeros_like(q)
        for index, region in enumerate(self.regions):
            w = weights[index, covered]
            if not bool((w > 0).any()):
                continue
            contexts = [region.context(layer, chunk == 1) for chunk in chunks]
            length = math.lcm(*[c.shape[1] for c in contexts])
            context = torch.cat([_repeat_to(c, length).expand(per_chunk, -1, -1) for c in contexts])
            context = context.to(device=q.device, dtype=q.dtype)
            mixed = mixed + multihead_attention(q, attn.to_k(context), attn.to_v(context), heads) * w[None, :, None]
        c = coverage[covered]
        region_out = attn.to_out(mixed / c[None, :, None])
        global_weight = (1.0 - c).clamp_min(0.0)
        total = global_weight + c
        out = out.clone()
        out[:, covered] = out[:, covered] * (global_weight / total)[None, :, None] + region_out * (c / total)[None, :, None]
        return out

    def check_before_sampling(self, executor, noise, latent_image, *args, **kwargs):
        """OUTER_SAMPLE wrapper: masks that do not fit the image are refused before the first step."""
        check_masks_fit([r.region for r in self.regions], int(noise.shape[-2]), int(noise.shape[-1]))
        return executor(noise, latent_image, *args, **kwargs)

    def install(self, model_patcher) -> None:
        model_patcher.set_model_attn2_patch(self.remember_query)
        model_patcher.set_model_attn2_output_patch(self)
        model_patcher.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "mixofshow_regions", self.check_before_sampling
        )
