"""ED-LoRA training on real ComfyUI objects: a tiny SD1.x model built under inference mode, as ComfyUI loads models."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import comfy.model_management
import comfy.patcher_extension
import pytest
import torch

from mixofshow.devkit.models import tiny_sd1
from mixofshow.edlora.apply import load_edlora_into
from mixofshow.edlora.encode import encode_prompt
from mixofshow.edlora.format import EDLoRAError, load_edlora
from mixofshow.edlora.routing import layer_stack_of
from mixofshow.edlora.targets import text_attention_targets, unet_attention_targets
from mixofshow.nodes.edlora import EDLoRALoader
from mixofshow.nodes.train import TrainEDLoRA
from mixofshow.training.loop import (
    TrainingData,
    TrainSettings,
    encode_training_latents,
    evaluate_losses,
    initial_edlora,
    train_edlora,
)
from mixofshow.training.losses import mean_embedding_norm

WORDS = ("<disc1>", "<disc2>")
PROMPT = "a photo of <disc1> <disc2>"
FAST = dict(words=WORDS, class_word="dog", lr_embedding=3e-2, lr_text_encoder=3e-2, lr_unet=3e-2, embedding_norm_threshold=0.0)


def disc_images(count: int = 4, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic concept: a red disc on a blue-grey background at a few positions, and its masks."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, masks = [], []
    for i in range(count):
        disc = (((xx - (i - 1.5) * 0.2) ** 2 + (yy - 0.1 * i) ** 2) < 0.25).float()
        images.append(torch.stack([0.9 * disc + 0.1, 0.2 * disc + 0.3 * (1 - disc), 0.1 + 0.6 * (1 - disc)], -1))
        masks.append(disc)
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def comfy_tiny():
    """A tiny model whose weights are inference tensors, exactly like models loaded by ComfyUI's loader nodes."""
    with torch.inference_mode():
        return tiny_sd1(seed=0)


@pytest.fixture(scope="module")
def disc_data(comfy_tiny):
    model, _, vae = comfy_tiny
    images, masks = disc_images()
    with torch.inference_mode():
        latents = encode_training_latents(vae, model, images)
    return TrainingData(latents, [PROMPT] * 4, masks[:, None])


@pytest.fixture(scope="module")
def fixed_noise(disc_data):
    generator = torch.Generator().manual_seed(99)
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    return timesteps, torch.randn(disc_data.latents.shape, generator=generator)


@pytest.fixture(scope="module")
def trained(comfy_tiny, disc_data):
    model, clip, _ = comfy_tiny
    settings = TrainSettings(**FAST, steps=40, batch_size=2, seed=0)
    with torch.inference_mode():
        return settings, train_edlora(model, clip, disc_data, settings)


def snapshot(module: torch.nn.Module) -> dict:
    return {name: (tensor, tensor.clone(), tensor.is_inference()) for name, tensor in module.state_dict(keep_vars=True).items()}


def assert_untouched(module: torch.nn.Module, before: dict) -> None:
    after = module.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (tensor, values, inference) in before.items():
        assert after[name] is tensor, f"{name} was replaced"
        assert tensor.is_inference() == inference
        assert torch.equal(tensor, values), f"{name} changed"
    for sub in module.modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks, f"a hook was left on {type(sub).__name__}"


def test_loss_falls_on_a_synthetic_concept(comfy_tiny, disc_data, fixed_noise, trained):
    model, clip, _ = comfy_tiny
    settings, result = trained
    before = evaluate_losses(model, clip, initial_edlora(model, clip, settings), disc_data, settings, *fixed_noise)
    after = evaluate_losses(model, clip, result.edlora, disc_data, settings, *fixed_noise)
    assert after[0] < 0.97 * before[0], (before, after)  # masked denoising error on held-out noise
    assert after[1] < 0.7 * before[1], (before, after)  # concept-word attention moved onto the subject
    assert len(result.losses) == 40 and all(torch.isfinite(torch.tensor(result.losses)))


