"""ED-LoRA loader, MoS Text Encode and layer routing on real ComfyUI objects (tiny and full-size SD1.5 models)."""

from __future__ import annotations

import os

import comfy.lora
import pytest
import torch

from mixofshow.devkit.models import make_edlora
from mixofshow.edlora.arch import cross_attention_sites
from mixofshow.edlora.format import EDLoRAError, LoRAPair, load_edlora, save_edlora
from mixofshow.edlora.routing import LAYER_CONTEXT_KEY, LayerContextRouter, layer_stack_of
from mixofshow.nodes.edlora import ConvertEDLoRA, EDLoRALoader, TextEncode

SD15_LAYER_ORDER = [
    ("input", 1, 0),
    ("input", 2, 0),
    ("input", 4, 0),
    ("input", 5, 0),
    ("input", 7, 0),
    ("input", 8, 0),
    ("middle", 0, 0),
] + [("output", i, 0) for i in range(3, 12)]
NEGATIVE = "lowres, bad anatomy"


def write_edlora(directory, model, clip, filename, **kwargs):
    edlora = make_edlora(model, clip, name=filename, **kwargs)
    save_edlora(edlora, os.path.join(directory, filename))
    return edlora


def load(model, clip, name, concepts=None, unet=0.7, text=0.7):
    out = EDLoRALoader.execute(
        model=model, clip=clip, edlora_name=name, unet_strength=unet, text_encoder_strength=text, concepts=concepts
    )
    return out.args


def encode(clip, text, concepts=None):
    return TextEncode.execute(clip=clip, text=text, concepts=concepts).args[0]


def sample(comfy_nodes, model, positive, negative, steps=3, cfg=5.0, sampler="euler", scheduler="normal", batch=1, size=64):
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, batch)[0]
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, 11, steps, cfg, sampler, scheduler, positive, negative, latent)[0]["samples"]


@pytest.fixture
def loaded(tiny, edloras_dir):
    model, clip, _ = tiny
    edlora = write_edlora(edloras_dir, model, clip, "demo.pth", words=("<demo1>", "<demo2>"), seed=1)
    new_model, new_clip, concepts = load(model, clip, "demo.pth")
    return new_model, new_clip, concepts, edlora


def test_tiny_model_has_sd15_layer_order(tiny):
    assert [s.key for s in cross_attention_sites(tiny[0].get_model_object("diffusion_model"))] == SD15_LAYER_ORDER


def test_loader_patches_clones_with_strength_times_up_down(tiny, loaded):
    model, clip, _ = tiny
    new_model, new_clip, concepts, edlora = loaded
    assert model.patches == {} and clip.patcher.patches == {}, "inputs must stay unpatched"
    assert new_model is not model and new_clip is not clip
    assert len(new_model.patches) == 128 and len(new_clip.patcher.patches) == len(edlora.text_encoder) == 8
    assert concepts.words == ["<demo1>", "<demo2>"]
    module = "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"
    key = "diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    base = model.model.state_dict()[key].float()
    patched = comfy.lora.calculate_weight(new_model.patches[key], base.clone(), key)
    assert torch.allclose(patched, base + 0.7 * edlora.unet[module].delta(), atol=1e-6)
    assert not any(
        isinstance(p, LayerContextRouter)
        for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    )


def test_full_sd15_all_176_modules_patched(sd15, tmp_path, edloras_dir):
    model, clip = sd15
    edlora = write_edlora(edloras_dir, model, clip, "sd15.pth", seed=2)
    assert len(edlora.unet) == 128 and len(edlora.text_encoder) == 48
    assert edlora.width == 768 and edlora.layers == 16
    new_model, new_clip, _ = load(model, clip, "sd15.pth")
    assert len(new_model.patches) == 128 and len(new_clip.patcher.patches) == 48
    assert "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight" in new_model.patches
    assert "clip_l.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight" in new_clip.patcher.patches
    assert [s.key for s in cross_attention_sites(model.get_model_object("diffusion_model"))] == SD15_LAYER_ORDER


