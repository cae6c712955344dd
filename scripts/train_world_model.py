"""Train the miniature SD1.x world model (devkit/world_model.py) and cache it outside the repository.

Usage: ``make world`` or ``$PYTHON scripts/train_world_model.py [--force] [--quick] [--readback]``. It takes about
32 minutes on two CPU cores with bfloat16 hardware (about 49 without), then measures which attributes of ordinary
captions the model draws and how far place and colour words steer it (``--readback``: that alone, on the cached
model); ``--quick`` trains a few steps only (to check the pipeline; not a usable model) into a temporary file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="train again even when a cached model exists")
    parser.add_argument("--quick", action="store_true", help="a few steps into a temporary file (pipeline check)")
    parser.add_argument("--out", default="", help="write here instead of the cache")
    parser.add_argument("--readback", action="store_true", help="only measure how well the cached model draws ordinary captions")
    args = parser.parse_args()

    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy()
    load_pack()
    from mixofshow.devkit import world_model

    path = args.out or os.path.join(world_model.cache_dir(), world_model.CHECKPOINT_NAME)
    settings = world_model.WorldSettings()
    if args.quick:
        settings = world_model.WorldSettings(scenes=64, vae_steps=20, unet_coarse_steps=10, unet_steps=10, warmup=5)
        path = args.out or os.path.join(tempfile.mkdtemp(), world_model.CHECKPOINT_NAME)
    elif args.readback:
        if not os.path.isfile(path):
            print(f"no world model at {path}; train it first")
            return 1
        print(json.dumps({"path": path, "attributes": readback(world_model, *world_model.load_world_model(path))}))
        return 0
    elif os.path.isfile(path) and not args.force:
        print(f"world model already cached: {path} (--force trains it again)")
        return 0
    info = world_model.build_world_model(path, settings, report=lambda line: print(line, flush=True))
    model, clip, vae = world_model.load_world_model(path)
    attributes = readback(world_model, model, clip, vae)
    print(json.dumps({**info, "path": path, "loaded_as": type(model.model.model_config).__name__, "attributes": attributes}))
    return 0


def readback(world_model, model, clip, vae) -> dict:
    """Sample 20 single-object captions of the ordinary world (cfg 5, as the benchmark samples) and measure which
    attributes come out as asked (devkit.world.attribute_accuracy): about two minutes on two cores; then how far the
    place and colour words steer the model's prediction (world_model.caption_steering, no sampling)."""
    import torch

    from mixofshow.devkit import world

    def draw(scene, index):
        with torch.inference_mode(), world_model.cpu_autocast():
            return world_model.sample(model, clip, vae, scene.caption(), seed=index)

    attributes = world.attribute_accuracy(draw)
    with torch.inference_mode(), world_model.cpu_autocast():
        return {**attributes, "steering": world_model.caption_steering(model, clip, vae)}


if __name__ == "__main__":
    sys.exit(main())