def test_only_the_intended_parameters_change(comfy_tiny, disc_data):
    model, clip, _ = comfy_tiny
    unet_before, clip_before = snapshot(model.model), snapshot(clip.cond_stage_model)
    settings = TrainSettings(**FAST, steps=3, batch_size=2)
    with torch.inference_mode():
        result = train_edlora(model, clip, disc_data, settings)
    assert_untouched(model.model, unet_before)  # includes the token table: every row, not only the concept's
    assert_untouched(clip.cond_stage_model, clip_before)
    assert not model.patches and not clip.patcher.patches and not model.wrappers

    start = initial_edlora(model, clip, settings)
    edlora = result.edlora
    assert set(edlora.unet) == {t.name for t in unet_attention_targets(model)} and len(edlora.unet) == 16 * 2 * 4
    assert set(edlora.text_encoder) == {t.name for t in text_attention_targets(clip)} and len(edlora.text_encoder) == 2 * 4
    for section in ("unet", "text_encoder"):
        for name, pair in getattr(edlora, section).items():
            initial = getattr(start, section)[name]
            assert torch.count_nonzero(pair.up) > 0 and not torch.equal(pair.down, initial.down), name
    assert edlora.words == list(WORDS) and edlora.layers == 16
    for word in WORDS:
        assert not torch.equal(edlora.embeddings[word], start.embeddings[word])
        assert len({tuple(row.tolist()) for row in edlora.embeddings[word]}) == 16  # each layer learns its own vector


def test_training_step_matches_the_sampling_path(comfy_tiny, disc_data, fixed_noise, trained):
    """The loss a training step computes equals the loss of the saved ED-LoRA loaded and run the way samplers run it."""
    model, clip, _ = comfy_tiny
    settings, result = trained
    plain = TrainingData(disc_data.latents, disc_data.prompts, None)
    timesteps, noise = fixed_noise
    training_mse, _ = evaluate_losses(model, clip, result.edlora, plain, settings, timesteps, noise)
    with torch.inference_mode():
        patched, patched_clip, concepts = load_edlora_into(model, clip, result.edlora, 1.0, 1.0)
        cond = encode_prompt(patched_clip, concepts, PROMPT)[0]
        comfy.model_management.load_models_gpu([patched])
        sampling = patched.get_model_object("model_sampling")
        sigma = sampling.sigma(timesteps.float())
        x_t = disc_data.latents + sigma[:, None, None, None] * noise
        options = dict(patched.model_options["transformer_options"])
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
        denoised = patched.model.apply_model(
            x_t,
            sigma,
            c_crossattn=cond[0].expand(4, -1, -1),
            transformer_options=options,
            mos_layer_context=layer_stack_of(cond).expand(4, -1, -1, -1),
        )
        predicted_noise = (x_t - denoised) / sigma[:, None, None, None]
    sampling_mse = float((predicted_noise - noise).pow(2).mean())
    assert training_mse == pytest.approx(sampling_mse, rel=1e-4)


def test_same_seed_same_edlora_other_seed_other(comfy_tiny, disc_data):
    model, clip, _ = comfy_tiny
    with torch.inference_mode():
        runs = [train_edlora(model, clip, disc_data, TrainSettings(**FAST, steps=3, seed=seed)) for seed in (5, 5, 6)]
    a, b, c = (r.edlora for r in runs)
    assert runs[0].losses == runs[1].losses
    for word in WORDS:
        assert torch.equal(a.embeddings[word], b.embeddings[word])
    assert all(torch.equal(a.unet[m].up, b.unet[m].up) for m in a.unet)
    assert all(torch.equal(a.text_encoder[m].down, b.text_encoder[m].down) for m in a.text_encoder)
    assert not torch.equal(a.embeddings[WORDS[0]], c.embeddings[WORDS[0]])