def test_sdxl_shaped_lora_is_refused_by_name(tiny, edloras_dir):
    model, clip, _ = tiny
    edlora = make_edlora(model, clip, seed=3, name="sdxl_concept.pth")
    for module, pair in list(edlora.unet.items()):
        if ".attn2.to_k" in module or ".attn2.to_v" in module:
            edlora.unet[module] = LoRAPair(torch.zeros(4, 2048), pair.up)
    save_edlora(edlora, str(edloras_dir / "sdxl_concept.pth"))
    with pytest.raises(
        EDLoRAError,
        match=r"'sdxl_concept.pth': the UNet LoRA for '.*attn2.to_[kv]' has shape \[32, 2048\] "
        r"but the model's weight is \[32, 64\].*different base architecture",
    ):
        load(model, clip, "sdxl_concept.pth")


def test_embedding_width_and_layer_count_mismatch(tiny, edloras_dir):
    model, clip, _ = tiny
    edlora = make_edlora(model, clip, seed=4, name="wide.pth")
    edlora.embeddings = {w: torch.zeros(16, 768) for w in edlora.words}
    save_edlora(edlora, str(edloras_dir / "wide.pth"))
    with pytest.raises(
        EDLoRAError, match=r"'wide.pth': concept embeddings are 768 wide \(l 768\) but the connected text encoder uses 64"
    ):
        load(model, clip, "wide.pth")
    edlora.embeddings = {w: torch.zeros(10, 64) for w in edlora.words}
    save_edlora(edlora, str(edloras_dir / "layers.pth"))
    with pytest.raises(EDLoRAError, match="10 layer-wise vectors per word but the connected model has 16 cross-attention"):
        load(model, clip, "layers.pth")


def test_unmatched_modules_are_an_error(tiny, edloras_dir):
    model, clip, _ = tiny
    edlora = make_edlora(model, clip, seed=5, name="foreign.pth")
    pair = next(iter(edlora.unet.values()))
    edlora.unet["down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"] = pair
    save_edlora(edlora, str(edloras_dir / "foreign.pth"))
    with pytest.raises(EDLoRAError, match=r"1 of 129 UNet LoRA modules do not exist .*down_blocks.9"):
        load(model, clip, "foreign.pth")


def test_same_concept_word_from_two_files(tiny, edloras_dir):
    model, clip, _ = tiny
    write_edlora(edloras_dir, model, clip, "a.pth", words=("<same1>", "<a2>"), seed=6)
    write_edlora(edloras_dir, model, clip, "b.safetensors", words=("<same1>", "<b2>"), seed=7)
    m, c, concepts = load(model, clip, "a.pth")
    with pytest.raises(EDLoRAError, match=r"<same1> is defined by both 'a.pth' and 'b.safetensors'"):
        load(m, c, "b.safetensors", concepts=concepts)


def test_chained_loaders_share_one_router(tiny, edloras_dir, comfy_nodes):
    model, clip, _ = tiny
    write_edlora(edloras_dir, model, clip, "p.pth", words=("<p1>", "<p2>"), seed=8)
    write_edlora(edloras_dir, model, clip, "c.safetensors", words=("<c1>", "<c2>"), seed=9)
    m, c, concepts = load(model, clip, "p.pth")
    m, c, concepts = load(m, c, "c.safetensors", concepts=concepts)
    routers = [p for p in m.model_options["transformer_options"]["patches"]["attn2_patch"] if isinstance(p, LayerContextRouter)]
    assert len(routers) == 1
    assert concepts.words == ["<p1>", "<p2>", "<c1>", "<c2>"]
    cond = encode(c, "<p1> <p2> and <c1> <c2> together", concepts)
    assert layer_stack_of(cond[0]).shape == (1, 16, 77, 64)
    assert torch.isfinite(sample(comfy_nodes, m, cond, encode(c, NEGATIVE), steps=2)).all()


def test_plain_prompt_is_exactly_clip_text_encode(loaded, comfy_nodes):
    _, clip, concepts, _ = loaded
    ours = encode(clip, "a (photo:1.2) of a dog on the beach", concepts)
    core = comfy_nodes.CLIPTextEncode().encode(clip, "a (photo:1.2) of a dog on the beach")[0]
    assert len(ours) == len(core) == 1
    assert torch.equal(ours[0][0], core[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], core[0][1]["pooled_output"])
    assert "model_conds" not in ours[0][1]


