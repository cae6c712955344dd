"""Cost of regional sampling: time per sampling step with 0, 1, 3 and 6 regions against plain sampling.

Ratios are printed side by side from one run (absolute times on a shared machine mean little). The model is the
small SD1.x-architecture checkpoint layout (SD1.5 block structure, 320 channels, full CLIP-L) with random weights.

Usage: ``make bench`` or ``$PYTHON benchmarks/bench_regional.py [--size 512] [--steps 4] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)


COLUMNS = [
    (0.0, 0.0, 1.0, 0.4),
    (0.0, 0.3, 1.0, 0.7),
    (0.0, 0.6, 1.0, 1.0),
    (0.0, 0.0, 0.5, 0.5),
    (0.5, 0.5, 1.0, 1.0),
    (0.2, 0.2, 0.8, 0.8),
]


def regional_step_times(model, clip, size: int, steps: int, repeats: int, counts=(0, 1, 3, 6)) -> list[tuple[str, float]]:
    """``[(label, seconds per step)]``: plain sampling, then regional sampling with each count of regions (0: the
    regional patch installed with no regions), best of ``repeats``, after one warm-up run."""
    import torch

    import nodes as comfy_nodes
    from mixofshow.nodes.regional import RegionalConditioning, RegionNode
    from mixofshow.regional.patch import RegionalCrossAttention

    with torch.inference_mode():  # as ComfyUI runs every node
        positive = comfy_nodes.CLIPTextEncode().encode(clip, "a park with people")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "lowres")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, 1)[0]

    def timed(sampling_model, pos, neg):
        best = float("inf")
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.inference_mode():
                comfy_nodes.common_ksampler(sampling_model, 1, steps, 7.0, "dpmpp_2m", "karras", pos, neg, latent)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - started) / steps)
        return best

    timed(model, positive, negative)  # warm-up: model load, kernels
    rows = [("plain", timed(model, positive, negative))]
    for count in counts:
        regions = ()
        for index in range(count):
            top, left, bottom, right = COLUMNS[index]
            regions = RegionNode.execute(
                prompt=f"person number {index}",
                negative="blurry",
                top=top,
                left=left,
                bottom=bottom,
                right=right,
                mask=None,
                regions=regions,
            ).args[0]
        if count == 0:
            regional_model = model.clone()
            RegionalCrossAttention(regional_model.get_model_object("diffusion_model"), []).install(regional_model)
            pos, neg = positive, negative
        else:
            with torch.inference_mode():
                regional_model, pos, neg = RegionalConditioning.execute(
                    model=model, clip=clip, prompt="a park with people", negative="lowres", regions=regions
                ).args
        rows.append((str(count), timed(regional_model, pos, neg)))
    return rows


def print_step_times(title: str, rows: list[tuple[str, float]]) -> None:
    print(title)
    print(f"{'regions':>8}{'s / step':>10}{'vs plain':>10}")
    plain = rows[0][1]
    for label, seconds in rows:
        print(f"{label:>8}{seconds:>10.3f}{seconds / plain:>9.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy()
    load_pack()
    import torch

    from mixofshow.devkit.models import small_sd1

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, clip, _ = small_sd1(seed=0)
    rows = regional_step_times(model, clip, args.size, args.steps, args.repeats)
    print_step_times(
        f"== Regional sampling cost ({args.size}x{args.size}, {args.steps} dpmpp_2m steps with CFG, best of {args.repeats}) ==",
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