def test_embedding_freeze_triggers_at_the_threshold(comfy_tiny, disc_data):
    model, clip, _ = comfy_tiny
    settings = TrainSettings(**{**FAST, "embedding_norm_threshold": 0.0}, steps=12, seed=1, attention_reg_weight=0.0)
    with torch.inference_mode():
        free = train_edlora(model, clip, disc_data, settings)
    start_norm = mean_embedding_norm(initial_edlora(model, clip, settings).embeddings)
    assert free.frozen_at is None and free.embedding_norms[-1] > start_norm + 0.01
    threshold = (start_norm + free.embedding_norms[-1]) / 2  # reached somewhere in the middle of the run
    with torch.inference_mode():
        frozen = train_edlora(
            model,
            clip,
            disc_data,
            TrainSettings(**{**FAST, "embedding_norm_threshold": threshold}, steps=12, seed=1, attention_reg_weight=0.0),
        )
    k = frozen.frozen_at
    assert k is not None and 1 <= k < 12
    norms = frozen.embedding_norms
    assert norms[k - 1] >= threshold and all(n < threshold for n in norms[: k - 1])
    assert all(n == norms[k - 1] for n in norms[k:])  # not one more change once frozen
    assert norms[:k] == free.embedding_norms[:k]  # identical until the freeze
    assert mean_embedding_norm(frozen.edlora.embeddings) == pytest.approx(norms[k - 1])
    # the LoRA goes on learning after the freeze
    assert any(not torch.equal(frozen.edlora.unet[m].up, free.edlora.unet[m].up) for m in frozen.edlora.unet)


def _mask_losses(model, clip, data, masks, timesteps, noise, **settings):
    chosen = TrainingData(data.latents, data.prompts, masks)
    return evaluate_losses(
        model,
        clip,
        initial_edlora(model, clip, TrainSettings(**FAST)),
        chosen,
        TrainSettings(**{**FAST, **settings}),
        timesteps,
        noise,
    )


def test_masks_change_the_loss_as_specified(comfy_tiny, disc_data, fixed_noise):
    model, clip, _ = comfy_tiny
    latents = disc_data.latents
    left = torch.zeros(4, 1, 128, 128)
    left[..., :64] = 1.0
    right = 1.0 - left
    plain = _mask_losses(model, clip, disc_data, None, *fixed_noise)[0]
    on_left = _mask_losses(model, clip, disc_data, left, *fixed_noise)[0]
    on_right = _mask_losses(model, clip, disc_data, right, *fixed_noise)[0]
    assert on_left != pytest.approx(on_right, rel=1e-3)
    assert (on_left + on_right) / 2 == pytest.approx(plain, rel=1e-4)  # equal halves: the mean of both is the whole
    assert _mask_losses(model, clip, disc_data, left, *fixed_noise, mask_loss=False)[0] == pytest.approx(plain, rel=1e-4)
    # the regulariser only exists with masks and with a weight
    assert _mask_losses(model, clip, disc_data, None, *fixed_noise)[1] == 0.0
    assert _mask_losses(model, clip, disc_data, left, *fixed_noise, attention_reg_weight=0.0)[1] == 0.0
    assert _mask_losses(model, clip, disc_data, left, *fixed_noise)[1] > 0.0
    assert latents.shape[-1] == 16


def test_gradient_checkpointing_gives_the_same_training(comfy_tiny, disc_data):
    """Recomputed blocks must see their own layer's routing and masks: same losses, same adapters, same vectors."""
    model, clip, _ = comfy_tiny
    runs = []
    for checkpointing in (False, True):
        settings = TrainSettings(**FAST, steps=3, gradient_checkpointing=checkpointing)
        with torch.inference_mode():
            runs.append(train_edlora(model, clip, disc_data, settings))
    plain, checkpointed = runs
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)
    for word in WORDS:
        assert torch.allclose(checkpointed.edlora.embeddings[word], plain.edlora.embeddings[word], atol=1e-6)
    for name, pair in plain.edlora.unet.items():
        assert torch.allclose(checkpointed.edlora.unet[name].up, pair.up, atol=1e-6), name
    for sub in model.model.diffusion_model.modules():
        assert "forward" not in sub.__dict__  # every wrapper removed


def test_class_word_must_be_one_token(comfy_tiny, disc_data):
    model, clip, _ = comfy_tiny
    with pytest.raises(EDLoRAError, match="class_word 'qwertzuiopasdfgh' is [2-9] tokens"):
        initial_edlora(model, clip, TrainSettings(words=WORDS, class_word="qwertzuiopasdfgh"))
    start = initial_edlora(model, clip, TrainSettings(words=WORDS, class_word=""))
    assert float(start.embeddings[WORDS[1]].norm(dim=-1).mean()) < 0.5  # random, not a token copy


