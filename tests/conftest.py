"""Shared test setup: ComfyUI on the CPU in-process, this repository imported as the package ``mixofshow``."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_mos_bootstrap", os.path.join(ROOT, "devkit", "bootstrap.py"))
bootstrap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bootstrap)
bootstrap.setup_comfy()
bootstrap.load_pack()
sys.modules.setdefault("_mos_bootstrap", bootstrap)

import folder_paths  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# the pack's model folders exist (empty) in-process too, as after ComfyUI loaded the pack; tests point them at
# temporary folders (see edloras_dir)
for _folder in ("edloras", "mixofshow_fused"):
    folder_paths.folder_names_and_paths.setdefault(_folder, ([], {".pth", ".safetensors", ".sft"}))


LAYERS = ("unit", "graph", "server", "browser")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for layer in LAYERS:
            if f"{os.sep}tests{os.sep}{layer}{os.sep}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's core nodes module (imported once, after setup)."""
    import nodes

    return nodes


@pytest.fixture(scope="session")
def tiny():
    """A tiny SD1.x-shaped ``(MODEL, CLIP, VAE)`` with 16 cross-attention layers; never modify it in a test."""
    from mixofshow.devkit.models import tiny_sd1

    return tiny_sd1(seed=0)


@pytest.fixture(scope="session")
def sd15():
    """Full-size SD1.5 UNet and CLIP-L with random weights (``(MODEL, CLIP)``)."""
    from mixofshow.devkit.models import clip_l, sd15_unet

    return sd15_unet(seed=0), clip_l(seed=0)


@pytest.fixture
def edloras_dir(tmp_path, monkeypatch):
    """A fresh models/edloras (and models/loras) folder registered with ComfyUI's folder_paths."""
    import folder_paths

    directory = tmp_path / "edloras"
    directory.mkdir()
    loras = tmp_path / "loras"
    loras.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "edloras", ([str(directory)], {".pth", ".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    yield directory
    folder_paths.filename_list_cache.clear()


# ------------------------------------------------------------------ one real headless server (server and browser layers)


@pytest.fixture(scope="session")
def small_model():
    """The small SD1.x-architecture ``(MODEL, CLIP, VAE)`` the server's checkpoint holds (random weights)."""
    from mixofshow.devkit import models

    return models.small_sd1(seed=0)


@pytest.fixture(scope="session")
def server_files(tmp_path_factory, small_model):
    """A base directory holding a small SD1.x checkpoint and two ED-LoRAs (original .pth and this pack's safetensors)."""
    from mixofshow.devkit import models
    from mixofshow.devkit.server import TEST_CHECKPOINT, prepare_base_dir
    from mixofshow.edlora.format import save_edlora

    base = prepare_base_dir(str(tmp_path_factory.mktemp("comfy-base")))
    model, clip, vae = small_model
    save_edlora(
        models.make_edlora(model, clip, words=("<potter1>", "<potter2>"), seed=1, name="edlora_potter.pth"),
        os.path.join(base, "models", "edloras", "edlora_potter.pth"),
        spelling="research",
    )
    save_edlora(
        models.make_edlora(model, clip, words=("<hermione1>", "<hermione2>"), seed=2, name="edlora_hermione.safetensors"),
        os.path.join(base, "models", "edloras", "edlora_hermione.safetensors"),
    )
    save_edlora(
        models.make_edlora(model, clip, words=("<thanos1>", "<thanos2>"), seed=3, name="edlora_thanos.pth"),
        os.path.join(base, "models", "edloras", "edlora_thanos.pth"),
    )
    models.write_checkpoint(os.path.join(base, "models", "checkpoints", TEST_CHECKPOINT), model, clip, vae)
    models.write_controlnet(os.path.join(base, "models", "controlnet", "test_sketch_control.safetensors"), seed=4)
    from mixofshow.devkit.loras import write_lora

    for seed, name in enumerate(("hatsune_miku", "asuka_langley", "rei_ayanami"), start=5):
        write_lora(os.path.join(base, "models", "loras", f"{name}.safetensors"), model, clip, scope="attention", seed=seed)
    write_sdxl_files(base)
    os.makedirs(os.path.join(base, "input"), exist_ok=True)
    from PIL import Image, ImageDraw

    sketch = Image.new("RGB", (192, 96), "white")
    draw = ImageDraw.Draw(sketch)
    for left in (10, 75, 135):
        draw.ellipse([left + 10, 8, left + 40, 30], outline="black", width=3)
        draw.rectangle([left + 5, 32, left + 45, 90], outline="black", width=3)
    sketch.save(os.path.join(base, "input", "mixofshow_sketch.png"))
    write_training_folder(os.path.join(base, "input", "mixofshow_concept"))
    return base


def write_sdxl_files(base: str) -> None:
    """The small SDXL checkpoint, an SDXL ED-LoRA and two SDXL LoRAs (the model itself is not kept in memory)."""
    import gc

    from mixofshow.devkit import models
    from mixofshow.devkit.loras import write_lora
    from mixofshow.devkit.server import TEST_SDXL_CHECKPOINT
    from mixofshow.edlora.format import save_edlora

    model, clip, vae = models.small_sdxl(seed=0)
    save_edlora(
        models.make_edlora(model, clip, words=("<lin1>", "<lin2>"), seed=11, name="edlora_sdxl_lin.safetensors"),
        os.path.join(base, "models", "edloras", "edlora_sdxl_lin.safetensors"),
    )
    for seed, name in enumerate(("sdxl_hatsune_miku", "sdxl_asuka_langley"), start=12):
        write_lora(os.path.join(base, "models", "loras", f"{name}.safetensors"), model, clip, scope="attention", seed=seed)
    models.write_checkpoint(os.path.join(base, "models", "checkpoints", TEST_SDXL_CHECKPOINT), model, clip, vae)
    del model, clip, vae
    gc.collect()


def write_training_folder(folder: str) -> None:
    """Three photos of a synthetic concept (a red disc) in the original dataset layout: image/, mask/, caption/."""
    from PIL import Image, ImageDraw

    for sub in ("image", "mask", "caption"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i, size in enumerate([(160, 128), (128, 176), (144, 144)]):
        photo = Image.new("RGB", size, (70 + 30 * i, 90, 160))
        mask = Image.new("L", size, 0)
        box = [size[0] // 2 - 30, size[1] // 2 - 30, size[0] // 2 + 30, size[1] // 2 + 30]
        ImageDraw.Draw(photo).ellipse(box, fill=(220, 40, 30))
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        photo.save(os.path.join(folder, "image", f"disc{i}.jpg"))
        mask.save(os.path.join(folder, "mask", f"disc{i}.png"))
    with open(os.path.join(folder, "caption", "disc0.txt"), "w") as f:
        f.write("<TOK> on a purple wall\n")


@pytest.fixture(scope="session")
def server(server_files):
    from mixofshow.devkit.bootstrap import comfyui_dir
    from mixofshow.devkit.server import ComfyServer

    comfy = ComfyServer(comfyui_dir(), server_files, python=sys.executable)
    comfy.start()
    yield comfy
    comfy.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")
