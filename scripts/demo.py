"""The demo: a real headless ComfyUI with this pack renders a shipped workflow.

Run through ``make demo``. Three cases, first match wins:

* ``CKPT`` and ``EDLORA`` point at an SD1.x checkpoint and an ED-LoRA: the single-concept workflow renders them (set
  ``PROMPT`` to use the ED-LoRA's own concept words);
* the small world is cached (``make world``: the miniature SD1.x world model and its ten trained concepts, 3 to 4.5
  hours on two CPU cores, so a fresh machine does not train it within the demo): the shipped fuse_loras_regional
  workflow, its three LoRA concepts swapped for three world ED-LoRAs, gradient-fuses them and paints each in its own
  128x128 box of a 384x128 image; the demo then says which concept the evaluator sees in each box;
* otherwise an embedded default, built deterministically (a small SD1.x-architecture checkpoint with random weights
  and a two-word ED-LoRA in the original .pth format; no weights can be downloaded here) through the single-concept
  workflow: the picture is noise-like, the point is that every node runs for real.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)  # after ComfyUI, so ComfyUI's own 'nodes' module is never shadowed

DEFAULT_CKPT = "mos-demo-small-sd1.safetensors"
DEFAULT_EDLORA = "mos-demo-concept.pth"
DEFAULT_PROMPT = "a photo of <demo1> <demo2> standing on the beach, (best quality:1.2)"


def build_default_files(base_dir: str) -> None:
    ckpt = os.path.join(base_dir, "models", "checkpoints", DEFAULT_CKPT)
    edlora = os.path.join(base_dir, "models", "edloras", DEFAULT_EDLORA)
    if os.path.exists(ckpt) and os.path.exists(edlora):
        return
    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy()
    load_pack()
    from mixofshow.devkit import models
    from mixofshow.edlora.format import save_edlora

    started = time.monotonic()
    model, clip, vae = models.small_sd1(seed=0)
    edlora = models.make_edlora(model, clip, words=("<demo1>", "<demo2>"), seed=7, name=DEFAULT_EDLORA)
    save_edlora(edlora, os.path.join(base_dir, "models", "edloras", DEFAULT_EDLORA))
    models.write_checkpoint(ckpt, model, clip, vae)
    print(f"[demo] built the embedded default model and ED-LoRA in {time.monotonic() - started:.1f} s")


WORLD_CONCEPTS = ("zorb", "quill", "brim")  # left, centre, right


def world_files() -> tuple[str, list[str]] | None:
    """The cached world checkpoint and the ED-LoRAs of :data:`WORLD_CONCEPTS`, or None when the world is not trained."""
    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy()
    load_pack()
    from mixofshow.devkit import world_concepts, world_model

    checkpoint = world_model.cached_world_checkpoint()
    concepts = demo_concepts()
    if checkpoint is None:
        return None
    files = world_concepts.trained_concept_files(world_model.checkpoint_identity(checkpoint), concepts)
    return (checkpoint, files) if files else None


def world_prompt(base_dir: str, checkpoint: str, edloras: list[str]) -> dict:
    """The shipped fuse_loras_regional graph on the world: its three LoRA concepts become world ED-LoRAs (same node
    ids and links), each region paints one of them in its own 128x128 panel of a 384x128 image: a box the size of
    the images the model and the concepts were trained at (in thirds of one 128x128 image boxes were seldom named;
    README, the small world)."""
    from devkit.server import load_workflow, set_inputs
    from mixofshow.devkit import world_model
    from mixofshow.devkit.world_concepts import REGIONAL_BACKGROUND, phrase

    prompt = load_workflow("fuse_loras_regional")
    concept_nodes = [k for k, v in prompt.items() if v["class_type"] == "MoSLoRAConcept"]
    names = [link_user_file(path, "edloras", base_dir) for path in edloras]
    subjects = [f"<{n}1> <{n}2>" for n in WORLD_CONCEPTS]
    for node_id, name, subject in zip(concept_nodes, names, subjects, strict=True):
        chain = {k: v for k, v in prompt[node_id]["inputs"].items() if k == "concepts"}
        prompts = "\n".join(phrase(subject, p, bg) for p, bg in (("left", "white"), ("centre", "grey")))
        inputs = {"edlora_name": name, "unet_strength": 1.0, "text_encoder_strength": 1.0, "prompts": prompts, **chain}
        prompt[node_id] = {"class_type": "MoSEDLoRAStack", "inputs": inputs}
    size = world_model.IMAGE_SIZE
    width = size * len(subjects)
    boxes = "|".join(
        f"[{phrase(subject, 'centre', REGIONAL_BACKGROUND)}]-*-[]-*-[0, {i * size}, {size}, {(i + 1) * size}]"
        for i, subject in enumerate(subjects)
    )
    caption = (
        f"a {subjects[0]} on the left, a {subjects[2]} on the right, a {subjects[1]} on the centre, "
        f"on a {REGIONAL_BACKGROUND} background"
    )
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=link_user_file(checkpoint, "checkpoints", base_dir))
    set_inputs(prompt, "MoSGradientFusion", sample_resolution=size, solver="exact", measure_drift=False)
    set_inputs(prompt, "MoSRegionsFromText", width=width, height=size, text=boxes)
    for node in prompt.values():  # set_inputs names its own first argument 'prompt'
        if node["class_type"] == "MoSRegionalConditioning":
            node["inputs"].update(prompt=caption, negative="")
    set_inputs(prompt, "EmptyLatentImage", width=width, height=size)
    set_inputs(  # as the benchmark samples
        prompt,
        "KSampler",
        steps=world_model.SAMPLING_STEPS,
        cfg=world_model.SAMPLING_CFG,
        sampler_name=world_model.SAMPLER,
        scheduler=world_model.SCHEDULER,
        seed=0,
    )
    set_inputs(prompt, "SaveImage", filename_prefix="mixofshow/world_regional")
    return prompt


def demo_concepts() -> list:
    """The world's :data:`WORLD_CONCEPTS`, left to right."""
    from mixofshow.devkit import world

    return [next(c for c in world.CONCEPTS if c.name == name) for name in WORLD_CONCEPTS]


