"""Gradient and weight fusion through the nodes on real ComfyUI objects."""

from __future__ import annotations

import json
import os

import comfy.model_management
import comfy.sample
import pytest
import safetensors.torch
import torch

from mixofshow.devkit.models import make_edlora
from mixofshow.edlora.concepts import ConceptSet
from mixofshow.edlora.format import save_edlora
from mixofshow.edlora.routing import layer_stack_of
from mixofshow.fusion import procedure, solvers
from mixofshow.fusion.bundle import FusedFileError
from mixofshow.fusion.results import FusionError, FusionSettings
from mixofshow.fusion.weights import BaseWeights
from mixofshow.nodes.edlora import TextEncode
from mixofshow.nodes.fusion import EDLoRAStack, GradientFusion, LoadFused, SaveFused, WeightFusion

FAST = dict(
    text_encoder_iters=60,
    unet_iters=25,
    sample_steps=3,
    sample_resolution=128,
    seed=5,
    solver="lbfgs",
    device="auto",
    token_positions="padded",
)


@pytest.fixture
def fused_dir(tmp_path, monkeypatch):
    import folder_paths

    directory = tmp_path / "fused"
    directory.mkdir()
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "mixofshow_fused", ([str(directory)], {".safetensors", ".pth", ".json"})
    )
    folder_paths.filename_list_cache.clear()
    yield directory
    folder_paths.filename_list_cache.clear()


def stack(tiny, edloras_dir, count=3, drop_modules=None):
    model, clip, _ = tiny
    concepts = None
    for i in range(count):
        edlora = make_edlora(model, clip, words=(f"<k{i}a>", f"<k{i}b>"), seed=20 + i, name=f"k{i}.pth")
        if drop_modules and i == 0:
            for module in [m for m in edlora.unet if drop_modules in m]:
                del edlora.unet[module]
        save_edlora(edlora, str(edloras_dir / f"k{i}.pth"))
        concepts = EDLoRAStack.execute(
            edlora_name=f"k{i}.pth", unet_strength=1.0, text_encoder_strength=1.0, concepts=concepts
        ).args[0]
    return concepts


def run_gradient(tiny, concepts, **overrides):
    model, clip, _ = tiny
    return GradientFusion.execute(model=model, clip=clip, concepts=concepts, **{**FAST, **overrides}).args


def fuse(tiny, concepts, previous=None, **overrides):
    """The fusion procedure without the drift measurement (for tests that do not look at drift)."""
    model, clip, _ = tiny
    options = {**FAST, **overrides}
    settings = FusionSettings(**options)
    return procedure.gradient_fusion(model, clip, concepts, settings, previous=previous, measure_drift=False)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_three_edloras_fuse_end_to_end_and_beat_weight_fusion(tiny, edloras_dir, comfy_nodes):
    model, clip, _ = tiny
    concepts = stack(tiny, edloras_dir)
    comfy.model_management.unload_all_models()  # shared modules hold whichever clone ran last; unloading restores the base
    before_unet, before_clip = snapshot(model.model), snapshot(clip.cond_stage_model)
    fused_model, fused_clip, fused_concepts, fused, report = run_gradient(tiny, concepts)
    assert model.patches == {} and clip.patcher.patches == {}
    assert len(fused.text_diffs) == 8 and len(fused.unet_diffs) == 128
    assert len(fused_model.patches) == 128 and len(fused_clip.patcher.patches) == 8
    for stage in ("text_encoder: 8 layers", "cross_attention_kv: 32 layers", "unet_spatial: 96 layers"):
        assert stage in report
    assert set(fused.drift) == {"<k0a> <k0b>", "<k1a> <k1b>", "<k2a> <k2b>"}
    for r in fused.stage_reports.values():
        assert r.loss_after < r.loss_before
    baseline = WeightFusion.execute(model=model, clip=clip, concepts=concepts, weights="", measure_drift=True).args[3]
    gradient_mean = sum(fused.drift.values()) / 3
    weight_mean = sum(baseline.drift.values()) / 3
    assert gradient_mean < weight_mean, (fused.drift, baseline.drift)

    positive = TextEncode.execute(clip=fused_clip, text="<k0a> <k0b> with <k2a> <k2b>", concepts=fused_concepts).args[0]
    assert layer_stack_of(positive[0]).shape[1] == 16
    latent = comfy_nodes.EmptyLatentImage().generate(128, 128, 1)[0]
    with torch.inference_mode():
        out = comfy_nodes.common_ksampler(
            fused_model,
            1,
            2,
            5.0,
            "euler",
            "normal",
            positive,
            comfy_nodes.CLIPTextEncode().encode(fused_clip, "blurry")[0],
            latent,
        )[0]["samples"]
    assert torch.isfinite(out).all()
    comfy.model_management.unload_all_models()
    after_unet, after_clip = snapshot(model.model), snapshot(clip.cond_stage_model)
    assert all(torch.equal(before_unet[k], after_unet[k]) for k in before_unet), "base UNet weights changed"
    assert all(torch.equal(before_clip[k], after_clip[k]) for k in before_clip), "base CLIP weights changed"


