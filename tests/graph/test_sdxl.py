"""SDXL across the pack on a tiny model with SDXL's real block structure (70 cross-attention blocks in 11 spatial
transformers, CLIP-L + CLIP-G, pooled output and size conditioning through ADM) and on the full-size SDXL key layout
(meta device: every key and shape, no memory)."""

from __future__ import annotations

import types

import comfy.controlnet
import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sdxl_clip
import comfy.supported_models
import comfy.utils
import pytest
import torch
from comfy.cldm.cldm import ControlNet

from mixofshow.devkit.loras import make_lora
from mixofshow.devkit.models import TINY_SDXL_UNET, init_weights, make_edlora, sdxl_unet_meta, tiny_sd1, tiny_sdxl
from mixofshow.edlora.apply import edlora_patches, module_keys
from mixofshow.edlora.arch import UnsupportedModelError, cross_attention_sites, layer_of_site
from mixofshow.edlora.format import EDLoRAError, load_edlora, save_edlora
from mixofshow.edlora.loras import LoRAFileError
from mixofshow.edlora.routing import layer_stack_of
from mixofshow.edlora.targets import text_attention_targets, unet_attention_targets
from mixofshow.fusion.bundle import FusedFileError
from mixofshow.nodes.edlora import EDLoRALoader, TextEncode
from mixofshow.nodes.fusion import EDLoRAStack, ExportFusedLoRA, GradientFusion, LoadFused, LoRAConcept, SaveFused, WeightFusion
from mixofshow.nodes.regional import LayoutImage, RegionalConditioning, RegionalControlStrengthNode, RegionNode
from mixofshow.nodes.train import TrainEDLoRA
from mixofshow.regional.spec import Box
from mixofshow.training.loop import (
    TrainingData,
    TrainSettings,
    encode_training_latents,
    evaluate_losses,
    initial_edlora,
    train_edlora,
)

#: (block name, block id) of SDXL's 11 spatial transformers in execution order, with their transformer depth
SDXL_UNITS = [
    (("input", 4), 2),
    (("input", 5), 2),
    (("input", 7), 10),
    (("input", 8), 10),
    (("middle", 0), 10),
    (("output", 0), 10),
    (("output", 1), 10),
    (("output", 2), 10),
    (("output", 3), 2),
    (("output", 4), 2),
    (("output", 5), 2),
]
FAST_FUSION = dict(
    text_encoder_iters=60,
    unet_iters=25,
    sample_steps=3,
    sample_resolution=128,
    seed=5,
    solver="lbfgs",
    device="auto",
    token_positions="padded",
)


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL with inference-tensor weights, as ComfyUI's loaders give them."""
    with torch.inference_mode():
        return tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def sd1():
    with torch.inference_mode():
        return tiny_sd1(seed=0)


def sites_of(model):
    return cross_attention_sites(model.get_model_object("diffusion_model"))


def encode(clip, text, concepts=None):
    return TextEncode.execute(clip=clip, text=text, concepts=concepts).args[0]


def sample(comfy_nodes, model, positive, negative, steps=2, size=128, batch=1):
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, batch)[0]
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, 3, steps, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def save(edlora, directory, name):
    save_edlora(edlora, str(directory / name))
    return name


def load(model, clip, name, concepts=None):
    return EDLoRALoader.execute(
        model=model, clip=clip, edlora_name=name, unet_strength=0.8, text_encoder_strength=0.8, concepts=concepts
    ).args


# ------------------------------------------------------------------------------------------ structure and format


def test_tiny_sdxl_has_sdxls_block_structure(sdxl):
    model, clip, _ = sdxl
    sites = sites_of(model)
    full = sites_of(sdxl_unet_meta())
    assert [s.key for s in sites] == [s.key for s in full] and len(sites) == 70
    units = list(dict.fromkeys(s.unit for s in sites))
    assert [(u, sum(s.unit == u for s in sites)) for u in units] == SDXL_UNITS
    assert set(layer_of_site(sites).values()) == set(range(11))
    out = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True, return_dict=True)
    assert out["cond"].shape == (1, 77, 64 + 96) and out["pooled_output"].shape == (1, 96)
    assert model.model.adm_channels == 96 + 6 * 256  # pooled output + size/crop/target-size embeddings


