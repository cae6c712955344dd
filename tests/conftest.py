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

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    for item in items:
        for layer in ("unit", "graph", "server"):
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