def test_half_precision_unet_trains_with_float32_adapters(disc_data):
    """ComfyUI runs SD1.5 in fp16 on most GPUs: activations in half precision, adapters in fp32, loss scaling on."""
    with torch.inference_mode():
        half, clip, _ = tiny_sd1(seed=0, unet_dtype=torch.float16)
    assert half.model.get_dtype() == torch.float16
    settings = TrainSettings(**FAST, steps=3)
    with torch.inference_mode():
        result = train_edlora(half, clip, disc_data, settings)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    pair = next(iter(result.edlora.unet.values()))
    assert pair.up.dtype == torch.float32 and torch.count_nonzero(pair.up) > 0
    assert next(half.model.diffusion_model.parameters()).dtype == torch.float16


# ------------------------------------------------------------------------------------------------ the node


def run_node(comfy_tiny, images, **overrides):
    model, clip, vae = comfy_tiny
    inputs = dict(
        model=model,
        clip=clip,
        vae=vae,
        images=images,
        concept_words="<disc1>+<disc2>",
        class_word="dog",
        captions="",
        caption_template="a photo of <TOK>",
        resolution=128,
        rank=4,
        steps=2,
        batch_size=2,
        seed=0,
        lr_embedding=1e-3,
        lr_text_encoder=1e-5,
        lr_unet=1e-4,
        weight_decay=0.01,
        noise_offset=0.01,
        embedding_norm_threshold=0.55,
        mask_loss=True,
        attention_reg_weight=0.01,
        gradient_checkpointing=False,
        filename="disc",
        save_pth=False,
        overwrite=False,
        preview_every=0,
    )
    inputs.update(overrides)
    with torch.inference_mode():
        return TrainEDLoRA.execute(**inputs)


def test_node_saves_a_file_the_loader_reads_identically(comfy_tiny, edloras_dir):
    images, masks = disc_images(3, size=160)
    out = run_node(comfy_tiny, images[:, :, :150], masks=masks[:, :, :150], save_pth=True, captions="<TOK> on grey\n\nred <TOK>")
    model, clip, concepts, name = out.args
    assert name == "disc.safetensors"
    assert concepts.words == list(WORDS)
    saved = load_edlora(str(edloras_dir / "disc.safetensors"))
    original = load_edlora(str(edloras_dir / "disc.pth"))
    trained = concepts.entries[0].edlora
    for edlora in (saved, original):
        assert edlora.words == trained.words
        for word in WORDS:
            assert torch.equal(edlora.embeddings[word], trained.embeddings[word])
        for section in ("unet", "text_encoder"):
            ours, theirs = getattr(trained, section), getattr(edlora, section)
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[m].down, theirs[m].down) and torch.equal(ours[m].up, theirs[m].up) for m in ours)
    recorded = json.loads(saved.metadata["mixofshow.training"])
    assert recorded["steps"] == 2 and recorded["class_word"] == "dog" and recorded["images"] == 3
    report = out.ui.as_dict()["text"][0]
    assert "Saved" in report and "loss" in report and "<disc1> <disc2> on grey" in report

    base_model, base_clip, _ = comfy_tiny
    loaded_model, loaded_clip, loaded_concepts = EDLoRALoader.execute(
        model=base_model, clip=base_clip, edlora_name="disc.safetensors", unet_strength=0.7, text_encoder_strength=0.7
    ).args
    with torch.inference_mode():
        ours = encode_prompt(clip, concepts, PROMPT)[0]
        theirs = encode_prompt(loaded_clip, loaded_concepts, PROMPT)[0]
    assert torch.equal(layer_stack_of(ours), layer_stack_of(theirs))
    assert model.patches.keys() == loaded_model.patches.keys()

    with pytest.raises(EDLoRAError, match="exists; set overwrite"):
        run_node(comfy_tiny, images)
    run_node(comfy_tiny, images, overwrite=True, steps=1)