def test_full_size_sdxl_edlora_maps_every_module_to_a_comfyui_key(tmp_path):
    """A full-size SDXL ED-LoRA (all 560 UNet and 176 text-encoder attention projections) written, read back and
    mapped onto ComfyUI's real SDXL UNet and CLIP-L + CLIP-G key layout, both on the meta device."""
    model = sdxl_unet_meta()
    with torch.device("meta"):
        text_model = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    clip = types.SimpleNamespace(cond_stage_model=text_model)  # the part of a CLIP the key maps read
    edlora = make_edlora(model, clip, words=("<big1>", "<big2>"), rank=1, lora_scale=0.01, seed=1)
    assert len(edlora.unet) == 70 * 2 * 4 and len(edlora.text_encoder) == (12 + 32) * 4
    assert edlora.layers == 11 and edlora.encoders == {"l": 768, "g": 1280} and edlora.width == 2048
    path = tmp_path / "full.safetensors"
    save_edlora(edlora, str(path))
    again = load_edlora(str(path))
    assert again.layer_map == [unit for unit, _ in SDXL_UNITS] and again.encoders == edlora.encoders
    unet_keys, text_keys = module_keys(again, model, clip)
    targets = {t.name: t for t in unet_attention_targets(model) + text_attention_targets(clip)}
    assert len(set(unet_keys.values())) == 560 and len(set(text_keys.values())) == 176
    for module, key in {**unet_keys, **text_keys}.items():
        assert targets[module].key == key
    kv = [k for m, k in unet_keys.items() if ".attn2.to_k" in m or ".attn2.to_v" in m]
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    assert len(kv) == 140 and all(shapes[k][1] == 2048 for k in kv), "cross-attention keys/values read the 2048 context"
    assert {k.split(".")[0] for k in text_keys.values()} == {"clip_l", "clip_g"}
    unet_patches, clip_patches = edlora_patches(again, model, clip)
    assert set(unet_patches) == set(unet_keys.values()) and set(clip_patches) == set(text_keys.values())


# ------------------------------------------------------------------------------- ED-LoRA, routing, pooled output


@pytest.fixture(scope="module")
def sdxl_concept(sdxl, tmp_path_factory):
    import folder_paths

    directory = tmp_path_factory.mktemp("sdxl_edloras")
    model, clip, _ = sdxl
    edlora = make_edlora(model, clip, words=("<x1>", "<x2>"), seed=1, name="x.safetensors")
    save(edlora, directory, "x.safetensors")
    saved = folder_paths.folder_names_and_paths.get("edloras")
    folder_paths.folder_names_and_paths["edloras"] = ([str(directory)], {".pth", ".safetensors"})
    folder_paths.filename_list_cache.clear()
    yield directory, edlora, load(model, clip, "x.safetensors")
    folder_paths.folder_names_and_paths["edloras"] = saved
    folder_paths.filename_list_cache.clear()


