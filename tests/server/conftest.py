"""One real headless ComfyUI server for the server tests, with generated model files in its models folders."""

from __future__ import annotations

import os
import sys

import pytest

DEMO_CKPT = "mos-test-small-sd1.safetensors"


@pytest.fixture(scope="session")
def server_files(tmp_path_factory):
    """A base directory holding a small SD1.x checkpoint and two ED-LoRAs (original .pth and this pack's safetensors)."""
    from mixofshow.devkit import models
    from mixofshow.devkit.server import prepare_base_dir
    from mixofshow.edlora.format import save_edlora

    base = prepare_base_dir(str(tmp_path_factory.mktemp("comfy-base")))
    model, clip, vae = models.small_sd1(seed=0)
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
    models.write_checkpoint(os.path.join(base, "models", "checkpoints", DEMO_CKPT), model, clip, vae)
    models.write_controlnet(os.path.join(base, "models", "controlnet", "test_sketch_control.safetensors"), seed=4)
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