def test_unknown_concept_word_is_named(loaded):
    _, clip, concepts, _ = loaded
    with pytest.raises(EDLoRAError, match=r"Unknown concept word <demo3>.*Loaded concept words: <demo1>, <demo2>"):
        encode(clip, "a <demo1> <demo3>", concepts)


def test_layer_variants_match_core_textual_inversion_per_layer(loaded, tmp_path, comfy_nodes):
    """Oracle: layer i of the batched encoding equals core CLIPTextEncode with layer i's vectors as embeddings."""
    import safetensors.torch

    _, clip, concepts, edlora = loaded
    prompt = "a photo of (<demo1>:1.3) <demo2> on the (beach:0.8), (<demo2>:0.9)"
    stack = layer_stack_of(encode(clip, prompt, concepts)[0])
    assert stack.shape == (1, 16, 77, 64)
    tokenizer = clip.tokenizer.clip_l
    saved = tokenizer.embedding_directory
    tokenizer.embedding_directory = str(tmp_path)
    try:
        for layer in range(16):
            for word, table in edlora.embeddings.items():
                name = f"{word.strip('<>')}_layer{layer}"
                safetensors.torch.save_file(
                    {"emb_params": table[layer : layer + 1].clone()}, str(tmp_path / f"{name}.safetensors")
                )
            core_prompt = prompt.replace("<demo1>", f"embedding:demo1_layer{layer}").replace(
                "<demo2>", f"embedding:demo2_layer{layer}"
            )
            core = comfy_nodes.CLIPTextEncode().encode(clip, core_prompt)[0][0][0]
            assert torch.allclose(stack[0, layer], core, atol=1e-5), f"layer {layer}"
    finally:
        tokenizer.embedding_directory = saved
    assert not torch.allclose(stack[0, 0], stack[0, 15]), "layers must differ when their vectors differ"
    weighted = layer_stack_of(encode(clip, prompt.replace(":1.3", ":1.0"), concepts)[0])
    assert not torch.allclose(weighted, stack), "prompt weights on concept words must take effect"


class AttentionRecorder:
    """Forward pre-hooks on every attn2.to_k: records (layer, context) for each UNet call."""

    def __init__(self, model):
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.handles = [
            site.module.to_k.register_forward_pre_hook(self._hook(i))
            for i, site in enumerate(cross_attention_sites(model.get_model_object("diffusion_model")))
        ]

    def _hook(self, layer):
        def hook(module, args):
            self.calls.append((layer, args[0].detach().clone()))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_layer_i_receives_variant_i_and_negative_batches_with_positive(loaded, comfy_nodes):
    model, clip, concepts, _ = loaded
    positive = encode(clip, "a photo of <demo1> <demo2> on the beach", concepts)
    negative = encode(clip, NEGATIVE, concepts)
    stack = layer_stack_of(positive[0])[0]
    neg_context = negative[0][0][0]
    recorder = AttentionRecorder(model)
    try:
        sample(comfy_nodes, model, positive, negative, steps=3, cfg=6.0, sampler="euler", batch=2)
    finally:
        recorder.close()
    per_layer = [[c for layer, c in recorder.calls if layer == i] for i in range(16)]
    for i, contexts in enumerate(per_layer):
        assert len(contexts) == 3, f"layer {i}: one batched UNet call per step (cond and uncond together)"
        for context in contexts:
            assert context.shape == (4, 77, 64), "2 latents x (cond + uncond) in a single batch"
            rows_cond = [r for r in context if torch.allclose(r, stack[i], atol=1e-6)]
            rows_uncond = [r for r in context if torch.allclose(r, neg_context, atol=1e-6)]
            assert len(rows_cond) == 2 and len(rows_uncond) == 2, (
                f"layer {i} got a context that is neither variant {i} nor the negative"
            )


