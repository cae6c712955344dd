"""Regional sampling semantics, proven with hooks on a real cross-attention layer of the tiny model."""

from __future__ import annotations

import pytest
import torch

from mixofshow.devkit.models import make_edlora
from mixofshow.edlora.arch import cross_attention_sites
from mixofshow.edlora.format import save_edlora
from mixofshow.edlora.routing import layer_stack_of
from mixofshow.nodes.edlora import EDLoRALoader, TextEncode
from mixofshow.nodes.regional import RegionalConditioning, RegionNode, RegionsFromText
from mixofshow.regional.spec import Box, RegionError

NEG = "lowres"


@pytest.fixture
def concept_model(tiny, edloras_dir):
    model, clip, _ = tiny
    save_edlora(make_edlora(model, clip, words=("<r1>", "<r2>"), seed=60, name="r.pth"), str(edloras_dir / "r.pth"))
    return EDLoRALoader.execute(model=model, clip=clip, edlora_name="r.pth", unet_strength=0.7, text_encoder_strength=0.7).args


def region(prompt, negative="", box=(0.0, 0.0, 1.0, 1.0), mask=None, regions=None):
    top, left, bottom, right = box
    return RegionNode.execute(
        prompt=prompt, negative=negative, top=top, left=left, bottom=bottom, right=right, mask=mask, regions=regions
    ).args[0]


def sample(comfy_nodes, model, positive, negative, steps=2, cfg=5.0, sampler="euler", width=128, height=128, batch=1):
    latent = comfy_nodes.EmptyLatentImage().generate(width, height, batch)[0]
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, 7, steps, cfg, sampler, "normal", positive, negative, latent)[0]["samples"]


class Recorder:
    """Records, at one cross-attention layer, its query input and its final output (after every output patch)."""

    def __init__(self, model, layer):
        self.layer = layer
        site = cross_attention_sites(model.get_model_object("diffusion_model"))[layer]
        self.key, self.module = site.key, site.module
        self.calls = []
        self._query = None
        model.set_model_attn2_patch(self.query)
        model.set_model_attn2_output_patch(self.output)

    def _here(self, extra):
        return (extra["block"][0], extra["block"][1], extra.get("block_index", 0)) == self.key

    def query(self, n, context, value, extra):
        if self._here(extra):
            self._query = n.clone()
        return n, context, value

    def output(self, out, extra):
        if self._here(extra):
            self.calls.append((self._query, out.clone(), list(extra["cond_or_uncond"]), list(extra["activations_shape"])))
        return out


def context_at(conditioning, layer):
    stack = layer_stack_of(conditioning[0])
    return stack[:, layer] if stack is not None else conditioning[0][0]


def test_region_semantics_outside_inside_overlap_and_negatives(concept_model, comfy_nodes):
    model, clip, concepts = concept_model
    regions = region("a <r1> <r2> in red", "blurry person", box=(0.0, 0.0, 1.0, 0.5))
    regions = region("a green tree", "dead tree", box=(0.0, 0.25, 1.0, 0.75), regions=regions)
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model, clip=clip, prompt="two things in a park", negative=NEG, regions=regions, concepts=concepts
    ).args
    layer = 1  # input block 2: a 16x16 grid at 128x128
    recorder = Recorder(regional_model, layer)
    sample(comfy_nodes, regional_model, positive, negative, steps=1, cfg=5.0)
    query, out, chunks, shape = recorder.calls[0]
    height, width = shape[2], shape[3]
    attn = recorder.module
    encode = lambda text: TextEncode.execute(clip=clip, text=text, concepts=concepts).args[0]  # noqa: E731
    contexts = {
        0: [
            context_at(positive, layer),
            context_at(encode("a <r1> <r2> in red"), layer),
            context_at(encode("a green tree"), layer),
        ],
        1: [context_at(negative, layer), context_at(encode("blurry person"), layer), context_at(encode("dead tree"), layer)],
    }
    r1 = Box(0.0, 0.0, 1.0, 0.5).rasterise(height, width).flatten() > 0
    r2 = Box(0.0, 0.25, 1.0, 0.75).rasterise(height, width).flatten() > 0
    only_r1, only_r2, both, neither = r1 & ~r2, r2 & ~r1, r1 & r2, ~r1 & ~r2
    assert only_r1.any() and only_r2.any() and both.any() and neither.any()
    per = out.shape[0] // len(chunks)
    with torch.no_grad():
        for chunk_index, chunk in enumerate(chunks):
            rows = slice(chunk_index * per, (chunk_index + 1) * per)
            n = query[rows]
            g, a, b = (attn(n, context=c.expand(per, -1, -1).to(n)) for c in contexts[chunk])
            got = out[rows]
            assert torch.allclose(got[:, neither], g[:, neither], atol=1e-5), "outside all regions: exactly the global attention"
            assert torch.allclose(got[:, only_r1], a[:, only_r1], atol=1e-5), "inside region 1: its own prompt"
            assert torch.allclose(got[:, only_r2], b[:, only_r2], atol=1e-5), "inside region 2: its own prompt"
            assert torch.allclose(got[:, both], (a[:, both] + b[:, both]) / 2, atol=1e-5), "overlap: the mean"
    assert sorted(chunks) == [0, 1], "cond and uncond in one batch; uncond rows used the regions' own negatives"


