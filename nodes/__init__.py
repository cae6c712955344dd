"""ComfyUI glue: the V3 extension, its node lists and the model folder it registers."""

from __future__ import annotations

import os

from comfy_api.latest import ComfyExtension, io

from . import edlora, fusion, regional, train
from .inputs import boolean_normaliser

EDLORA_EXTENSIONS = {".pth", ".pt", ".bin", ".safetensors", ".sft"}


def register_model_folders() -> None:
    """Register ``models/edloras`` and ``models/mixofshow_fused`` (plus any paths users mapped in extra_model_paths.yaml) for ED-LoRA files."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, "edloras")
    os.makedirs(default, exist_ok=True)
    folder_paths.add_model_folder_path("edloras", default, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths["edloras"]
    folder_paths.folder_names_and_paths["edloras"] = (paths, set(EDLORA_EXTENSIONS))
    fused_default = os.path.join(folder_paths.models_dir, fusion.FUSED_FOLDER)
    os.makedirs(fused_default, exist_ok=True)
    folder_paths.add_model_folder_path(fusion.FUSED_FOLDER, fused_default, is_default=True)
    fused_paths, _ = folder_paths.folder_names_and_paths[fusion.FUSED_FOLDER]
    folder_paths.folder_names_and_paths[fusion.FUSED_FOLDER] = (fused_paths, {".safetensors", ".sft", ".pth", ".json"})


class MixOfShowExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


def all_nodes() -> list[type[io.ComfyNode]]:
    return [*edlora.NODES, *fusion.NODES, *regional.NODES, *train.NODES]


def register_prompt_checks() -> None:
    """Parse the BOOLEAN inputs of this pack's nodes in every submitted prompt before ComfyUI turns them into
    bools with ``bool()`` (which reads the string "false" as True); see :mod:`.inputs`. No server, nothing to do."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and not getattr(server, "_mixofshow_prompt_checks", False):
        server.add_on_prompt_handler(boolean_normaliser(all_nodes()))
        server._mixofshow_prompt_checks = True
