"""Bad files and bad inputs through a real server: a named error before any long work, nothing written or
overwritten, and the server answers the next prompt.

Every path that reads a concept file is tried with every kind of damage (loader, stack + gradient fusion, stack +
weight fusion, converter, regional conditioning); inputs ComfyUI 0.3.75 lets through for V3 nodes (combo values,
"nan" floats, "false" booleans) and the edges of names, folders, boxes, masks and seeds are tried on the nodes that
take them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mixofshow.devkit.server import TEST_CHECKPOINT, ComfyServerError, load_workflow, set_inputs

GOOD = "edlora_potter.pth"
BAD_FILES = {
    "bad_nan.safetensors": r"'bad_nan\.safetensors': 'unet\..*lora_(down|up)\.weight' contains NaN or infinite values",
    "bad_inf.pth": r"'bad_inf\.pth': 'text_encoder\..*' contains NaN or infinite values",
    "bad_conv.pth": r"'bad_conv\.pth': the UNet LoRA for '.*attn1\.to_q' has shape \[320, 320, 3, 3\] but the model's weight is \[320, 320\]",
    "bad_layers7.pth": r"'bad_layers7\.pth': concept embeddings have 7 layer-wise vectors per word but the connected model has 16",
    "bad_layers400.pth": r"'bad_layers400\.pth': concept embeddings have 400 layer-wise vectors per word",
    # a stack with a 768-wide concept already refuses it; alone it meets the model's text encoder
    "bad_width.pth": r"'bad_width\.pth'(: concept embeddings are 1024 wide \(l 1024\) but the connected text encoder uses 768| has 1024-wide)",
    "bad_keys.pth": r"'bad_keys\.pth': 1 of 129 UNet LoRA modules do not exist in the connected model \(first: 'down_blocks\.7\.",
}
FILE_LEVEL = ("bad_nan.safetensors", "bad_inf.pth")  # damage visible without a model: the converter refuses these too


@pytest.fixture(scope="module")
def bad_files(server, small_model):
    """Damaged concept and fused files, a VAE of NaNs and a tall transparent image, in the server's folders."""
    from mixofshow.devkit.models import make_edlora
    from mixofshow.edlora.format import LoRAPair, save_edlora
    from mixofshow.fusion.bundle import save_fused
    from mixofshow.fusion.procedure import weight_fusion

    model, clip, vae = small_model
    models = os.path.join(server.base_dir, "models")

    def edlora(name, seed, **kwargs):
        return make_edlora(model, clip, words=(f"<{name}1>", f"<{name}2>"), seed=seed, name=name, **kwargs)

    first = lambda pairs: next(iter(sorted(pairs)))  # noqa: E731
    e = edlora("nan", 20)
    m = first(e.unet)
    e.unet[m] = LoRAPair(e.unet[m].down.clone().index_fill_(1, torch.tensor([3]), float("nan")), e.unet[m].up)
    save_edlora(e, os.path.join(models, "edloras", "bad_nan.safetensors"))
    e = edlora("inf", 21)
    m = first(e.text_encoder)
    e.text_encoder[m] = LoRAPair(e.text_encoder[m].down, e.text_encoder[m].up.clone().fill_(float("inf")))
    save_edlora(e, os.path.join(models, "edloras", "bad_inf.pth"))
    e = edlora("conv", 22)
    m = next(k for k in sorted(e.unet) if k.endswith("attn1.to_q"))
    e.unet[m] = LoRAPair(torch.randn(4, 320, 3, 3) * 0.01, e.unet[m].up)
    save_edlora(e, os.path.join(models, "edloras", "bad_conv.pth"))
    save_edlora(edlora("lsev", 23, layers=7), os.path.join(models, "edloras", "bad_layers7.pth"))
    save_edlora(edlora("lfour", 24, layers=400), os.path.join(models, "edloras", "bad_layers400.pth"))
    e = edlora("wide", 25)
    e.embeddings = {w: torch.randn(16, 1024) for w in e.words}
    save_edlora(e, os.path.join(models, "edloras", "bad_width.pth"))
    e = edlora("keys", 26)
    e.unet["down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"] = LoRAPair(torch.zeros(4, 320), torch.zeros(320, 4))
    save_edlora(e, os.path.join(models, "edloras", "bad_keys.pth"))

    from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
    from mixofshow.edlora.format import load_edlora

    good = ConceptSet().add(ConceptEntry(load_edlora(os.path.join(models, "edloras", GOOD)), 1.0, 1.0))
    fused = weight_fusion(model, clip, good, measure_drift=False)
    key = sorted(fused.unet_diffs)[0]
    fused.unet_diffs[key] = fused.unet_diffs[key].clone().fill_(float("nan"))
    os.makedirs(os.path.join(models, "mixofshow_fused"), exist_ok=True)
    save_fused(fused, os.path.join(models, "mixofshow_fused", "fused_nan.safetensors"))
    import safetensors.torch

    fused = weight_fusion(model, clip, good, measure_drift=False)
    path = os.path.join(models, "mixofshow_fused", "fused_no_words.safetensors")
    save_fused(fused, path)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "concept_words"}
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    os.makedirs(os.path.join(models, "mixofshow_fused", "broken_cfg"), exist_ok=True)
    with open(os.path.join(models, "mixofshow_fused", "broken_cfg", "new_concept_cfg.json"), "w") as f:
        f.write('{"<a1>": {"concept_token_ids": [49408,')

    os.makedirs(os.path.join(models, "vae"), exist_ok=True)
    nan_vae = {
        k: torch.full_like(v, float("nan"), dtype=torch.float16) if v.is_floating_point() else v for k, v in vae.get_sd().items()
    }
    safetensors.torch.save_file(nan_vae, os.path.join(models, "vae", "nan_vae.safetensors"))
    from PIL import Image

    Image.new("RGBA", (64, 256), (255, 255, 255, 0)).save(os.path.join(server.base_dir, "input", "tall_transparent.png"))
    return models