def test_every_sdxl_cross_attention_block_gets_its_layers_context(sdxl_concept, comfy_nodes):
    _, edlora, (model, clip, concepts) = sdxl_concept
    assert len(model.patches) == 560 and len(clip.patcher.patches) == 24
    positive = encode(clip, "a photo of <x1> <x2> in a garden", concepts)
    negative = encode(clip, "lowres", concepts)
    stack = layer_stack_of(positive[0])[0]
    assert stack.shape == (11, 77, 160)
    layer_of = layer_of_site(sites_of(model))
    calls = []
    handles = [
        site.module.to_k.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, args[0].detach().clone())))
        for i, site in enumerate(sites_of(model))
    ]
    try:
        sample(comfy_nodes, model, positive, negative, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    sites = sites_of(model)
    for i, site in enumerate(sites):
        contexts = [c for j, c in calls if j == i]
        assert len(contexts) == 2, f"site {i}: one batched call per step"
        layer = layer_of[site.key]
        for context in contexts:
            assert context.shape == (2, 77, 160)
            rows = [any(torch.allclose(r, ref, atol=1e-5) for r in context) for ref in (stack[layer], negative[0][0][0])]
            assert all(rows), f"block {site.path} (layer {layer}) did not get layer {layer}'s context and the negative"
    assert not torch.allclose(stack[0], stack[10]), "layers differ"


def test_pooled_output_comes_from_the_mean_vector_copy(sdxl, sdxl_concept):
    """SDXL's pooled output conditions the whole image through ADM: it is the prompt encoded once with each concept
    word's mean layer vector (a single-vector ED-LoRA of those means gives the same pooled output)."""
    model, clip, _ = sdxl
    directory, edlora, (_, patched_clip, concepts) = sdxl_concept
    positive = encode(patched_clip, "a photo of <x1> <x2>", concepts)
    mean = make_edlora(model, clip, words=("<x1>", "<x2>"), seed=1, name="mean.safetensors")
    mean.embeddings = {w: v.mean(dim=0, keepdim=True) for w, v in edlora.embeddings.items()}
    save(mean, directory, "mean.safetensors")
    _, mean_clip, mean_concepts = load(model, clip, "mean.safetensors")
    single = encode(mean_clip, "a photo of <x1> <x2>", mean_concepts)
    pooled, single_pooled = positive[0][1]["pooled_output"], single[0][1]["pooled_output"]
    assert pooled.shape == (1, 96)
    assert torch.allclose(pooled, single_pooled, atol=1e-5)
    plain = TextEncode.execute(clip=patched_clip, text="a photo of a dog", concepts=concepts).args[0]
    assert not torch.allclose(pooled, plain[0][1]["pooled_output"], atol=1e-3), "the concept changes the pooled output"


def test_sd1_and_sdxl_files_refused_on_the_other_architecture(sdxl, sd1, sdxl_concept):
    sdxl_model, sdxl_clip, _ = sdxl
    sd1_model, sd1_clip, _ = sd1
    directory, edlora, _ = sdxl_concept
    save(make_edlora(sd1_model, sd1_clip, seed=2, name="one.safetensors"), directory, "one.safetensors")
    with pytest.raises(
        EDLoRAError, match=r"'one.safetensors' is an SD1.x ED-LoRA \(text encoders l 64\) but the connected model is SDXL"
    ):
        load(sdxl_model, sdxl_clip, "one.safetensors")
    with pytest.raises(
        EDLoRAError, match=r"'x.safetensors' is an SDXL ED-LoRA \(text encoders l 64 \+ g 96\) but the connected model is SD1.x"
    ):
        load(sd1_model, sd1_clip, "x.safetensors")
    stack = EDLoRAStack.execute(edlora_name="one.safetensors", unet_strength=1.0, text_encoder_strength=1.0).args[0]
    with pytest.raises(EDLoRAError, match=r"'one.safetensors' is an SD1.x ED-LoRA"):
        GradientFusion.execute(model=sdxl_model, clip=sdxl_clip, concepts=stack, **FAST_FUSION)
    with pytest.raises(EDLoRAError, match=r"'one.safetensors' is an SD1.x ED-LoRA"):
        WeightFusion.execute(model=sdxl_model, clip=sdxl_clip, concepts=stack, weights="", measure_drift=False)


def test_ordinary_loras_refused_on_the_other_architecture(sdxl, sd1, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    for name, (model, clip, _), other in (("sd1_lora.safetensors", sd1, sdxl), ("sdxl_lora.safetensors", sdxl, sd1)):
        tensors, metadata = make_lora(model, clip, kind="kohya", scope="attention", seed=3)
        comfy.utils.save_torch_file(tensors, str(tmp_path / name), metadata=metadata)
        concept = LoRAConcept.execute(lora_name=name, model_strength=1.0, clip_strength=1.0, prompts="photo of zorb").args[0]
        fits = WeightFusion.execute(model=model, clip=clip, concepts=concept, weights="", measure_drift=False).args
        assert fits[0].patches, f"{name} fits its own architecture"
        target = "SDXL" if other is sdxl else "SD1.x"
        with pytest.raises(
            LoRAFileError, match=rf"'{name}' does not fit the {target} model: its patch for '.*' cannot make a weight"
        ):
            WeightFusion.execute(model=other[0], clip=other[1], concepts=concept, weights="", measure_drift=False)
    folder_paths.filename_list_cache.clear()


TRAIN_REST = (
    "concept_words", "class_word", "captions", "caption_template", "resolution", "rank", "steps", "batch_size", "seed",
    "lr_embedding", "lr_text_encoder", "lr_unet", "weight_decay", "noise_offset", "embedding_norm_threshold",
    "mask_loss", "attention_reg_weight", "gradient_checkpointing", "filename", "save_pth", "overwrite",
)  # fmt: skip


def test_dit_models_are_refused_plainly_by_every_node(sdxl):
    config = comfy.supported_models.Flux(
        dict(
            image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=32, context_in_dim=32,
            hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
            theta=10000, qkv_bias=True, guidance_embed=False,
        )
    )  # fmt: skip
    config.set_inference_dtype(torch.float32, None)
    flux = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
    _, clip, vae = sdxl
    plainly = r"the connected MODEL is Flux, which has no UNet cross-attention.*Flux, SD3 and other DiT models are not supported"
    calls = {
        "MoS ED-LoRA Loader": lambda: load(flux, clip, "x.safetensors"),
        "MoS Load Fused": lambda: LoadFused.execute(model=flux, clip=clip, fused_name="none.safetensors"),
        "MoS Train ED-LoRA": lambda: TrainEDLoRA.execute(
            model=flux, clip=clip, vae=vae, images=None, **{k: None for k in TRAIN_REST}
        ),
        "MoS Gradient Fusion": lambda: GradientFusion.execute(model=flux, clip=clip, concepts=None, **FAST_FUSION),
        "MoS Weight Fusion": lambda: WeightFusion.execute(model=flux, clip=clip, concepts=None, weights="", measure_drift=False),
        "MoS Regional Conditioning": lambda: RegionalConditioning.execute(
            model=flux, clip=clip, prompt="x", negative="", regions=region("a cat"), concepts=None
        ),
    }
    for node, call in calls.items():
        with pytest.raises(UnsupportedModelError, match=plainly) as raised:
            call()
        assert node in str(raised.value), f"{node} names itself"


# ---------------------------------------------------------------------------------------------- regional sampling


def region(prompt, negative="", box=(0.0, 0.0, 1.0, 1.0), regions=None):
    top, left, bottom, right = box
    return RegionNode.execute(
        prompt=prompt, negative=negative, top=top, left=left, bottom=bottom, right=right, mask=None, regions=regions
    ).args[0]


@pytest.mark.parametrize("site_index", [1, 28], ids=["input_4_block_1", "middle_block_4"])
def test_region_semantics_on_an_sdxl_cross_attention(sdxl_concept, comfy_nodes, site_index):
    _, _, (model, clip, concepts) = sdxl_concept
    regions = region("a <x1> <x2> in red", "blurry person", box=(0.0, 0.0, 1.0, 0.5))
    regions = region("a green tree", "dead tree", box=(0.0, 0.25, 1.0, 0.75), regions=regions)
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model, clip=clip, prompt="two things in a park", negative="lowres", regions=regions, concepts=concepts
    ).args
    assert torch.equal(positive[0][1]["pooled_output"], encode(clip, "two things in a park", concepts)[0][1]["pooled_output"]), (
        "the pooled output stays the global prompt's"
    )
    site = sites_of(model)[site_index]
    layer = layer_of_site(sites_of(model))[site.key]
    calls, query = [], {}

    def here(extra):
        return (extra["block"][0], extra["block"][1], extra.get("block_index", 0)) == site.key

    def record_query(n, context, value, extra):
        if here(extra):
            query["n"] = n.clone()
        return n, context, value

    def record_output(out, extra):
        if here(extra):
            calls.append((query["n"], out.clone(), list(extra["cond_or_uncond"]), list(extra["activations_shape"])))
        return out

    regional_model.set_model_attn2_patch(record_query)
    regional_model.set_model_attn2_output_patch(record_output)
    sample(comfy_nodes, regional_model, positive, negative, steps=1)
    n_all, out, chunks, shape = calls[0]
    height, width = shape[2], shape[3]

    def context(text):
        conditioning = encode(clip, text, concepts)
        stack = layer_stack_of(conditioning[0])
        return stack[:, layer] if stack is not None else conditioning[0][0]

    contexts = {
        0: [layer_stack_of(positive[0])[:, layer] if layer_stack_of(positive[0]) is not None else positive[0][0],
            context("a <x1> <x2> in red"), context("a green tree")],
        1: [negative[0][0], context("blurry person"), context("dead tree")],
    }  # fmt: skip
    r1 = Box(0.0, 0.0, 1.0, 0.5).rasterise(height, width).flatten() > 0
    r2 = Box(0.0, 0.25, 1.0, 0.75).rasterise(height, width).flatten() > 0
    only_r1, only_r2, both, neither = r1 & ~r2, r2 & ~r1, r1 & r2, ~r1 & ~r2
    assert only_r1.any() and only_r2.any() and both.any() and neither.any()
    per = out.shape[0] // len(chunks)
    with torch.no_grad():
        for chunk_index, chunk in enumerate(chunks):
            rows = slice(chunk_index * per, (chunk_index + 1) * per)
            n = n_all[rows]
            g, a, b = (site.module(n, context=c.expand(per, -1, -1).to(n)) for c in contexts[chunk])
            got = out[rows]
            assert torch.allclose(got[:, neither], g[:, neither], atol=1e-5), "outside all regions: the global prompt"
            assert torch.allclose(got[:, only_r1], a[:, only_r1], atol=1e-5), "inside region 1: its own prompt"
            assert torch.allclose(got[:, only_r2], b[:, only_r2], atol=1e-5), "inside region 2: its own prompt"
            assert torch.allclose(got[:, both], (a[:, both] + b[:, both]) / 2, atol=1e-5), "overlap: the mean"
    assert sorted(chunks) == [0, 1], "cond and uncond in one batch; uncond used the regions' own negatives"


# ------------------------------------------------------------------------------------------------------ training


def disc_images(count: int = 3, size: int = 128):
    """A red disc on a blue-grey background at a few positions, and its masks."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, masks = [], []
    for i in range(count):
        disc = (((xx - (i - 1.5) * 0.2) ** 2 + (yy - 0.1 * i) ** 2) < 0.25).float()
        images.append(torch.stack([0.9 * disc + 0.1, 0.2 * disc + 0.3 * (1 - disc), 0.1 + 0.6 * (1 - disc)], -1))
        masks.append(disc)
    return torch.stack(images), torch.stack(masks)


def test_training_on_sdxl_lowers_the_masked_loss(sdxl):
    model, clip, vae = sdxl
    images, masks = disc_images(count=4)
    with torch.inference_mode():
        latents = encode_training_latents(vae, model, images)
    data = TrainingData(latents, ["a photo of <d1> <d2>"] * 4, masks[:, None])
    # the tiny model's randomly initialised UNet moves its output slowly through attention adapters alone
    settings = TrainSettings(
        words=("<d1>", "<d2>"), class_word="dog", steps=60, batch_size=2, seed=0, lr_embedding=3e-2,
        lr_text_encoder=3e-2, lr_unet=1e-1, embedding_norm_threshold=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(99)
    timesteps, noise = torch.randint(0, 1000, (4,), generator=generator), torch.randn(latents.shape, generator=generator)
    with torch.inference_mode():
        result = train_edlora(model, clip, data, settings)
    before = evaluate_losses(model, clip, initial_edlora(model, clip, settings), data, settings, timesteps, noise)
    after = evaluate_losses(model, clip, result.edlora, data, settings, timesteps, noise)
    assert after[0] < 0.97 * before[0], (before, after)
    assert after[1] < 0.7 * before[1], (before, after)  # concept-word attention moved onto the subject
    edlora = result.edlora
    assert edlora.layers == 11 and edlora.encoders == {"l": 64, "g": 96}
    assert len(edlora.unet) == 560 and len(edlora.text_encoder) == 24
    assert not model.patches and not clip.patcher.patches


def test_train_node_on_sdxl_refuses_images_smaller_than_the_resolution_and_the_pth_layout(sdxl, edloras_dir):
    model, clip, vae = sdxl
    images, _ = disc_images(count=2)
    common = dict(
        model=model, clip=clip, vae=vae, images=images, concept_words="<d1>+<d2>", class_word="dog", captions="",
        caption_template="a photo of <TOK>", rank=4, steps=2, batch_size=1, seed=0, lr_embedding=1e-3,
        lr_text_encoder=1e-5, lr_unet=1e-4, weight_decay=0.01, noise_offset=0.0, embedding_norm_threshold=0.55,
        mask_loss=True, attention_reg_weight=0.01, gradient_checkpointing=False, filename="sdxl_concept",
        overwrite=False, preview_every=0,
    )  # fmt: skip
    with pytest.raises(
        EDLoRAError, match=r"Training image 0 of the 'images' input is 128x128, smaller than the training resolution 1024"
    ):
        TrainEDLoRA.execute(**common, resolution=0, save_pth=False)
    with pytest.raises(EDLoRAError, match=r"save_pth is on, but the original .pth layout holds one text encoder \(SD1.x\)"):
        TrainEDLoRA.execute(**common, resolution=128, save_pth=True)


# -------------------------------------------------------------------------------------------------------- fusion


def test_fusion_of_three_sdxl_edloras_beats_weight_fusion_and_records_the_architecture(
    sdxl, sd1, sdxl_concept, tmp_path, monkeypatch, comfy_nodes
):
    import folder_paths

    model, clip, _ = sdxl
    directory, _, _ = sdxl_concept
    concepts = None
    for i in range(3):
        save(
            make_edlora(model, clip, words=(f"<k{i}a>", f"<k{i}b>"), seed=20 + i, name=f"k{i}.safetensors"),
            directory,
            f"k{i}.safetensors",
        )
        concepts = EDLoRAStack.execute(
            edlora_name=f"k{i}.safetensors", unet_strength=1.0, text_encoder_strength=1.0, concepts=concepts
        ).args[0]
    fused_model, fused_clip, fused_concepts, fused, report = GradientFusion.execute(
        model=model, clip=clip, concepts=concepts, **FAST_FUSION
    ).args
    assert fused.architecture == "SDXL"
    for stage in ("text_encoder: 24 layers", "cross_attention_kv: 140 layers", "unet_spatial: 420 layers"):
        assert stage in report
    baseline = WeightFusion.execute(model=model, clip=clip, concepts=concepts, weights="", measure_drift=True).args[3]
    assert sum(fused.drift.values()) < sum(baseline.drift.values()), (fused.drift, baseline.drift)
    positive = encode(fused_clip, "<k0a> <k0b> and <k2a> <k2b>", fused_concepts)
    assert layer_stack_of(positive[0]).shape[1] == 11

    for folder in ("mixofshow_fused", "loras"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    SaveFused.execute(
        fused=fused, model=model, clip=clip, filename="sdxl_three", storage="diff", include_statistics=False, overwrite=False
    )
    loaded = LoadFused.execute(model=model, clip=clip, fused_name="sdxl_three.safetensors").args
    assert set(loaded[0].patches) == set(fused_model.patches) and loaded[3].architecture == "SDXL"
    sd1_model, sd1_clip, _ = sd1
    with pytest.raises(
        FusedFileError, match=r"'sdxl_three.safetensors' was fused on an SDXL model but the connected model is SD1.x"
    ):
        LoadFused.execute(model=sd1_model, clip=sd1_clip, fused_name="sdxl_three.safetensors")

    path = ExportFusedLoRA.execute(fused=fused, model=model, clip=clip, filename="sdxl_lora", rank=8, overwrite=False).args[0]
    prefixes = {key.split("_text_model")[0].split("_input_blocks")[0] for key in comfy.utils.load_torch_file(path)}
    assert {"lora_te1", "lora_te2"} <= prefixes, "kohya's SDXL names: lora_te1_ for CLIP-L, lora_te2_ for CLIP-G"
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        core_model, core_clip = comfy_nodes.LoraLoader().load_lora(model, clip, "sdxl_lora.safetensors", 1.0, 1.0)
    assert set(core_model.patches) == set(fused_model.patches), "core Load LoRA maps every exported UNet layer"
    assert set(core_clip.patcher.patches) == set(fused_clip.patcher.patches), "and every text-encoder layer"
    folder_paths.filename_list_cache.clear()
    comfy.model_management.unload_all_models()


def test_regions_and_per_region_control_strength_with_an_sdxl_controlnet(sdxl_concept, comfy_nodes):
    """Regional prompts and MoS Regional Control Strength with a real ControlNet of SDXL's layout (ADM-conditioned)."""
    _, _, (model, clip, concepts) = sdxl_concept
    config = {k: v for k, v in TINY_SDXL_UNET.items() if k != "out_channels"}
    config.update(hint_channels=3, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    control = comfy.controlnet.ControlNet(
        init_weights(ControlNet(**config), seed=9, std=0.05),
        load_device=comfy.model_management.get_torch_device(),
        manual_cast_dtype=None,
    )
    image = torch.zeros(1, 128, 128, 3)
    image[:, 24:96, 32:96] = 1.0
    hint = LayoutImage.execute(image=image, method="canny", low_threshold=100, high_threshold=200, annotator_dir="").args[0]
    regions = region("a <x1> <x2>", "blurry", box=(0.0, 0.0, 1.0, 0.5))
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model, clip=clip, prompt="a street", negative="lowres", regions=regions, concepts=concepts
    ).args
    controlled = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, 0.8, 0.0, 1.0)

    def strength(text):
        return RegionalControlStrengthNode.execute(
            model=regional_model, region_weights=text, width=128, height=128, base_strength=0.8
        ).args[0]

    without = sample(comfy_nodes, regional_model, positive, negative)
    with_control = sample(comfy_nodes, regional_model, *controlled)
    assert not torch.allclose(without, with_control), "the ControlNet must act"
    assert torch.allclose(sample(comfy_nodes, strength("[0, 0, 128, 128]-0.0"), *controlled), without, rtol=1e-5, atol=1e-4)
    assert torch.allclose(sample(comfy_nodes, strength("[0, 0, 128, 128]-0.8"), *controlled), with_control, rtol=1e-5, atol=1e-4)
    half = sample(comfy_nodes, strength("[0, 0, 64, 128]-0.0"), *controlled)
    assert not torch.allclose(half, without) and not torch.allclose(half, with_control)