def test_identical_layer_vectors_equal_single_vector_path(tiny, edloras_dir, comfy_nodes):
    model, clip, _ = tiny
    write_edlora(edloras_dir, model, clip, "flat.pth", words=("<flat1>", "<flat2>"), seed=10, identical_layers=True)
    m, c, concepts = load(model, clip, "flat.pth")
    layered = encode(c, "a photo of <flat1> <flat2>", concepts)
    stack = layer_stack_of(layered[0])
    assert torch.allclose(stack[:, 0:1].expand_as(stack), stack, atol=1e-6)
    single_vector = [[stack[:, 0], {"pooled_output": layered[0][1]["pooled_output"]}]]
    negative = encode(c, NEGATIVE)
    a = sample(comfy_nodes, m, layered, negative, steps=3, cfg=5.0)
    b = sample(comfy_nodes, m, single_vector, negative, steps=3, cfg=5.0)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("sampler,scheduler", [("dpmpp_2m", "karras"), ("euler_ancestral", "normal"), ("uni_pc", "simple")])
def test_any_sampler_batch_two_and_concepts_matter(loaded, comfy_nodes, sampler, scheduler):
    model, clip, concepts, _ = loaded
    negative = encode(clip, NEGATIVE)
    with_concepts = sample(
        comfy_nodes,
        model,
        encode(clip, "<demo1> <demo2> at night", concepts),
        negative,
        sampler=sampler,
        scheduler=scheduler,
        batch=2,
        size=72,
    )
    plain = sample(
        comfy_nodes,
        model,
        encode(clip, "a man at night", concepts),
        negative,
        sampler=sampler,
        scheduler=scheduler,
        batch=2,
        size=72,
    )
    assert with_concepts.shape == (2, 4, 9, 9) and torch.isfinite(with_concepts).all()
    assert not torch.allclose(with_concepts, plain)


def test_layer_stack_survives_core_conditioning_nodes(loaded, comfy_nodes):
    model, clip, concepts, _ = loaded
    positive = encode(clip, "<demo1> <demo2>", concepts)
    ranged = comfy_nodes.ConditioningSetTimestepRange().set_range(positive, 0.0, 0.5)[0]
    combined = comfy_nodes.ConditioningCombine().combine(ranged, encode(clip, "a forest"))[0]
    assert LAYER_CONTEXT_KEY in combined[0][1]["model_conds"]
    out = sample(comfy_nodes, model, combined, encode(clip, NEGATIVE), steps=2)
    assert torch.isfinite(out).all()


def test_converter_node_round_trips_and_kohya_matches_core_lora_loader(tiny, edloras_dir, comfy_nodes):
    model, clip, _ = tiny
    edlora = write_edlora(edloras_dir, model, clip, "orig.pth", seed=12)
    path = ConvertEDLoRA.execute(edlora_name="orig.pth", target="safetensors (this pack)", output_name="", overwrite=False).args[
        0
    ]
    assert path.endswith("orig.safetensors")
    again = load_edlora(path)
    assert again.words == edlora.words and all(torch.equal(again.embeddings[w], edlora.embeddings[w]) for w in edlora.words)
    with pytest.raises(EDLoRAError, match="exists; set overwrite"):
        ConvertEDLoRA.execute(edlora_name="orig.pth", target="safetensors (this pack)", output_name="", overwrite=False)
    with pytest.raises(EDLoRAError, match="cannot be a file name"):
        ConvertEDLoRA.execute(edlora_name="orig.pth", target="safetensors (this pack)", output_name="../x", overwrite=True)

    out = ConvertEDLoRA.execute(
        edlora_name="orig.pth", target="kohya LoRA (no concept embeddings)", output_name="orig_kohya", overwrite=False
    )
    assert "do not carry over" in out.ui.as_dict()["text"][0]
    import folder_paths

    core_model, core_clip = comfy_nodes.LoraLoader().load_lora(model, clip, os.path.basename(out.args[0]), 0.7, 0.7)
    ours_model, ours_clip, _ = load(model, clip, "orig.pth")
    assert set(core_model.patches) == set(ours_model.patches) and len(core_model.patches) == 128
    assert set(core_clip.patcher.patches) == set(ours_clip.patcher.patches)
    for key in list(core_model.patches)[:5]:
        base = model.model.state_dict()[key].float()
        assert torch.allclose(
            comfy.lora.calculate_weight(core_model.patches[key], base.clone(), key),
            comfy.lora.calculate_weight(ours_model.patches[key], base.clone(), key),
            atol=1e-6,
        )
    assert folder_paths.get_full_path("loras", "orig_kohya.safetensors")