def snapshot(models: str) -> dict[str, tuple[int, int]]:
    """Every file under the model folders with its size and modification time."""
    out = {}
    for root, _, files in os.walk(models):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, models)] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture
def untouched(bad_files, server):
    """Fails the test when it wrote or changed any model file; afterwards the server must still render."""
    before = snapshot(bad_files)
    yield
    assert snapshot(bad_files) == before, "a refused prompt wrote or changed a model file"


def refused(server, prompt, pattern):
    with pytest.raises(ComfyServerError, match=pattern) as info:
        server.run(prompt, timeout=300)
    return str(info.value)


def single_concept(edlora_name=GOOD, **loader):
    prompt = load_workflow("edlora_single_concept")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TEST_CHECKPOINT)
    set_inputs(prompt, "MoSEDLoRALoader", edlora_name=edlora_name, **loader)
    set_inputs(prompt, "EmptyLatentImage", width=64, height=64)
    set_inputs(prompt, "KSampler", steps=1)
    set_inputs(prompt, "MoSTextEncode", text="a photo, 4K")
    return prompt


def fusion(third="edlora_thanos.pth", seed=0, **fusion_inputs):
    """The shipped fusion workflow cut to stacks + gradient fusion + save (no file: every case here fails)."""
    prompt = load_workflow("gradient_fusion_three_concepts")
    for node in ("7", "8", "9", "10", "11", "12"):
        del prompt[node]
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TEST_CHECKPOINT)
    prompt["4"]["inputs"]["edlora_name"] = third
    set_inputs(
        prompt,
        "MoSGradientFusion",
        solver="exact",
        sample_steps=1,
        sample_resolution=64,
        seed=seed,
        measure_drift=False,
        **fusion_inputs,
    )
    set_inputs(prompt, "MoSSaveFused", filename=f"never_{third.split('.')[0]}", overwrite=False, include_statistics=False)
    return prompt


def weight_fused(name, filename="never_written", weights="", overwrite=False):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {
            "class_type": "MoSEDLoRAStack",
            "inputs": {"edlora_name": "edlora_hermione.safetensors", "unet_strength": 1.0, "text_encoder_strength": 1.0},
        },
        "3": {
            "class_type": "MoSEDLoRAStack",
            "inputs": {"edlora_name": name, "unet_strength": 1.0, "text_encoder_strength": 1.0, "concepts": ["2", 0]},
        },
        "4": {
            "class_type": "MoSWeightFusion",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 0], "weights": weights, "measure_drift": False},
        },
        "5": {
            "class_type": "MoSSaveFused",
            "inputs": {
                "fused": ["4", 3],
                "model": ["1", 0],
                "clip": ["1", 1],
                "filename": filename,
                "storage": "diff",
                "include_statistics": False,
                "overwrite": overwrite,
            },
        },
    }