def describe_world_image(path: str) -> str:
    """What the evaluator sees in each third of the image, and how much of the object there is in the colours of the
    concept asked for (the graded score: it shows a concept's colours arriving before its shape does)."""
    import numpy as np
    import torch
    from PIL import Image

    from mixofshow.devkit import world

    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
    cut = [round(i * image.shape[1] / 3) for i in range(4)]
    boxes = [image[:, cut[i] : cut[i + 1]] for i in range(3)]
    concepts = demo_concepts()
    seen = [world.identify(box) or "no concept" for box in boxes]
    shares = [world.colour_share(box, concept) for box, concept in zip(boxes, concepts, strict=True)]
    wanted = ", ".join(f"{w} {n}" for w, n in zip(("left", "centre", "right"), WORLD_CONCEPTS, strict=True))
    return f"asked for {wanted}; the evaluator sees " + ", ".join(
        f"{w} {s} ({share:.0%} of the object in {c.name}'s colours)"
        for w, s, share, c in zip(("left", "centre", "right"), seen, shares, concepts, strict=True)
    )


def link_user_file(path: str, folder: str, base_dir: str) -> str:
    name = os.path.basename(path)
    target = os.path.join(base_dir, "models", folder, name)
    if os.path.abspath(path) != os.path.abspath(target):
        if os.path.lexists(target):
            os.remove(target)
        os.symlink(os.path.abspath(path), target)
    return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-dir",
        default=os.environ.get("MOS_DEMO_DIR")
        or os.path.join(os.path.expanduser(os.environ.get("MOS_RUNTIME", "~/.cache/mixofshow-runtime")), "demo"),
    )
    parser.add_argument("--ckpt", default=os.environ.get("CKPT") or None)
    parser.add_argument("--edlora", default=os.environ.get("EDLORA") or None)
    parser.add_argument("--prompt", default=os.environ.get("PROMPT") or None)
    parser.add_argument("--random", action="store_true", help="the embedded random-weight default even when the world is cached")
    args = parser.parse_args()

    from devkit.bootstrap import comfyui_dir
    from devkit.server import ComfyServer, load_workflow, prepare_base_dir, set_inputs

    base_dir = prepare_base_dir(os.path.abspath(args.base_dir))
    prompt = load_workflow("edlora_single_concept")
    world = None if (args.ckpt or args.edlora or args.random) else world_files()
    if world is not None:
        print("[demo] the small world is cached: fusing three world concepts and painting each in its box")
        prompt = world_prompt(base_dir, *world)
    elif args.ckpt or args.edlora:
        if not (args.ckpt and args.edlora):
            parser.error("give both CKPT and EDLORA (or neither, for the embedded default)")
        set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=link_user_file(args.ckpt, "checkpoints", base_dir))
        set_inputs(prompt, "MoSEDLoRALoader", edlora_name=link_user_file(args.edlora, "edloras", base_dir))
        if args.prompt:
            set_inputs(prompt, "MoSTextEncode", text=args.prompt)
    else:
        build_default_files(base_dir)
        set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=DEFAULT_CKPT)
        set_inputs(prompt, "MoSEDLoRALoader", edlora_name=DEFAULT_EDLORA)
        set_inputs(prompt, "MoSTextEncode", text=args.prompt or DEFAULT_PROMPT)
        # the embedded default has random weights: a small picture and few steps show the same machinery
        set_inputs(prompt, "EmptyLatentImage", width=256, height=256)
        set_inputs(prompt, "KSampler", steps=8)

    server = ComfyServer(comfyui_dir(), base_dir, python=sys.executable)
    print(f"[demo] starting headless ComfyUI on {server.url} (log: {server.log_path})")
    with server:
        if "IMPORT FAILED" in server.log_text():
            print(server.log_tail(), file=sys.stderr)
            print("[demo] the pack failed to import", file=sys.stderr)
            return 1
        started = time.monotonic()
        entry = server.run(prompt)
        images = server.image_files(entry)
    print(f"[demo] workflow finished in {time.monotonic() - started:.1f} s; the server was stopped")
    for path in images:
        print(f"[demo] image: {path}")
    if world is not None and images:
        print(f"[demo] {describe_world_image(images[-1])}")
    latest = os.path.join(base_dir, "output", "mixofshow", "latest_demo.png")
    if images:
        shutil.copyfile(images[-1], latest)
        print(f"[demo] latest image also copied to {latest}")
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
