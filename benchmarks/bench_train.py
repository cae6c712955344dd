"""Cost of ED-LoRA training: steps per second and peak memory, tiny models against full SD1.5 and SDXL.

Every configuration runs in its own process (so each peak is its own) on random-weight models built under
inference mode, exactly as ComfyUI's loaders leave them. Ratios are printed side by side from one run; absolute
times on a shared machine mean little. CPU peak memory is the growth of the process's maximum resident set over
the loaded model; on CUDA it is ``torch.cuda.max_memory_allocated`` over the loaded model.

SD1.x against SDXL at the same resolution: ``tiny`` vs ``tiny-sdxl`` (the tiny models with the real block
structures) and ``sd15`` vs ``sdxl`` (full sizes; full SDXL runs by default only on CUDA: it needs ~27 GB in float32
on a CPU). On CUDA the UNet is fp16, as ComfyUI loads it there.

Usage: ``make bench`` or ``$PYTHON benchmarks/bench_train.py [--device cuda] [--steps 4] [--sd15-size 128]``.
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

CONFIGS = {
    # name: (model, resolution argument, batch, masks + attention regulariser, gradient checkpointing)
    "tiny": ("tiny", "tiny_size", 2, False, False),
    "tiny+masks": ("tiny", "tiny_size", 2, True, False),
    "tiny-sdxl": ("tiny_sdxl", "tiny_size", 2, False, False),
    "sd15": ("sd15", "sd15_size", 1, False, False),
    "sd15+masks": ("sd15", "sd15_size", 1, True, False),
    "sd15+ckpt": ("sd15", "sd15_size", 1, False, True),
    # full-size SDXL base: ~27 GB in float32 with the training copy, so only where asked (--only) or on CUDA
    "sdxl": ("sdxl", "sd15_size", 1, False, False),
    "sdxl+ckpt": ("sdxl", "sd15_size", 1, False, True),
    "sdxl@1024+ckpt": ("sdxl", "sdxl_size", 1, False, True),
}
FULL_SDXL = ("sdxl", "sdxl+ckpt", "sdxl@1024+ckpt")


def worker(name: str, args) -> dict:
    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy(cpu=args.device == "cpu")
    load_pack()
    import torch

    from mixofshow.devkit import models
    from mixofshow.training.loop import TrainingData, TrainSettings, train_edlora

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    kind, size_arg, batch, masks, checkpointing = CONFIGS[name]
    size = getattr(args, size_arg)
    with torch.inference_mode():
        # on a GPU the UNet is fp16, as ComfyUI loads it there (adapters and vectors train in fp32)
        unet_dtype = torch.float16 if args.device == "cuda" else torch.float32
        if kind == "tiny":
            model, clip, _ = models.tiny_sd1(seed=0)
        elif kind == "tiny_sdxl":
            model, clip, _ = models.tiny_sdxl(seed=0)
        elif kind == "sdxl":
            model, clip = models.sdxl_unet(seed=0, dtype=unet_dtype), models.sdxl_clip(seed=0)
        else:
            model, clip = models.sd15_unet(seed=0, dtype=unet_dtype), models.clip_l(seed=0)
    latents = torch.randn(4, 4, size // 8, size // 8)
    subject = None
    if masks:
        subject = torch.zeros(4, 1, size, size)
        subject[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    data = TrainingData(latents, ["a photo of <b1> <b2> on a table"] * 4, subject)
    settings = TrainSettings(
        words=("<b1>", "<b2>"), class_word="dog", steps=args.steps + 1, batch_size=batch, gradient_checkpointing=checkpointing
    )
    if args.device == "cuda":
        import comfy.model_management

        with torch.inference_mode():  # as ComfyUI's nodes load models
            comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stamps: list[float] = []

    def on_step(step, total, loss):
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with torch.inference_mode():
        result = train_edlora(model, clip, data, settings, on_step=on_step)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    trainable = sum(e.numel() for e in result.edlora.embeddings.values()) + sum(
        p.down.numel() + p.up.numel() for pairs in (result.edlora.unet, result.edlora.text_encoder) for p in pairs.values()
    )
    weights = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())
    weights += sum(t.numel() * t.element_size() for t in clip.cond_stage_model.state_dict().values())
    return {
        "steps_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "peak_bytes": max(0, peak),
        "trainable": trainable,
        "weights_bytes": weights,
        "size": size,
        "batch": batch,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--tiny-size", type=int, default=128)
    parser.add_argument("--sd15-size", type=int, default=128, help="SD1.5 and SDXL side by side at this size")
    parser.add_argument("--sdxl-size", type=int, default=1024, help="SDXL at its own resolution")
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return 0

    results = {}
    default = [n for n in CONFIGS if args.device == "cuda" or n not in FULL_SDXL]
    for name in args.only or default:
        command = [sys.executable, __file__, "--worker", name, "--device", args.device, "--steps", str(args.steps)]
        command += ["--tiny-size", str(args.tiny_size), "--sd15-size", str(args.sd15_size), "--sdxl-size", str(args.sdxl_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        results[name] = json.loads(lines[-1][len("RESULT ") :])

    reference = next(iter(results.values()))
    print(f"ED-LoRA training on {args.device}, {args.steps} timed steps per configuration")
    print(
        f"{'configuration':<12} {'image':>6} {'batch':>5} {'steps/s':>9} {'x first':>8} {'peak MB':>9} {'x first':>8} "
        f"{'trainable':>10} {'weights MB':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r['size']:>6} {r['batch']:>5} {r['steps_per_s']:>9.3f} "
            f"{r['steps_per_s'] / reference['steps_per_s']:>8.3f} {r['peak_bytes'] / 2**20:>9.1f} "
            f"{r['peak_bytes'] / max(1, reference['peak_bytes']):>8.2f} {r['trainable']:>10,} {r['weights_bytes'] / 2**20:>11.1f}"
        )
    for sd1, sdxl in (("tiny", "tiny-sdxl"), ("sd15", "sdxl"), ("sd15+ckpt", "sdxl+ckpt")):
        if sd1 in results and sdxl in results:
            a, b = results[sd1], results[sdxl]
            print(
                f"SDXL vs SD1.x at {a['size']} px ({sdxl} vs {sd1}): {a['steps_per_s'] / b['steps_per_s']:.2f}x time per "
                f"step, peak {b['peak_bytes'] / max(1, a['peak_bytes']):.2f}x"
            )
    for plain, masked in (("tiny", "tiny+masks"), ("sd15", "sd15+masks")):
        if plain in results and masked in results:
            slow = results[plain]["steps_per_s"] / results[masked]["steps_per_s"]
            print(f"masks + attention regulariser cost {slow:.2f}x time per step on {plain}")
    if "sd15" in results and "sd15+ckpt" in results:
        plain, ckpt = results["sd15"], results["sd15+ckpt"]
        activations = plain["peak_bytes"] - plain["weights_bytes"]
        activations_ckpt = ckpt["peak_bytes"] - ckpt["weights_bytes"]
        print(
            f"gradient checkpointing on sd15: {plain['steps_per_s'] / ckpt['steps_per_s']:.2f}x time per step, peak "
            f"{ckpt['peak_bytes'] / max(1, plain['peak_bytes']):.2f}x; beyond the weight copy "
            f"{activations_ckpt / 2**20:.0f} MB vs {activations / 2**20:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
