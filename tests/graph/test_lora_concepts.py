"""Ordinary LoRA files as concepts: every format ComfyUI reads, fused with gradient and weight fusion, exported back."""

from __future__ import annotations

import json
import os

import comfy.lora
import pytest
import torch

from mixofshow.devkit.loras import FORMATS, lora_targets, make_lora, write_lora
from mixofshow.devkit.models import make_edlora
from mixofshow.edlora.errors import ModelFileError
from mixofshow.edlora.format import save_edlora
from mixofshow.edlora.loras import load_lora_file, lora_patches
from mixofshow.fusion.procedure import gradient_fusion, weight_fusion
from mixofshow.fusion.results import FusionSettings
from mixofshow.fusion.weights import effective_weights
from mixofshow.nodes.fusion import EDLoRAStack, ExportFusedLoRA, LoRAConcept

SCOPES = {"kohya": "all", "peft": "attention", "loha": "linear", "lokr": "linear", "dora": "transformer"}
WORDS = ["zorb", "quax", "blim", "trop"]
FAST = FusionSettings(text_encoder_iters=20, unet_iters=10, sample_steps=2, sample_resolution=128, solver="exact")


def concept(name, prompts="", concepts=None, model_strength=1.0, clip_strength=1.0):
    return LoRAConcept.execute(
        lora_name=name, model_strength=model_strength, clip_strength=clip_strength, prompts=prompts, concepts=concepts
    )


def write(edloras_dir, model, clip, name, **kwargs):
    path = os.path.join(os.path.dirname(edloras_dir), "loras", name)
    write_lora(path, model, clip, **kwargs)
    return path


def patched_weights(patcher, keys):
    return effective_weights(patcher, keys)


def test_every_format_is_read_the_way_core_lora_loader_reads_it(tiny, edloras_dir, comfy_nodes):
    model, clip, _ = tiny
    for kind in FORMATS:
        name = f"{kind}.safetensors"
        write(edloras_dir, model, clip, name, kind=kind, scope=SCOPES[kind], seed=3)
        patches = lora_patches(load_lora_file(os.path.join(os.path.dirname(edloras_dir), "loras", name)), model, clip)
        with torch.inference_mode():
            core_model, core_clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
        assert set(patches.unet) == set(core_model.patches) and set(patches.clip) == set(core_clip.patcher.patches), kind
        assert patches.unused == [], kind
    targets = {scope: len(lora_targets(model, clip, scope)) for scope in ("attention", "transformer", "linear", "all")}
    assert targets["attention"] < targets["transformer"] < targets["linear"] < targets["all"]


def test_every_key_is_fused_or_reported_and_one_concept_fuses_to_exactly_its_lora(tiny, edloras_dir, comfy_nodes):
    model, clip, _ = tiny
    tensors, metadata = make_lora(model, clip, kind="kohya", scope="all", seed=4)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    import comfy.utils

    comfy.utils.save_torch_file(tensors, str(edloras_dir.parent / "loras" / "locon.safetensors"), metadata=metadata)
    concepts = concept("locon.safetensors", "photo of zorb person\nzorb in a street").args[0]
    with torch.inference_mode():
        core_model, core_clip = comfy_nodes.LoraLoader().load_lora(model, clip, "locon.safetensors", 1.0, 1.0)
        fused_gf = gradient_fusion(model, clip, concepts, FAST, measure_drift=False)
        fused_wf = weight_fusion(model, clip, concepts, measure_drift=False)
    keys = set(core_model.patches) | set(core_clip.patcher.patches)
    for fused in (fused_gf, fused_wf):
        assert set(fused.unet_diffs) | set(fused.text_diffs) == keys, "every key the file adapts is fused"
        assert set(fused.layer_methods) == keys
        assert any("lora_unet_not_a_layer" in note and "not used" in note for note in fused.notes), fused.notes
        assert "lora_unet_not_a_layer" in fused.report()
        fused_model, fused_clip = fused.apply(model, clip)
        for patcher, core in ((fused_model, core_model), (fused_clip.patcher, core_clip.patcher)):
            mine = patched_weights(patcher, sorted(core.patches))
            theirs = patched_weights(core, sorted(core.patches))
            for key in theirs:
                assert torch.allclose(mine[key], theirs[key], atol=1e-6), key
    methods = set(fused_gf.layer_methods.values())
    assert "gram" in methods and any(m.startswith("weight fusion: a k x k convolution") for m in methods)


