"""Train the miniature SD1.x world model (devkit/world_model.py) and its sketch ControlNet (devkit/world_control.py)
and cache them outside the repository.

Usage: ``make world`` or ``$PYTHON scripts/train_world_model.py [--force] [--quick] [--readback]``. The model takes
about 32 minutes on two CPU cores with bfloat16 hardware (about 49 without), then the script measures which
attributes of ordinary captions it draws and how far place and colour words steer it (``--readback``: that alone, on
the cached model, with and without the sketch ControlNet when it is cached). The sketch ControlNet trains next when
it is missing (or was trained on another world model): about 15 minutes with bfloat16 hardware. ``--quick`` trains a
few steps of both (to check the pipeline; not usable models) into a temporary folder.
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
    from mixofshow.devkit import world_control, world_model

    path = args.out or os.path.join(world_model.cache_dir(), world_model.CHECKPOINT_NAME)
    settings, control_settings = world_model.WorldSettings(), world_control.ControlSettings()
    report = lambda line: print(line, flush=True)  # noqa: E731
    if args.quick:
        settings = world_model.WorldSettings(scenes=64, vae_steps=20, unet_coarse_steps=10, unet_steps=10, warmup=5)
        control_settings = world_control.ControlSettings(scenes=16, steps=3, batch=4, warmup=1)
        path = args.out or os.path.join(tempfile.mkdtemp(), world_model.CHECKPOINT_NAME)
    elif args.readback:
        if not os.path.isfile(path):
            print(f"no world model at {path}; train it first")
            return 1
        control = world_control.cached_world_controlnet(path)
        attributes = readback(world_model, *world_model.load_world_model(path), control=control)
        print(json.dumps({"path": path, "controlnet": control, "attributes": attributes}))
        return 0
    if os.path.isfile(path) and not args.force:
        print(f"world model already cached: {path} (--force trains it again)")
    else:
        info = world_model.build_world_model(path, settings, report=report)
        model, clip, vae = world_model.load_world_model(path)
        attributes = readback(world_model, model, clip, vae)
        loaded_as = type(model.model.model_config).__name__
        print(json.dumps({**info, "path": path, "loaded_as": loaded_as, "attributes": attributes}))
    control_path = world_control.controlnet_path(path)
    if world_control.cached_world_controlnet(path) is not None and not args.force:
        print(f"sketch ControlNet already cached: {control_path}")
        return 0
    info = world_control.build_world_controlnet(path, control_path, control_settings, report=report)
    attributes = readback(world_model, *world_model.load_world_model(path), control=control_path)
    print(json.dumps({**info, "path": control_path, "attributes": attributes}))
    return 0


def readback(world_model, model, clip, vae, control: str | None = None) -> dict:
    """Sample 20 single-object captions of the ordinary world (cfg 5, as the benchmark samples) and measure which
    attributes come out as asked (devkit.world.attribute_accuracy): about two minutes on two cores; then how far the
    place and colour words steer the model's prediction (world_model.caption_steering, no sampling). With the sketch
    ControlNet at ``control``, the same captions again with each scene's sketch as the layout ("sketched")."""
    import torch

    from mixofshow.devkit import world, world_control

    def draw(scene, index):
        with torch.inference_mode(), world_model.cpu_autocast():
            return world_model.sample(model, clip, vae, scene.caption(), seed=index)

    attributes = world.attribute_accuracy(draw)
    with torch.inference_mode(), world_model.cpu_autocast():
        attributes["steering"] = world_model.caption_steering(model, clip, vae)
    if control is not None:
        controlnet = world_control.load_world_controlnet(control)

        def draw_sketched(scene, index):
            with torch.inference_mode(), world_model.cpu_autocast():
                positive = clip.encode_from_tokens_scheduled(clip.tokenize(scene.caption()))
                negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
                layout = world_control.hints_of([scene]).permute(0, 2, 3, 1)
                positive, negative = world_control.apply_control(positive, negative, controlnet, layout)
                return world_model.sample(model, clip, vae, positive, negative=negative, seed=index)

        attributes["sketched"] = world.attribute_accuracy(draw_sketched)
    return attributes


if __name__ == "__main__":
    sys.exit(main())