def test_full_image_region_equals_plain_sampling_with_its_prompt(concept_model, comfy_nodes):
    model, clip, concepts = concept_model
    regions = region("a <r1> <r2> on a boat", "ugly, blurry")
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model,
        clip=clip,
        prompt="an unrelated global prompt",
        negative="another negative",
        regions=regions,
        concepts=concepts,
    ).args
    encode = lambda text: TextEncode.execute(clip=clip, text=text, concepts=concepts).args[0]  # noqa: E731
    got = sample(comfy_nodes, regional_model, positive, negative, steps=3, sampler="dpmpp_2m")
    want = sample(comfy_nodes, model, encode("a <r1> <r2> on a boat"), encode("ugly, blurry"), steps=3, sampler="dpmpp_2m")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3)  # kernels differ (SDPA vs sub-quadratic), math does not


def test_odd_sizes_batches_samplers_soft_masks_and_other_patches(concept_model, comfy_nodes):
    model, clip, concepts = concept_model
    mask = torch.zeros(1, 136, 200)
    mask[:, 20:120, 10:90] = 1.0
    mask[:, 20:120, 90:110] = 0.5
    regions = region("a <r1> <r2>", "blurry", mask=mask)
    regions = region("a lamp", "", box=(0.1, 0.6, 0.9, 0.95), regions=regions)
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model, clip=clip, prompt="a room", negative=NEG, regions=regions, concepts=concepts
    ).args
    calls = {"pre": 0, "post": 0}

    def other_pre(n, context, value, extra):
        calls["pre"] += 1
        return n, context, value

    def other_post(out, extra):
        calls["post"] += 1
        return out

    regional_model.set_model_attn2_patch(other_pre)
    regional_model.set_model_attn2_output_patch(other_post)
    for sampler in ("dpmpp_2m", "euler_ancestral"):
        out = sample(comfy_nodes, regional_model, positive, negative, steps=2, sampler=sampler, width=200, height=136, batch=2)
        assert out.shape == (2, 4, 17, 25) and torch.isfinite(out).all()
    assert calls["pre"] > 0 and calls["post"] > 0, "other attention patches still run"
    plain = sample(comfy_nodes, model, positive, negative, steps=2, sampler="dpmpp_2m", width=200, height=136, batch=2)
    assert not torch.allclose(
        plain,
        sample(comfy_nodes, regional_model, positive, negative, steps=2, sampler="dpmpp_2m", width=200, height=136, batch=2),
    )


def test_errors_name_the_region(concept_model, comfy_nodes):
    model, clip, concepts = concept_model
    with pytest.raises(RegionError, match=r"region 1 \('a cat'\): the mask is empty"):
        region("a cat", mask=torch.zeros(1, 64, 64))
    regions = region("a <r1> <r9>")
    with pytest.raises(RegionError, match=r"region 1 \('a <r1> <r9>'\) prompt: Unknown concept word <r9>"):
        RegionalConditioning.execute(model=model, clip=clip, prompt="x", negative="", regions=regions, concepts=concepts)
    with pytest.raises(RegionError, match="no regions"):
        RegionalConditioning.execute(model=model, clip=clip, prompt="x", negative="", regions=(), concepts=concepts)
    tall = region("a dog", mask=torch.ones(1, 256, 64))
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model, clip=clip, prompt="x", negative="", regions=tall, concepts=concepts
    ).args
    with pytest.raises(RegionError, match=r"region 1 \('a dog'\): the mask is 64x256 but the image is 128x128 \(latent 16x16\)"):
        sample(comfy_nodes, regional_model, positive, negative, steps=1)
    with pytest.raises(RegionError, match="box"):
        region("a box", box=(0.5, 0.0, 0.2, 1.0))


def test_patch_without_regions_is_a_no_op(tiny):
    from mixofshow.regional.patch import RegionalCrossAttention

    patch = RegionalCrossAttention(tiny[0].get_model_object("diffusion_model"), [])
    out = torch.randn(2, 16, 32)
    patch.remember_query(torch.randn(2, 16, 32), None, None, {})
    assert (
        patch(out, {"block": ("input", 1), "block_index": 0, "activations_shape": [2, 32, 4, 4], "cond_or_uncond": [0, 1]}) is out
    )


def test_regions_from_text_node_chains_onto_earlier_regions():
    first = region("a cat", box=(0.0, 0.0, 0.5, 1.0))
    text = "[a <r1> <r2>]-*-[]-*-[0, 0, 64, 32]|[the forest]-*-[dark]-*-[]"
    chained = RegionsFromText.execute(text=text, width=64, height=64, regions=first).args[0]
    assert [r.prompt for r in chained] == ["a cat", "a <r1> <r2>", "the forest"]