@pytest.mark.parametrize("count", [2, 4])
def test_gradient_fusion_beats_weight_fusion_on_identity_drift(tiny, edloras_dir, count):
    model, clip, _ = tiny
    concepts = None
    for i in range(count):
        write(edloras_dir, model, clip, f"c{i}.safetensors", kind="kohya", scope="attention", seed=30 + i)
        concepts = concept(f"c{i}.safetensors", f"photo of {WORDS[i]} person\n{WORDS[i]} in a street", concepts).args[0]
    settings = FusionSettings(sample_steps=4, sample_resolution=128, solver="exact")
    with torch.inference_mode():
        gradient = gradient_fusion(model, clip, concepts, settings)
        weight = weight_fusion(model, clip, concepts)
    for name in gradient.drift:
        assert gradient.drift[name] < weight.drift[name], (name, gradient.drift, weight.drift)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(gradient.drift) < 0.8 * mean(weight.drift)


def test_edloras_and_loras_fuse_in_one_stack(tiny, edloras_dir):
    model, clip, _ = tiny
    save_edlora(make_edlora(model, clip, words=("<ed1>", "<ed2>"), seed=40, name="ed.pth"), str(edloras_dir / "ed.pth"))
    write(edloras_dir, model, clip, "miku.safetensors", kind="loha", scope="linear", seed=41)
    stack = EDLoRAStack.execute(
        edlora_name="ed.pth",
        unet_strength=1.0,
        text_encoder_strength=1.0,
        prompts="photo of <ed1> <ed2>\n<ed1> <ed2> at the beach",
    )
    assert "(given)" in stack.ui.as_dict()["text"][0]
    concepts = concept("miku.safetensors", "photo of hatsune miku, twintails", stack.args[0]).args[0]
    assert [e.kind for e in concepts.entries] == ["edlora", "lora"]
    with torch.inference_mode():
        fused = gradient_fusion(model, clip, concepts, FAST, measure_drift=False)
    assert "<ed1> <ed2> (ed.pth)" in fused.report() and "miku.safetensors" in fused.report()
    assert fused.concepts.words == ["<ed1>", "<ed2>"]


def test_prompts_from_the_files_own_training_tags(tiny, edloras_dir):
    model, clip, _ = tiny
    tags = {"1girl": 40, "hatsune miku": 38, "twintails": 35, "smile": 12, "aqua hair": 30, "skirt": 5, "solo": 40}
    write(edloras_dir, model, clip, "tagged.safetensors", scope="attention", seed=5, tags=tags)
    out = concept("tagged.safetensors")
    (entry,) = out.args[0].entries
    assert entry.prompts == ("1girl, solo, hatsune miku, twintails, aqua hair, smile", "1girl, solo")
    assert "suggested from the file's training tags" in out.ui.as_dict()["text"][0]
    write(edloras_dir, model, clip, "plain.safetensors", scope="attention", seed=6)
    with pytest.raises(ModelFileError, match=r"'plain.safetensors' has no training tags to suggest prompts from; write prompts"):
        concept("plain.safetensors")


def test_bad_lora_files_are_named(tiny, edloras_dir):
    from mixofshow.devkit.models import TINY_CLIP

    model, clip, _ = tiny
    loras = edloras_dir.parent / "loras"
    (loras / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"'empty.safetensors' is not a readable safetensors file"):
        concept("empty.safetensors", "x")
    (loras / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFileError, match=r"'corrupt.safetensors' is not a readable safetensors file"):
        concept("corrupt.safetensors", "x")
    # another architecture: names and shapes of a model whose text encoder is twice as wide
    import comfy.utils

    other = {f"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_{p}.weight": torch.zeros(4, 4) for p in ("up", "down")}
    other["lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k.lora_down.weight"] = torch.zeros(4, 2048)
    comfy.utils.save_torch_file(other, str(loras / "sdxl.safetensors"))
    stack = concept("sdxl.safetensors", "photo of zorb").args[0]
    with pytest.raises(
        ModelFileError,
        match=r"'sdxl.safetensors' does not fit the connected model: none of its 3 tensors matches a layer \(first keys: lora_te2_",
    ):
        weight_fusion(model, clip, stack, measure_drift=False)
    wrong = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, TINY_CLIP["hidden_size"] * 2),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(TINY_CLIP["hidden_size"], 4),
    }
    comfy.utils.save_torch_file(wrong, str(loras / "wide.safetensors"))
    stack = concept("wide.safetensors", "photo of zorb").args[0]
    with pytest.raises(
        ModelFileError,
        match=r"'wide.safetensors' does not fit the SD1.x model: its patch for "
        r"'clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight' cannot make a weight of shape \[64, 64\]",
    ):
        weight_fusion(model, clip, stack, measure_drift=False)
    nan = make_lora(model, clip, scope="attention", seed=7)[0]
    next(iter(nan.values())).view(-1)[0] = float("nan")
    comfy.utils.save_torch_file(nan, str(loras / "nan.safetensors"))
    with pytest.raises(ModelFileError, match=r"'nan.safetensors': tensor '.*' contains NaN or infinite values"):
        concept("nan.safetensors", "x")