def test_same_inputs_and_seed_give_bit_identical_weights(tiny, edloras_dir):
    concepts = stack(tiny, edloras_dir, count=2)
    a = fuse(tiny, concepts, token_positions="original")
    b = fuse(tiny, concepts, token_positions="original")
    for key in a.unet_diffs:
        assert torch.equal(a.unet_diffs[key], b.unet_diffs[key]), key
    for key in a.text_diffs:
        assert torch.equal(a.text_diffs[key], b.text_diffs[key]), key


def test_bit_identical_across_processes_with_different_hash_seeds():
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_fingerprint.py")
    hashes = set()
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": seed}
        )
        assert result.returncode == 0, result.stderr[-3000:]
        hashes.add(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("FUSION-HASH")))
    assert len(hashes) == 1


def test_exact_solver_reaches_lower_objective_than_short_lbfgs(tiny, edloras_dir):
    concepts = stack(tiny, edloras_dir, count=2)
    lbfgs = fuse(tiny, concepts, text_encoder_iters=5, unet_iters=5)
    exact = fuse(tiny, concepts, solver="exact")
    for stage in ("text_encoder", "cross_attention_kv", "unet_spatial"):
        assert exact.stage_reports[stage].loss_after <= lbfgs.stage_reports[stage].loss_after * 1.0001


def test_interrupt_stops_cleanly_and_leaves_inputs_untouched(tiny, edloras_dir, monkeypatch, comfy_nodes):
    model, clip, _ = tiny
    concepts = stack(tiny, edloras_dir, count=2)
    reference_positive = comfy_nodes.CLIPTextEncode().encode(clip, "a cat")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(128, 128, 1)[0]

    def render():
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(
                model, 3, 2, 1.0, "euler", "normal", reference_positive, reference_positive, latent
            )[0]["samples"]

    before = render()
    calls = {"n": 0}
    real = solvers.solve_lbfgs

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            comfy.model_management.interrupt_current_processing(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(solvers, "solve_lbfgs", interrupting)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_gradient(tiny, concepts)
    comfy.model_management.interrupt_current_processing(False)
    assert model.patches == {} and clip.patcher.patches == {}
    for module in model.model.modules():
        assert not module._forward_pre_hooks, "capture hooks must be removed"
    assert torch.equal(render(), before)


def test_concept_missing_some_layers_and_empty_concepts(tiny, edloras_dir):
    model, clip, _ = tiny
    concepts = stack(tiny, edloras_dir, count=2, drop_modules="attn1")
    fused = fuse(tiny, concepts, solver="exact")
    assert len(fused.unet_diffs) == 128, "layers only one concept adapts are still fused"
    with pytest.raises(FusionError, match="CONCEPTS is empty"):
        GradientFusion.execute(model=model, clip=clip, concepts=ConceptSet(), **FAST)
    with pytest.raises(FusionError, match="weights has 1 values but CONCEPTS holds 2"):
        WeightFusion.execute(model=model, clip=clip, concepts=concepts, weights="1", measure_drift=False)


def test_save_load_round_trip_is_bit_identical(tiny, edloras_dir, fused_dir):
    model, clip, _ = tiny
    concepts = stack(tiny, edloras_dir, count=2)
    fused = fuse(tiny, concepts, solver="exact")
    fused_model, _ = fused.apply(model, clip)
    for storage in ("diff", "full"):
        path = SaveFused.execute(
            fused=fused,
            model=model,
            clip=clip,
            filename=f"pair_{storage}",
            storage=storage,
            include_statistics=False,
            overwrite=False,
        ).args[0]
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["concept_words"]) == ["<k0a>", "<k0b>", "<k1a>", "<k1b>"]
        assert json.loads(meta["concepts"])[0]["sha256"], "source file hashes are recorded"
        loaded_model, loaded_clip, loaded_concepts, loaded = LoadFused.execute(
            model=model, clip=clip, fused_name=f"pair_{storage}.safetensors"
        ).args
        base = BaseWeights(model, clip)
        for key, diff in fused.unet_diffs.items():
            expect = base([key])[key] + diff
            got = base([key])[key] + loaded.unet_diffs[key]
            if storage == "diff":
                assert torch.equal(loaded.unet_diffs[key], diff)
            assert torch.allclose(got, expect, atol=1e-6)
        assert loaded_concepts.words == concepts.words
        assert all(torch.equal(loaded_concepts.embedding_table()[w], concepts.embedding_table()[w]) for w in concepts.words)
        assert set(loaded_model.patches) == set(fused_model.patches)
    with pytest.raises(FusedFileError, match="exists; set overwrite"):
        SaveFused.execute(
            fused=fused, model=model, clip=clip, filename="pair_diff", storage="diff", include_statistics=False, overwrite=False
        )
    other_model = model.clone()
    other_model.add_patches({k: ("diff", (torch.ones_like(v),)) for k, v in list(fused.unet_diffs.items())[:1]}, 1.0)
    with pytest.raises(FusedFileError, match="not the base this fusion was made on"):
        SaveFused.execute(
            fused=fused, model=other_model, clip=clip, filename="x", storage="diff", include_statistics=False, overwrite=True
        )


