"""Fusing ordinary LoRA files: time, peak memory and identity drift for 2, 4 and 8 concepts, side by side.

Each count runs in its own process (so each peak is its own): N random rank-16 LoRAs of one scope (default: every
layer, LoCon style, as the issue asks; ``--scope transformer`` for kohya's standard LoRA) are fused into a
random-weight model with gradient fusion (exact solver) and with weight fusion, and each concept's identity drift
is measured with the pack's one protocol. CPU peak memory is the growth of the process's maximum resident set over
the loaded model; on CUDA, ``torch.cuda.max_memory_allocated``. Absolute times on a shared machine mean little.

Usage: ``make bench`` or ``$PYTHON benchmarks/bench_loras.py [--model tiny|small] [--scope all] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)
WORDS = ["zorb", "quax", "blim", "trop", "vell", "kesh", "dorn", "pyx"]


def peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(count: int, args) -> dict:
    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy(cpu=args.device == "cpu")
    load_pack()
    import torch

    from mixofshow.devkit import models
    from mixofshow.devkit.loras import write_lora
    from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
    from mixofshow.edlora.format import EDLoRA
    from mixofshow.edlora.loras import load_lora_file
    from mixofshow.fusion.drift import identity_drift
    from mixofshow.fusion.procedure import gradient_fusion, weight_fusion
    from mixofshow.fusion.results import FusionSettings

    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with torch.inference_mode():
        model, clip, _ = models.tiny_sd1(seed=0) if args.model == "tiny" else models.small_sd1(seed=0)
    folder = tempfile.mkdtemp()
    concepts = ConceptSet()
    for i in range(count):
        path = os.path.join(folder, f"lora{i}.safetensors")
        write_lora(path, model, clip, scope=args.scope, rank=16, seed=200 + i, scale=0.03)
        prompts = (f"photo of {WORDS[i]} person", f"{WORDS[i]} standing in a street")
        entry = ConceptEntry(EDLoRA({}, {}, {}, name=f"lora{i}"), 1.0, 1.0, lora=load_lora_file(path), prompts=prompts)
        concepts = concepts.add(entry)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak_bytes(args.device)
    settings = FusionSettings(
        sample_steps=args.steps, sample_resolution=args.resolution, solver="exact", device=args.device, conv_layers=args.conv
    )
    with torch.inference_mode():
        start = time.perf_counter()
        gradient = gradient_fusion(model, clip, concepts, settings, measure_drift=False)
        gradient_seconds = time.perf_counter() - start
        gradient_peak = peak_bytes(args.device) - base
        start = time.perf_counter()
        weight = weight_fusion(model, clip, concepts, measure_drift=False)
        weight_seconds = time.perf_counter() - start
        gradient_drift = identity_drift(model, clip, gradient)
        weight_drift = identity_drift(model, clip, weight)
    methods: dict[str, int] = {}
    for method in gradient.layer_methods.values():
        methods[method.split(":")[0]] = methods.get(method.split(":")[0], 0) + 1
    return {
        "count": count,
        "gradient_seconds": gradient_seconds,
        "weight_seconds": weight_seconds,
        "gradient_peak": gradient_peak,
        "statistics": sum(s.groups[g].gram.numel() * 8 for s in gradient.stats.values() for g in s.groups)
        + sum(layer.cross.numel() * 8 for s in gradient.stats.values() for layer in s.layers.values()),
        "gradient_drift": sum(gradient_drift.values()) / count,
        "weight_drift": sum(weight_drift.values()) / count,
        "methods": methods,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--scope", choices=["attention", "transformer", "linear", "all"], default="all")
    parser.add_argument("--counts", default="2,4,8")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--conv", choices=["weight", "statistics"], default="weight", help="how k x k convolutions are fused")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return 0
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(count)]
        for name in ("model", "scope", "steps", "resolution", "device", "conv"):
            command += [f"--{name}", str(getattr(args, name))]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    print(
        f"{args.model} model, rank-16 LoRAs on scope '{args.scope}', conv_layers {args.conv}, samples {args.steps} steps at "
        f"{args.resolution} px, {args.device}"
    )
    print(
        f"{'concepts':>8} {'GF s':>8} {'WF s':>7} {'GF peak MB':>11} {'stats MB':>9} {'drift GF':>9} {'drift WF':>9} {'WF/GF':>6}  layers"
    )
    for r in rows:
        ratio = r["weight_drift"] / r["gradient_drift"] if r["gradient_drift"] > 0 else float("inf")
        methods = ", ".join(f"{n} {m}" for m, n in sorted(r["methods"].items()))
        print(
            f"{r['count']:>8} {r['gradient_seconds']:>8.1f} {r['weight_seconds']:>7.2f} {r['gradient_peak'] / 2**20:>11.0f} "
            f"{r['statistics'] / 2**20:>9.0f} {r['gradient_drift']:>9.4f} {r['weight_drift']:>9.4f} {ratio:>5.2f}x  {methods}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
