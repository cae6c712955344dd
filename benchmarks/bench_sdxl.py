"""SDXL costs side by side in one run: regional sampling time per step against plain sampling (0, 1, 3 and 6 regions),
and gradient-fusion statistics memory at 2, 4 and 8 concepts (held statistics and measured peak). Training steps/s
and peak memory, SD1.x against SDXL at the same resolution, are in ``bench_train.py`` (configurations ``*-sdxl``).

``--scale tiny`` (default, fits a CPU): the tiny SDXL with SDXL's real block structure (70 cross-attention blocks in
11 spatial transformers, CLIP-L + CLIP-G, ADM). ``--scale full --device cuda``: SDXL base at full size with random
weights, fp16 UNet as ComfyUI loads it on a GPU. Every fusion runs in its own process, so each peak is its own: on
CUDA ``torch.cuda.max_memory_allocated`` over the loaded model, on CPU the growth of the maximum resident set.

Usage: ``make bench`` or ``$PYTHON benchmarks/bench_sdxl.py [--scale full --device cuda] [--size 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

COUNTS = (2, 4, 8)


def build(args):
    """``(MODEL, CLIP)`` of the chosen scale."""
    import torch

    from mixofshow.devkit import models

    with torch.inference_mode():
        if args.scale == "tiny":
            model, clip, _ = models.tiny_sdxl(seed=0)
        else:
            dtype = torch.float16 if args.device == "cuda" else torch.float32
            model, clip = models.sdxl_unet(seed=0, dtype=dtype), models.sdxl_clip(seed=0)
    return model, clip


def setup(args):
    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy(cpu=args.device == "cpu")
    load_pack()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def fusion_worker(count: int, args) -> dict:
    """One gradient fusion of ``count`` random SDXL ED-LoRAs: time, statistics held, peak memory."""
    setup(args)
    import comfy.model_management
    import torch

    from mixofshow.devkit.models import make_edlora
    from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
    from mixofshow.fusion.procedure import gradient_fusion
    from mixofshow.fusion.results import FusionSettings

    model, clip = build(args)
    concepts = ConceptSet()
    for i in range(count):
        edlora = make_edlora(model, clip, words=(f"<c{i}a>", f"<c{i}b>"), seed=100 + i, name=f"c{i}")
        concepts = concepts.add(ConceptEntry(edlora, 1.0, 1.0))
    if args.device == "cuda":
        with torch.inference_mode():  # as ComfyUI's nodes load models
            comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    settings = FusionSettings(
        sample_steps=args.sample_steps, sample_resolution=args.size, solver="exact", text_encoder_iters=1, unet_iters=1
    )
    started = time.perf_counter()
    with torch.inference_mode():
        fused = gradient_fusion(model, clip, concepts, settings, measure_drift=False)
    seconds = time.perf_counter() - started
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    held = sum(t.numel() * t.element_size() for s in (fused.stats or {}).values() for t in s.to_tensors("s")[0].values())
    return {
        "seconds": seconds,
        "peak_bytes": max(0, peak),
        "stats_bytes": held,
        "layers": len(fused.unet_diffs) + len(fused.text_diffs),
    }


def regional_worker(args) -> dict:
    setup(args)
    from bench_regional import regional_step_times

    model, clip = build(args)
    return {"rows": regional_step_times(model, clip, args.size, args.steps, args.repeats)}


def run_worker(kind: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--scale", args.scale, "--device", args.device]
    command += ["--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    command += ["--sample-steps", str(args.sample_steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(1)
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", type=int, default=256, help="image side for sampling and fusion samples")
    parser.add_argument("--steps", type=int, default=3, help="timed sampling steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=4, help="fusion: sampling steps recorded per concept")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = regional_worker(args) if args.worker == "regional" else fusion_worker(int(args.worker), args)
        print("RESULT " + json.dumps(result))
        return 0

    from bench_regional import print_step_times

    where = f"{args.scale} SDXL, {args.device}"
    regional = run_worker("regional", args)
    print_step_times(
        f"== Regional sampling on {where} ({args.size}x{args.size}, {args.steps} dpmpp_2m steps with CFG, best of "
        f"{args.repeats}) ==",
        regional["rows"],
    )
    print(
        f"\n== Gradient fusion statistics on {where} ({args.sample_steps} recorded steps at {args.size}x{args.size}, "
        "exact solver) =="
    )
    print(f"{'concepts':>8}{'layers':>8}{'statistics MB':>15}{'x 2':>6}{'peak MB':>10}{'x 2':>6}{'seconds':>9}{'x 2':>6}")
    first = None
    for count in COUNTS:
        r = run_worker(str(count), args)
        first = first or r
        print(
            f"{count:>8}{r['layers']:>8}{r['stats_bytes'] / 2**20:>15.1f}{r['stats_bytes'] / first['stats_bytes']:>6.2f}"
            f"{r['peak_bytes'] / 2**20:>10.1f}{r['peak_bytes'] / max(1, first['peak_bytes']):>6.2f}"
            f"{r['seconds']:>9.1f}{r['seconds'] / first['seconds']:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