def test_saved_statistics_take_one_more_concept_without_resampling(tiny, edloras_dir, fused_dir, monkeypatch):
    model, clip, _ = tiny
    three = stack(tiny, edloras_dir, count=3)
    two = ConceptSet(three.entries[:2])
    first = fuse(tiny, two, solver="exact")
    SaveFused.execute(
        fused=first, model=model, clip=clip, filename="two", storage="diff", include_statistics=True, overwrite=False
    )
    previous = LoadFused.execute(model=model, clip=clip, fused_name="two.safetensors").args[3]
    assert previous.stats is not None
    sampled = []
    real = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: sampled.append(1) or real(*a, **k))
    extended = fuse(tiny, three, solver="exact", previous=previous)
    assert len(sampled) == 1, "only the new concept is sampled"
    monkeypatch.setattr(comfy.sample, "sample", real)
    fresh = fuse(tiny, three, solver="exact")
    for key in fresh.text_diffs:  # the text-encoder statistics do not depend on earlier stages: exactly additive
        assert torch.allclose(extended.text_diffs[key], fresh.text_diffs[key], atol=1e-5), key
    with pytest.raises(FusionError, match="must include every concept of the previous fusion"):
        fuse(tiny, ConceptSet(three.entries[2:]), solver="exact", previous=previous)