def regional(concepts_file=GOOD, region_text="[a <potter1> <potter2>]-*-[]-*-[0, 0, 64, 32]", mask_image=None):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {
            "class_type": "MoSEDLoRAStack",
            "inputs": {"edlora_name": concepts_file, "unet_strength": 1.0, "text_encoder_strength": 1.0},
        },
        "3": {"class_type": "MoSRegionsFromText", "inputs": {"text": region_text, "width": 64, "height": 64}},
        "4": {
            "class_type": "MoSRegionalConditioning",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "prompt": "a room",
                "negative": "",
                "regions": ["3", 0],
                "concepts": ["2", 0],
            },
        },
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["4", 1],
                "negative": ["4", 2],
                "latent_image": ["5", 0],
                "seed": 1,
                "steps": 1,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "mixofshow/bad_inputs"}},
    }
    if mask_image is not None:
        prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": mask_image}}
        prompt["3"] = {
            "class_type": "MoSRegion",
            "inputs": {
                "prompt": "a <potter1> <potter2>",
                "negative": "",
                "top": 0.0,
                "left": 0.0,
                "bottom": 1.0,
                "right": 1.0,
                "mask": ["9", 1],
            },
        }
    return prompt


def training(**train_inputs):
    prompt = load_workflow("train_edlora_from_folder")
    for node in ("4", "5", "6", "7", "8", "9"):
        del prompt[node]
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TEST_CHECKPOINT)
    set_inputs(prompt, "MoSLoadTrainingImages", resolution=64)
    set_inputs(prompt, "MoSTrainEDLoRA", **{"resolution": 64, "steps": 2, "filename": "never_trained", **train_inputs})
    return prompt


# ------------------------------------------------------------------------------------------ damaged concept files


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_damaged_concept_file_is_refused_by_every_path(server, bad_files, untouched, name):
    pattern = BAD_FILES[name]
    refused(server, single_concept(name), pattern)
    refused(server, fusion(third=name), pattern)
    refused(server, weight_fused(name), pattern)
    if name in FILE_LEVEL:
        refused(
            server,
            {
                "1": {
                    "class_type": "MoSConvertEDLoRA",
                    "inputs": {
                        "edlora_name": name,
                        "target": "safetensors (this pack)",
                        "output_name": "never",
                        "overwrite": False,
                    },
                }
            },
            pattern,
        )
    else:
        # the converter has no model to check against; refusing here is the loader's and fusion's job
        pass
    if name not in ("bad_nan.safetensors", "bad_inf.pth", "bad_keys.pth", "bad_conv.pth"):
        refused(server, regional(concepts_file=name), pattern)


@pytest.mark.parametrize(
    ("fused_name", "pattern"),
    [
        ("fused_nan.safetensors", r"'fused_nan\.safetensors': fused weight 'unet\..*' is not finite floating-point data"),
        ("fused_no_words.safetensors", r"'fused_no_words\.safetensors': metadata 'concept_words' is missing"),
        ("broken_cfg/new_concept_cfg.json", r"'broken_cfg/new_concept_cfg\.json' is not readable JSON"),
    ],
)
def test_a_damaged_fused_model_is_refused_by_load_fused(server, bad_files, untouched, fused_name, pattern):
    prompt = single_concept()
    prompt["2"] = {"class_type": "MoSLoadFused", "inputs": {"model": ["1", 0], "clip": ["1", 1], "fused_name": fused_name}}
    refused(server, prompt, pattern)


# ------------------------------------------------------------------------------------------ inputs