def test_trained_files_stack_and_fuse(comfy_tiny, edloras_dir):
    from mixofshow.nodes.fusion import EDLoRAStack, GradientFusion

    model, clip, _ = comfy_tiny
    images, masks = disc_images(2)
    run_node(comfy_tiny, images, masks=masks, filename="disc")
    run_node(
        comfy_tiny, images.flip(2), concept_words="<ring1>+<ring2>", filename="ring", save_pth=True, gradient_checkpointing=True
    )
    concepts = None
    for name in ("disc.safetensors", "ring.pth"):
        concepts = EDLoRAStack.execute(edlora_name=name, unet_strength=1.0, text_encoder_strength=1.0, concepts=concepts).args[0]
    fused_model, fused_clip, fused_concepts, fused, report = GradientFusion.execute(
        model=model,
        clip=clip,
        concepts=concepts,
        text_encoder_iters=3,
        unet_iters=2,
        sample_steps=1,
        sample_resolution=128,
        seed=0,
        solver="exact",
        device="auto",
        token_positions="padded",
    ).args
    assert fused_concepts.words == ["<disc1>", "<disc2>", "<ring1>", "<ring2>"]
    assert "<ring1> <ring2>" in report and fused_model is not model
    with torch.inference_mode():
        both = encode_prompt(fused_clip, fused_concepts, "<disc1> <disc2> next to <ring1> <ring2>")[0]
    assert layer_stack_of(both).shape[1] == 16


def test_progress_reports_every_step_with_loss_and_sample_previews(comfy_tiny, edloras_dir, monkeypatch):
    import comfy.utils

    seen = []
    monkeypatch.setattr(
        comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append((value, total, preview))
    )
    images, _ = disc_images(2)
    run_node(comfy_tiny, images, steps=4, preview_every=0)
    assert [(v, t) for v, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    kind, picture, size = seen[-1][2]
    assert kind == "JPEG" and picture.size == (256, 128) and size == 512
    assert len(set(picture.getdata())) > 3  # a curve was drawn

    seen.clear()
    run_node(comfy_tiny, images, steps=5, preview_every=2, overwrite=True)
    # a sample after steps 2 and 4 and at the end, each shown at once; the last one decoded by the VAE at the end
    assert [(v, t) for v, t, _ in seen] == [(1, 5), (2, 5), (2, 5), (3, 5), (4, 5), (4, 5), (5, 5), (5, 5), (5, 5)]
    pictures = [preview[1] for _, _, preview in seen]
    assert pictures[1].size == (256, 128) and pictures[2].size == (256, 256 + 128)
    sample = torch.tensor(list(pictures[-1].crop((0, 0, 256, 256)).getdata()), dtype=torch.float32)
    assert sample.std() > 1.0  # a decoded image, not a blank square
    assert pictures[-1].size == (256, 256 + 128)


def test_node_resumes_from_a_saved_edlora(comfy_tiny, edloras_dir):
    images, masks = disc_images(2)
    first = run_node(comfy_tiny, images, masks=masks, steps=3, filename="disc", preview_every=0).args[2].entries[0].edlora
    with pytest.raises(EDLoRAError, match=r"holds the words <disc1> <disc2>, not <ring1>; set concept_words to <disc1>\+<disc2>"):
        run_node(comfy_tiny, images, concept_words="<ring1>", filename="more", resume_from="disc.safetensors")
    out = run_node(
        comfy_tiny, images, masks=masks, steps=2, rank=8, filename="more", resume_from="disc.safetensors", preview_every=0
    )
    resumed = out.args[2].entries[0].edlora
    assert resumed.rank == first.rank == 4
    for word in WORDS:
        assert not torch.equal(resumed.embeddings[word], first.embeddings[word])
        # two more small steps move the vectors a little from where the first run left them
        assert (resumed.embeddings[word] - first.embeddings[word]).norm() < 0.1 * first.embeddings[word].norm()
    assert "2 steps more, from disc.safetensors" in out.ui.as_dict()["text"][0]
    assert sorted(os.listdir(edloras_dir)) == ["disc.safetensors", "more.safetensors"]


def test_node_resolution_zero_is_the_models_own(comfy_tiny, edloras_dir):
    from mixofshow.edlora.arch import native_resolution

    model, _, _ = comfy_tiny
    assert native_resolution(model) == 512
    images, _ = disc_images(1, size=128)
    with pytest.raises(
        EDLoRAError, match=r"Training image 0 of the 'images' input is 128x128, smaller than the training resolution 512"
    ):
        run_node(comfy_tiny, images, resolution=0)
    assert os.listdir(edloras_dir) == []


def test_node_interrupt_saves_nothing_and_restores_the_model(comfy_tiny, edloras_dir):
    model, clip, _ = comfy_tiny
    unet_before, clip_before = snapshot(model.model), snapshot(clip.cond_stage_model)
    images, _ = disc_images(2)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(comfy_tiny, images, steps=5)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert os.listdir(edloras_dir) == []
    assert_untouched(model.model, unet_before)
    assert_untouched(clip.cond_stage_model, clip_before)


def test_node_errors_name_the_problem(comfy_tiny, edloras_dir):
    images, masks = disc_images(2)
    with pytest.raises(EDLoRAError, match="'potter2' is not a concept word"):
        run_node(comfy_tiny, images, concept_words="<potter1>+potter2")
    with pytest.raises(EDLoRAError, match="3 lines for 2 images"):
        run_node(comfy_tiny, images, captions="a\nb\nc")
    with pytest.raises(EDLoRAError, match="1 masks were given for 2 images"):
        run_node(comfy_tiny, images, masks=masks[:1])
    with pytest.raises(EDLoRAError, match="cannot be a file name"):
        run_node(comfy_tiny, images, filename="../escape")
    with pytest.raises(EDLoRAError, match="tokens for this text encoder"):
        run_node(comfy_tiny, images, class_word="teddy bear")
    assert os.listdir(edloras_dir) == []


def test_full_sd15_architecture_targets(sd15):
    model, clip = sd15
    start = initial_edlora(model, clip, TrainSettings(class_word="man"))
    assert len(start.unet) == 128 and len(start.text_encoder) == 48
    assert start.layers == 16 and start.width == 768
    assert sum(p.down.numel() + p.up.numel() for p in start.unet.values()) == 797_184
    assert sum(p.down.numel() + p.up.numel() for p in start.text_encoder.values()) == 294_912


def test_a_diverging_run_stops_writes_nothing_and_restores_the_model(comfy_tiny, edloras_dir, monkeypatch):
    from mixofshow.training import loop

    model, clip, _ = comfy_tiny
    unet_before, clip_before = snapshot(model.model), snapshot(clip.cond_stage_model)
    images, _ = disc_images(2)
    real = loop.masked_mse
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "masked_mse", diverging)
    with pytest.raises(EDLoRAError, match=r"training diverged at step 3 of 5: the loss is (inf|nan)\. Nothing was saved"):
        run_node(comfy_tiny, images, steps=5, save_pth=True)
    assert os.listdir(edloras_dir) == []
    assert_untouched(model.model, unet_before)
    assert_untouched(clip.cond_stage_model, clip_before)