def test_identical_prompts_are_allowed_and_warned_about(tiny, edloras_dir):
    model, clip, _ = tiny
    for i in range(2):
        write(edloras_dir, model, clip, f"same{i}.safetensors", scope="attention", seed=50 + i)
    concepts = concept("same1.safetensors", "a person", concept("same0.safetensors", "a person").args[0]).args[0]
    with torch.inference_mode():
        fused = weight_fusion(model, clip, concepts, measure_drift=False)
    assert any("use the same prompts" in note for note in fused.notes)


@pytest.mark.parametrize(("rank", "count"), [(0, 2), (4, 1), (2, 2)])
def test_exported_lora_reproduces_the_fusion_with_core_lora_loader(tiny, edloras_dir, comfy_nodes, rank, count):
    model, clip, _ = tiny
    concepts = None
    for i in range(count):
        write(edloras_dir, model, clip, f"e{i}.safetensors", kind="kohya", scope="transformer", rank=4, seed=60 + i)
        concepts = concept(f"e{i}.safetensors", f"photo of {WORDS[i]} person", concepts).args[0]
    with torch.inference_mode():
        fused = weight_fusion(model, clip, concepts, measure_drift=False)
    out = ExportFusedLoRA.execute(fused=fused, model=model, clip=clip, filename=f"exported_{rank}", rank=rank, overwrite=False)
    text = out.ui.as_dict()["text"][0]
    with torch.inference_mode():
        core_model, core_clip = comfy_nodes.LoraLoader().load_lora(model, clip, os.path.basename(out.args[0]), 1.0, 1.0)
    fused_model, fused_clip = fused.apply(model, clip)
    worst = 0.0
    for mine_patcher, core in ((fused_model, core_model), (fused_clip.patcher, core_clip.patcher)):
        keys = sorted(mine_patcher.patches)
        assert set(core.patches) == set(keys), "every fused layer is in the file and loads"
        base = mine_patcher.clone()
        base.patches = {}
        mine, theirs, w0 = patched_weights(mine_patcher, keys), patched_weights(core, keys), patched_weights(base, keys)
        for key in keys:
            change = float((mine[key] - w0[key]).norm())
            worst = max(worst, float((mine[key] - theirs[key]).norm()) / change if change > 0 else 0.0)
    if rank == 0:
        assert worst < 1e-5 and "written exactly" in text
    elif count == 1:
        assert worst < 1e-4 and f"{len(fused.unet_diffs) + len(fused.text_diffs)} exact" in text, "a rank-4 LoRA at rank 4"
    else:
        reported = float(text.rsplit("max ", 1)[1].rstrip(".\n").split()[0].rstrip("."))
        assert 0.01 < worst <= reported + 1e-4, (worst, reported)


def test_full_sd15_architecture_standard_lora_every_key_fused(sd15, edloras_dir, comfy_nodes):
    model, clip = sd15
    write(edloras_dir, model, clip, "sd15_lora.safetensors", kind="kohya", scope="transformer", rank=4, seed=70)
    concepts = concept("sd15_lora.safetensors", "photo of zorb person").args[0]
    with torch.inference_mode():
        core_model, core_clip = comfy_nodes.LoraLoader().load_lora(model, clip, "sd15_lora.safetensors", 1.0, 1.0)
        fused = weight_fusion(model, clip, concepts, measure_drift=False)
    keys = set(core_model.patches) | set(core_clip.patcher.patches)
    assert len(core_model.patches) == 16 * 10 + 16 * 2 and len(core_clip.patcher.patches) == 12 * 6
    assert set(fused.unet_diffs) | set(fused.text_diffs) == keys and not fused.notes
    key = "diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight"
    w0 = model.model.state_dict()[key].float()
    assert torch.allclose(
        w0 + fused.unet_diffs[key], comfy.lora.calculate_weight(core_model.patches[key], w0.clone(), key), atol=1e-6
    )
    json.dumps(fused.layer_methods)