def test_values_comfyui_lets_through_are_refused_at_queue_time(server, bad_files, untouched):
    text = refused(server, single_concept(123), r"MoS ED-LoRA Loader: edlora_name: 123 is not a file in models/edloras")
    assert "prompt_outputs_failed_validation" in text, "refused when queued, before anything ran"
    refused(server, single_concept(unet_strength="nan"), r"MoS ED-LoRA Loader: unet_strength must be a finite number, got nan")
    refused(server, fusion(device="meta"), r"MoS Gradient Fusion: device: 'meta' is not one of 'auto', 'cpu', 'cuda'")
    refused(server, training(lr_unet="nan"), r"MoS Train ED-LoRA: lr_unet must be a finite number")
    refused(server, weight_fused(GOOD, overwrite="maybe"), r"MoS Save Fused: overwrite must be true or false, got 'maybe'")
    refused(
        server, weight_fused(GOOD, weights="nan,1"), r"MoS Weight Fusion: weights 'nan,1' must be comma-separated finite numbers"
    )
    strength = regional()
    strength["10"] = {
        "class_type": "MoSRegionalControlStrength",
        "inputs": {"model": ["4", 0], "region_weights": "[0, 0, 10, 10]-1.2.3", "width": 64, "height": 64, "base_strength": 1.0},
    }
    strength["6"]["inputs"]["model"] = ["10", 0]
    refused(
        server,
        strength,
        r"adapter weight 1 \('\[0, 0, 10, 10\]-1\.2\.3'\): expected '\[y1, x1, y2, x2\]-weight' with plain numbers",
    )
    strength["10"]["inputs"].update(region_weights="", base_strength="nan")
    refused(server, strength, r"MoS Regional Adapter Strength: base_strength must be a finite number")


def test_a_string_false_never_overwrites(server, bad_files):
    path = os.path.join(bad_files, "mixofshow_fused", "kept.safetensors")
    server.run(weight_fused(GOOD, filename="kept", overwrite=True))
    first = os.stat(path).st_mtime_ns
    refused(server, weight_fused(GOOD, filename="kept", overwrite="false"), r"kept\.safetensors' exists; set overwrite")
    assert os.stat(path).st_mtime_ns == first
    server.run(weight_fused(GOOD, filename="kept", overwrite="TRUE"))
    assert os.stat(path).st_mtime_ns != first, "the string 'TRUE' is read as true"


def test_output_names_and_training_folders_are_checked_before_any_work(server, bad_files, untouched):
    log_before = len(server.log_text())
    refused(
        server, training(filename="x" * 300), r"MoS Train ED-LoRA filename: 'x{300}' cannot be a file name: it is 300 bytes long"
    )
    refused(server, training(filename="a\x00b"), r"cannot be a file name: it contains '.{1,4}x00'")
    assert "MoS Train ED-LoRA: step" not in server.log_text()[log_before:], "refused before training started"
    for folder in ("../../..", "/etc", "mixofshow_concept/../../models"):
        prompt = training()
        set_inputs(prompt, "MoSLoadTrainingImages", folder=folder)
        refused(server, prompt, r"MoS Load Training Images: folder .* is outside ComfyUI's input directory")


def test_a_vae_that_gives_nan_latents_stops_training_with_its_name(server, bad_files, untouched):
    prompt = training()
    prompt["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "nan_vae.safetensors"}}
    prompt["3"]["inputs"]["vae"] = ["20", 0]
    refused(server, prompt, r"the VAE turned the training images into non-finite latents")


def test_region_edges_boxes_outside_and_masks_of_another_shape(server, bad_files, untouched):
    entry = server.run(regional(region_text="[a <potter1> <potter2>]-*-[]-*-[-50, -50, 20000, 20000]"))
    notes = " ".join(entry["outputs"]["3"]["text"])
    assert "reaches outside the 64x64 image; clipped to [0, 0, 64, 64]" in notes
    refused(
        server, regional(region_text="[a <potter1> <potter2>]-*-[]-*-[100, 100, 200, 200]"), r"covers nothing of the 64x64 image"
    )
    refused(
        server,
        regional(mask_image="tall_transparent.png"),
        r"region 1 \('a <potter1> <potter2>'\): the mask is 64x256 but the image is 64x64 \(latent 8x8\)",
    )


def test_the_maximum_seed_fuses_and_trains(server, bad_files):
    prompt = fusion(seed=0xFFFFFFFFFFFFFFFF)
    set_inputs(prompt, "MoSSaveFused", filename="max_seed", overwrite=True)
    server.run(prompt)
    prompt = training(seed=0xFFFFFFFFFFFFFFFF, filename="max_seed_trained", overwrite=True)
    server.run(prompt)
    assert os.path.exists(os.path.join(bad_files, "edloras", "max_seed_trained.safetensors"))


def test_the_server_still_renders_after_every_refusal(server, bad_files):
    entry = server.run(single_concept())
    assert len(server.image_files(entry)) == 1
    assert json.dumps(entry["status"]["status_str"]) == '"success"'