def test_long_prompts_and_single_vector_embeddings(tiny, edloras_dir, comfy_nodes):
    """Several 77-token chunks stay aligned per layer; [1, width] embeddings (plain LoRA / TI style) serve every layer."""
    model, clip, _ = tiny
    edlora = make_edlora(model, clip, words=("<one1>",), seed=13, name="single.pth")
    edlora.embeddings = {"<one1>": torch.randn(1, 64, generator=torch.Generator().manual_seed(1))}
    save_edlora(edlora, str(edloras_dir / "single.pth"))
    write_edlora(edloras_dir, model, clip, "multi.pth", words=("<m1>", "<m2>"), seed=14)
    m, c, concepts = load(model, clip, "single.pth")
    m, c, concepts = load(m, c, "multi.pth", concepts=concepts)
    filler = ", ".join(f"detail {i}" for i in range(40))
    prompt = f"a <m1> <m2> with a <one1>, {filler}, and again <m1> <m2>"
    stack = layer_stack_of(encode(c, prompt, concepts)[0])
    assert stack.shape[0] == 1 and stack.shape[1] == 16 and stack.shape[2] >= 154, "long prompts span several chunks"
    tokens = c.tokenize(prompt.replace("<m1>", "x").replace("<m2>", "x").replace("<one1>", "x"))["l"]
    assert stack.shape[2] == 77 * len(tokens)
    assert not torch.allclose(stack[0, 0], stack[0, 15]) and torch.isfinite(stack).all()
    out = sample(comfy_nodes, m, encode(c, prompt, concepts), encode(c, NEGATIVE), steps=2)
    assert torch.isfinite(out).all()


def test_one_prompt_names_up_to_the_stated_number_of_concept_words(tiny, comfy_nodes):
    from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
    from mixofshow.edlora.format import EDLoRA
    from mixofshow.edlora.prompt import MAX_CONCEPT_WORDS

    _, clip, _ = tiny
    words = [f"<many{i}>" for i in range(MAX_CONCEPT_WORDS + 1)]
    vectors = torch.randn(len(words), 16, 64, generator=torch.Generator().manual_seed(3))
    concepts = ConceptSet()
    for word, vector in zip(words, vectors, strict=True):
        concepts = concepts.add(ConceptEntry(EDLoRA({word: vector}, {}, {}, name=f"{word}.pth")))
    at_limit = encode(clip, " ".join(words[:MAX_CONCEPT_WORDS]), concepts)
    assert layer_stack_of(at_limit[0]).shape[1] == 16
    with pytest.raises(
        EDLoRAError,
        match=rf"names {MAX_CONCEPT_WORDS + 1} distinct concept words, but one prompt can name at most {MAX_CONCEPT_WORDS}",
    ):
        encode(clip, " ".join(words), concepts)


def test_a_prompt_with_concepts_for_another_layer_count_stops_before_sampling(tiny, edloras_dir, comfy_nodes):
    from mixofshow.nodes.fusion import EDLoRAStack

    model, clip, _ = tiny
    seven = make_edlora(model, clip, words=("<sev1>",), seed=9, layers=7, name="seven.pth")
    save_edlora(seven, str(edloras_dir / "seven.pth"))
    concepts = EDLoRAStack.execute(edlora_name="seven.pth", unet_strength=1.0, text_encoder_strength=1.0).args[0]
    positive = encode(clip, "a <sev1>", concepts)  # a CLIP alone cannot know the model's layer count
    routed = model.clone()
    from mixofshow.edlora.routing import install_layer_routing

    install_layer_routing(routed)
    with pytest.raises(EDLoRAError, match="encoded with 7 layer-wise concept vectors per word, but this model has 16"):
        sample(comfy_nodes, routed, positive, encode(clip, NEGATIVE), steps=1)