def test_training_folders_stay_inside_the_input_directory(tmp_path, monkeypatch):
    import folder_paths
    from PIL import Image

    from mixofshow.nodes.train import LoadTrainingImages, training_folder

    root = tmp_path / "input"
    (root / "concept" / "image").mkdir(parents=True)
    (root / "concept" / "caption").mkdir()
    outside = tmp_path / "elsewhere"
    (outside / "deep" / "deeper").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(outside / "a.png")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(root))
    for name in ("p0", "p1"):
        Image.new("RGB", (80, 64), "blue").save(root / "concept" / "image" / f"{name}.png")
    assert training_folder("concept") == str(root / "concept")
    assert training_folder(str(root / "concept")) == str(root / "concept"), "an absolute folder inside input/ is fine"
    for folder in ("../elsewhere", str(outside), "concept/../../elsewhere", "/etc", "."):
        with pytest.raises(EDLoRAError, match="outside ComfyUI's input directory"):
            training_folder(folder)
    os.symlink(outside, root / "linked")
    assert training_folder("linked") == str(root / "linked"), "a link the owner put into input/ is followed"

    first = LoadTrainingImages.fingerprint_inputs("concept", 512)
    (root / "concept" / "notes").mkdir()
    (root / "concept" / "notes" / "todo.txt").write_text("not read by the node")
    assert LoadTrainingImages.fingerprint_inputs("concept", 512) == first, "files the node does not read change nothing"
    (root / "concept" / "caption" / "p0.txt").write_text("<TOK> in blue")
    assert LoadTrainingImages.fingerprint_inputs("concept", 512) != first, "a new caption is seen"
    images, masks, captions = LoadTrainingImages.execute("concept", 64).args
    assert images.shape == (2, 64, 64, 3) and captions.split("\n") == ["<TOK> in blue", ""]