def test_imports_the_originals_outputs(tiny, edloras_dir, fused_dir):
    model, clip, _ = tiny
    concepts = stack(tiny, edloras_dir, count=2)
    fused = WeightFusion.execute(model=model, clip=clip, concepts=concepts, weights="", measure_drift=False).args[3]
    base = BaseWeights(model, clip)
    unet_map, text_map = base.key_maps()
    to_diffusers = {v: k for k, v in unet_map.items()}
    to_text = {v: k for k, v in text_map.items()}
    full_unet = {to_diffusers[k]: base([k])[k] + d for k, d in fused.unet_diffs.items()}
    full_text = {to_text[k]: base([k])[k] + d for k, d in fused.text_diffs.items()}
    table = concepts.embedding_table()
    torch.save(
        {"params": {"unet": full_unet, "text_encoder": full_text, "new_concept_embedding": table}},
        fused_dir / "combined_model_base.pth",
    )
    research = LoadFused.execute(model=model, clip=clip, fused_name="combined_model_base.pth").args[3]
    for key, diff in fused.unet_diffs.items():
        assert torch.allclose(research.unet_diffs[key], diff, atol=1e-6)
    assert [e.edlora.words for e in research.concepts.entries] == [["<k0a>", "<k0b>"], ["<k1a>", "<k1b>"]]

    folder = fused_dir / "potter+hermione"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    vocab = clip.cond_stage_model.state_dict()["clip_l.transformer.text_model.embeddings.token_embedding.weight"]
    words = list(table)
    new_rows = torch.cat([table[w] for w in words])
    text_sd = {**full_text, "text_model.embeddings.token_embedding.weight": torch.cat([vocab.float(), new_rows])}
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in text_sd.items()}, str(folder / "text_encoder" / "model.safetensors")
    )
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in full_unet.items()}, str(folder / "unet" / "diffusion_pytorch_model.safetensors")
    )
    config = {
        w: {
            "concept_token_ids": list(range(vocab.shape[0] + 16 * i, vocab.shape[0] + 16 * (i + 1))),
            "concept_token_names": [f"<new{16 * i + j}>" for j in range(16)],
        }
        for i, w in enumerate(words)
    }
    (folder / "new_concept_cfg.json").write_text(json.dumps(config))
    name = os.path.join("potter+hermione", "new_concept_cfg.json")
    imported = LoadFused.execute(model=model, clip=clip, fused_name=name).args
    assert imported[2].words == words
    assert all(torch.equal(imported[2].embedding_table()[w], table[w]) for w in words)
    assert torch.allclose(imported[3].text_diffs[next(iter(fused.text_diffs))], next(iter(fused.text_diffs.values())), atol=1e-6)
    with pytest.raises(FusedFileError, match="not a Mix-of-Show combined model"):
        torch.save({"params": {"foo": torch.zeros(1)}}, fused_dir / "junk.pth")
        LoadFused.execute(model=model, clip=clip, fused_name="junk.pth")


def test_full_sd15_architecture_fuses_all_176_layers(sd15, edloras_dir):
    model, clip = sd15
    concepts = None
    for i in range(2):
        save_edlora(
            make_edlora(model, clip, words=(f"<big{i}a>", f"<big{i}b>"), seed=40 + i, name=f"big{i}.pth"),
            str(edloras_dir / f"big{i}.pth"),
        )
        concepts = EDLoRAStack.execute(
            edlora_name=f"big{i}.pth", unet_strength=1.0, text_encoder_strength=1.0, concepts=concepts
        ).args[0]
    fused = procedure.gradient_fusion(
        model, clip, concepts, FusionSettings(sample_steps=1, sample_resolution=64, solver="exact"), measure_drift=False
    )
    assert len(fused.text_diffs) == 48 and len(fused.unet_diffs) == 128
    assert fused.unet_diffs["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 768)
    for stage, report in fused.stage_reports.items():
        assert report.loss_after < report.loss_before, stage
    assert model.patches == {} and clip.patcher.patches == {}


def test_model_passes_of_the_fusion_run_in_inference_mode(tiny, edloras_dir):
    """ComfyUI loads, patches and (on CUDA) casts weights expecting inference mode; outside it, its weight casting on a
    GPU fails on the inference tensors it loaded. Every text-encoder and UNet call of a fusion must run inside it."""
    model, clip, _ = tiny
    concepts = stack(tiny, edloras_dir, count=2)
    seen = []

    def recorder(name):
        return lambda module, args: seen.append((name, torch.is_inference_mode_enabled()))

    handles = [
        clip.cond_stage_model.clip_l.transformer.register_forward_pre_hook(recorder("text encoder")),
        model.get_model_object("diffusion_model").register_forward_pre_hook(recorder("UNet")),
    ]
    try:
        fused = fuse(tiny, concepts, solver="exact")
    finally:
        for handle in handles:
            handle.remove()
    assert {name for name, _ in seen} == {"text encoder", "UNet"}
    assert all(inference for _, inference in seen), [s for s in seen if not s[1]][:3]
    assert all(not t.is_inference() for s in fused.stats.values() for t in s.to_tensors("s")[0].values()), (
        "statistics leave as ordinary tensors the solvers can differentiate through"
    )