def test_train_node_on_sdxl_previews_saves_and_resumes(sdxl, sd1, sdxl_concept, monkeypatch):
    """The node end to end on the tiny SDXL: samples of the concept while it trains (ADM-conditioned sampling), a
    version-2 file the loader reads, and a resumed run from it; an SD1.x file to resume from is refused."""
    import comfy.utils

    model, clip, vae = sdxl
    directory, _, _ = sdxl_concept
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append(preview))
    images, masks = disc_images(count=2)
    common = dict(
        model=model, clip=clip, vae=vae, images=images, masks=masks, concept_words="<sx1>+<sx2>", class_word="dog",
        captions="", caption_template="a photo of <TOK>", resolution=128, rank=4, batch_size=1, seed=0,
        lr_embedding=1e-3, lr_text_encoder=1e-5, lr_unet=1e-4, weight_decay=0.01, noise_offset=0.0,
        embedding_norm_threshold=0.55, mask_loss=True, attention_reg_weight=0.01, gradient_checkpointing=False,
        save_pth=False, overwrite=False,
    )  # fmt: skip
    with torch.inference_mode():
        first = TrainEDLoRA.execute(**common, steps=2, filename="sdxl_trained", preview_every=1)
    pictures = [p[1] for p in seen if p is not None]
    assert len(pictures) >= 3 and pictures[-1].size == (256, 256 + 128), "samples shown above the loss curve"
    saved = load_edlora(str(directory / "sdxl_trained.safetensors"))
    assert saved.architecture == "SDXL" and saved.layers == 11 and saved.encoders == {"l": 64, "g": 96}
    assert saved.layer_map == [unit for unit, _ in SDXL_UNITS]
    _, loaded_clip, concepts = load(model, clip, "sdxl_trained.safetensors")
    assert layer_stack_of(encode(loaded_clip, "a <sx1> <sx2>", concepts)[0]).shape[1] == 11
    with torch.inference_mode():
        more = TrainEDLoRA.execute(
            **common, steps=1, filename="sdxl_more", preview_every=0, resume_from="sdxl_trained.safetensors"
        )
    assert "1 steps more, from sdxl_trained.safetensors" in more.ui.as_dict()["text"][0]
    assert first.args[3] == "sdxl_trained.safetensors"
    save(
        make_edlora(sd1[0], sd1[1], words=("<sx1>", "<sx2>"), seed=5, name="sd1_start.safetensors"),
        directory,
        "sd1_start.safetensors",
    )
    with pytest.raises(EDLoRAError, match=r"'sd1_start.safetensors' is an SD1.x ED-LoRA"):
        TrainEDLoRA.execute(**common, steps=1, filename="sdxl_bad", preview_every=0, resume_from="sd1_start.safetensors")