def test_no_concept_words_trains_an_ordinary_lora(comfy_tiny, disc_data, fixed_noise, tmp_path):
    """The paper's LoRA baseline: adapters only, the captions as written; its kohya file goes through ComfyUI's own
    LoRA key maps and fits the same layers."""
    import comfy.utils

    from mixofshow.edlora.apply import concept_patches
    from mixofshow.edlora.concepts import ConceptEntry
    from mixofshow.edlora.format import to_kohya_state_dict
    from mixofshow.edlora.loras import load_lora_file

    model, clip, _ = comfy_tiny
    data = TrainingData(disc_data.latents, ["a photo of a zorb disc"] * 4, disc_data.subject_masks)
    settings = TrainSettings(**{**FAST, "words": ()}, steps=30, batch_size=2, seed=0)
    with torch.inference_mode():
        result = train_edlora(model, clip, data, settings)
    assert result.edlora.embeddings == {} and result.edlora.words == []
    assert set(result.edlora.unet) == {t.name for t in unet_attention_targets(model)}
    before = evaluate_losses(model, clip, initial_edlora(model, clip, settings), data, settings, *fixed_noise)
    after = evaluate_losses(model, clip, result.edlora, data, settings, *fixed_noise)
    assert after[0] < 0.97 * before[0], (before, after)
    path = str(tmp_path / "zorb.safetensors")
    comfy.utils.save_torch_file(to_kohya_state_dict(result.edlora), path)
    entry = ConceptEntry(result.edlora, lora=load_lora_file(path), prompts=("a photo of a zorb disc",))
    unet, text, unused = concept_patches(entry, model, clip)
    assert unused == [] and len(unet) == len(result.edlora.unet) and len(text) == len(result.edlora.text_encoder)


def test_world_concepts_train_without_loras_and_add_them_later(comfy_tiny, tmp_path, monkeypatch):
    """The small world's concept cache: ED-LoRAs alone (the regional benchmark needs no LoRA) are kept and reused, a
    later call adds only the missing LoRA, and a new base model retrains and drops the LoRA the old one made."""
    import folder_paths

    from mixofshow.devkit.world import CONCEPTS
    from mixofshow.devkit.world_concepts import WORLD_RECIPE, train_concepts

    paths, extensions = folder_paths.folder_names_and_paths["edloras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "edloras", (list(paths), set(extensions)))
    model, clip, vae = comfy_tiny
    recipe = replace(WORLD_RECIPE, steps=1)
    zorb = CONCEPTS[0]
    ed, lora, stamp = (tmp_path / f"world_zorb{s}" for s in (".safetensors", "_lora.safetensors", ".json"))
    reports = []

    def train(base: str, loras: bool) -> dict:
        return train_concepts(model, clip, vae, base, [zorb], recipe, reports.append, str(tmp_path), loras=loras)

    with torch.inference_mode():
        trained = train("base-a", loras=False)
        assert trained["zorb"][1] is None and ed.is_file() and not lora.is_file()
        assert json.loads(stamp.read_text())["base"] == "base-a"
        first = ed.read_bytes()
        trained = train("base-a", loras=True)  # the ED-LoRA is reused, only the LoRA trains
        assert trained["zorb"][1] == str(lora) and lora.is_file() and ed.read_bytes() == first
        assert [r.split(":")[1].split()[0] for r in reports] == ["ED-LoRA", "LoRA"]
        assert trained["zorb"][0].words == ["<zorb1>", "<zorb2>"]
        train("base-a", loras=True)
        assert len(reports) == 2  # nothing retrained
        train("base-b", loras=False)  # another world model: retrained, and the old model's LoRA is gone
        assert json.loads(stamp.read_text())["base"] == "base-b" and not lora.is_file() and len(reports) == 3
