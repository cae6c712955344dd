"""Make a ComfyUI checkout importable in-process (CPU), the way ComfyUI's own main.py prepares itself."""

from __future__ import annotations

import os
import sys


def comfyui_dir() -> str:
    path = os.environ.get("COMFYUI_DIR")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        raise RuntimeError("COMFYUI_DIR must point at a ComfyUI checkout (run scripts/install_runtime.sh, or use 'make test').")
    return path


def setup_comfy(cpu: bool = True) -> str:
    """Put ComfyUI on sys.path and configure it for CPU use; idempotent. Returns the ComfyUI folder."""
    path = comfyui_dir()
    if path not in sys.path:
        sys.path.insert(0, path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import comfy.options
    import utils.extra_config  # noqa: F401  (binds ComfyUI's utils package before nodes.py shadows it)

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    return path


def load_pack(name: str = "mixofshow"):
    """Import this repository as the package ``name`` (as ComfyUI would import it from custom_nodes)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
