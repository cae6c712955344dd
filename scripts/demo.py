"""The demo: a real headless ComfyUI with this pack renders the shipped single-concept workflow.

Run through ``make demo``. With no user files it builds an embedded default deterministically (a small
SD1.x-architecture checkpoint with random weights and a two-word ED-LoRA in the original .pth format; no
weights can be downloaded here), so the picture is noise-like: the point is that every node runs for real.
Point ``CKPT`` at an SD1.x checkpoint and ``EDLORA`` at an ED-LoRA to render a real image (set ``PROMPT`` to
use the ED-LoRA's own concept words).
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
    args = parser.parse_args()

    from devkit.bootstrap import comfyui_dir
    from devkit.server import ComfyServer, load_workflow, prepare_base_dir, set_inputs

    base_dir = prepare_base_dir(os.path.abspath(args.base_dir))
    prompt = load_workflow("edlora_single_concept")
    if args.ckpt or args.edlora:
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
    latest = os.path.join(base_dir, "output", "mixofshow", "latest_demo.png")
    if images:
        shutil.copyfile(images[-1], latest)
        print(f"[demo] latest image also copied to {latest}")
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
