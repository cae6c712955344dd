"""Fusion benchmarks, printed side by side in one run (absolute times on a shared machine mean little; read ratios).

Part 1, identity drift: for each concept, the relative error of the fused model's noise prediction (and of each
fused layer's output, on that concept's own prompt) against the concept's own single-ED-LoRA model, for weight
fusion vs gradient fusion (lbfgs, exact). Tiny SD1.x-shaped model with random weights, random ED-LoRAs.

Part 2, solver speed and memory on the full SD1.5 architecture with random weights: real activations captured
while each concept samples at a small resolution feed (a) the original's LBFGS over stored activations with
chunked MSE, (b) LBFGS on the Gram form, (c) the exact solve, on representative layers, for 2, 4 and 8 concepts;
plus the bytes each approach must hold for all 176 fused layers.

Usage: ``make bench`` or ``$PYTHON benchmarks/bench_fusion.py [--part drift|speed|all] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)


def setup(device: str):
    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy(cpu=device == "cpu")
    load_pack()


def make_concepts(model, clip, count, lora_scale=0.05, seed=100):
    from mixofshow.devkit.models import make_edlora
    from mixofshow.edlora.concepts import ConceptEntry, ConceptSet

    concepts = ConceptSet()
    for i in range(count):
        edlora = make_edlora(model, clip, words=(f"<b{i}a>", f"<b{i}b>"), seed=seed + i, name=f"bench{i}", lora_scale=lora_scale)
        concepts = concepts.add(ConceptEntry(edlora, 1.0, 1.0))
    return concepts


# ------------------------------------------------------------------------------------------ part 1: drift


def layer_output_drift(model, clip, fused, concepts) -> tuple[float, float]:
    """Mean over concepts of sqrt(sum ||(W* - W_i) X||^2 / sum ||W_i X||^2) over the fused cross-attention K/V layers
    and over the other fused UNet layers, X = the fused model's inputs to each layer while it denoises the concept's
    prompt (the drift protocol's latent and noise levels)."""
    import torch

    from mixofshow.edlora.apply import module_keys
    from mixofshow.edlora.encode import encode_prompt
    from mixofshow.fusion.capture import GramCapture
    from mixofshow.fusion.drift import DRIFT_SEED, denoiser_outputs
    from mixofshow.fusion.weights import BaseWeights

    base = BaseWeights(model, clip)
    keys = sorted(fused.unet_diffs)
    w0 = base(keys)
    fused_model, fused_clip = fused.apply(model, clip)
    from mixofshow.edlora.keys import is_cross_attention_kv

    totals = {True: [], False: []}
    for index, entry in enumerate(concepts.entries):
        unet_keys, _ = module_keys(entry.edlora, model, None)
        key_to_module = {k: m for m, k in unet_keys.items()}
        positive = encode_prompt(fused_clip, fused.concepts, f"photo of a {entry.edlora.concept_name}")
        with GramCapture(fused_model.model, keys, torch.device("cpu")) as capture:
            denoiser_outputs(fused_model, positive, torch.zeros(1, 4, 32, 32), [8.0, 1.0, 0.2], DRIFT_SEED + index)
            groups = capture.reset()
        from mixofshow.fusion.capture import input_group

        num = {True: 0.0, False: 0.0}
        den = {True: 0.0, False: 0.0}
        for key in keys:
            gram = groups[input_group(key)].gram
            target = w0[key].double()
            if key in key_to_module:
                target = target + entry.unet_strength * entry.edlora.unet[key_to_module[key]].delta().double().reshape(
                    target.shape
                )
            error = (w0[key].double() + fused.unet_diffs[key].double()) - target
            kv = is_cross_attention_kv(key)
            num[kv] += float(((error @ gram) * error).sum())
            den[kv] += float(((target @ gram) * target).sum())
        for kv in (True, False):
            totals[kv].append((num[kv] / den[kv]) ** 0.5)
    return sum(totals[True]) / len(totals[True]), sum(totals[False]) / len(totals[False])


def part_drift(counts=(2, 4)):
    from mixofshow.devkit.models import tiny_sd1
    from mixofshow.fusion.procedure import gradient_fusion, weight_fusion
    from mixofshow.fusion.results import FusionSettings
    from mixofshow.fusion.solvers import DEFAULT_RIDGE

    model, clip, _ = tiny_sd1(seed=0)
    print("\n== Identity drift (tiny SD1.x model, random ED-LoRAs; lower is better) ==")
    print(
        "relative error vs each concept's own ED-LoRA model, mean over concepts: noise prediction | K/V layer outputs | "
        "other UNet layer outputs; ratios = weight fusion's drift / this method's"
    )
    header = (
        f"{'concepts':>8}  {'method':<52}{'eps':>9}{'K/V':>9}{'other':>9}{'eps ratio':>11}{'K/V ratio':>11}{'other ratio':>13}"
    )
    print(header)
    for count in counts:
        concepts = make_concepts(model, clip, count)
        rows = []
        started = time.perf_counter()
        weight = weight_fusion(model, clip, concepts)
        rows.append(("weight fusion (baseline)", weight, time.perf_counter() - started))
        # the exact solver at its default ridge and at the 1e-6 it had before the small world (side by side)
        for solver, positions, ridge in (
            ("lbfgs", "padded", DEFAULT_RIDGE),
            ("exact", "padded", DEFAULT_RIDGE),
            ("exact", "padded", 1e-6),
            ("lbfgs", "original", DEFAULT_RIDGE),
        ):
            settings = FusionSettings(
                sample_steps=20, sample_resolution=256, solver=solver, token_positions=positions, ridge=ridge
            )
            started = time.perf_counter()
            fused = gradient_fusion(model, clip, concepts, settings)
            label = f"gradient fusion {solver}, {positions} positions" + (f", ridge {ridge:g}" if ridge != DEFAULT_RIDGE else "")
            rows.append((label, fused, time.perf_counter() - started))
        base = None
        for label, fused, seconds in rows:
            eps = sum(fused.drift.values()) / count
            kv, other = layer_output_drift(model, clip, fused, concepts)
            base = base or (eps, kv, other)
            print(
                f"{count:>8}  {label:<52}{eps:>9.5f}{kv:>9.5f}{other:>9.5f}{base[0] / eps:>10.2f}x{base[1] / kv:>10.2f}x"
                f"{base[2] / other:>12.2f}x   ({seconds:.1f} s)"
            )


# ------------------------------------------------------------------------------------------ part 2: speed and memory


def capture_layer_features(model, clip, concepts, keys, resolution, steps):
    """Per concept, the raw input rows of ``keys`` while it samples alone (as the original stores them)."""
    import comfy.sample
    import torch

    from mixofshow.edlora.apply import edlora_patches
    from mixofshow.edlora.encode import encode_prompt
    from mixofshow.edlora.routing import install_layer_routing

    features = {key: [] for key in keys}
    for index, entry in enumerate(concepts.entries):
        unet_patches, text_patches = edlora_patches(entry.edlora, model, clip)
        model_i = model.clone()
        model_i.add_patches(unet_patches, entry.unet_strength)
        install_layer_routing(model_i)
        clip_i = clip.clone()
        clip_i.add_patches(text_patches, entry.text_encoder_strength)
        positive = encode_prompt(clip_i, concepts, f"photo of a {entry.edlora.concept_name}")
        store = {key: [] for key in keys}
        handles = []
        for key in keys:
            module = model_i.model.get_submodule(key[: -len(".weight")])
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, key=key, store=store: store[key].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())
                )
            )
        latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
        try:
            comfy.sample.sample(
                model_i,
                comfy.sample.prepare_noise(latent, index),
                steps,
                1.0,
                "dpmpp_2m",
                "normal",
                positive,
                positive,
                latent,
                disable_pbar=True,
                seed=index,
            )
        finally:
            for handle in handles:
                handle.remove()
        for key in keys:
            features[key].append(torch.cat(store[key]))
    return features


def part_speed(device_name: str, counts=(2, 4, 8), resolution=256, steps=4, iters=50):
    import torch

    from mixofshow.devkit.models import clip_l, sd15_unet
    from mixofshow.edlora.apply import module_keys
    from mixofshow.fusion.weights import BaseWeights

    device = torch.device(device_name)
    model, clip = sd15_unet(seed=0), clip_l(seed=0)
    layers = {
        "down_blocks.0 attn1.to_q (320x320)": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.1 attn2.to_q (640x640)": "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight",
        "mid_block attn1.to_out (1280x1280)": "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight",
    }
    print(
        f"\n== Solver speed and memory (full SD1.5 architecture, random weights, {resolution}x{resolution}, {steps} recorded steps, "
        f"{iters} LBFGS iterations, device {device}) =="
    )
    print(
        f"{'concepts':>8}  {'layer':<36}{'rows':>8}{'raw LBFGS':>11}{'Gram LBFGS':>12}{'exact':>9}{'raw/Gram':>10}{'raw/exact':>11}"
        f"{'loss raw':>12}{'loss Gram':>12}{'loss exact':>12}"
    )
    base = BaseWeights(model, clip)
    w0 = base(list(layers.values()))
    memory_rows = []
    for count in counts:
        concepts = make_concepts(model, clip, count, seed=500)
        features = capture_layer_features(model, clip, concepts, list(layers.values()), resolution, steps)
        targets_by_key = {}
        for label, key in layers.items():
            targets = []
            for entry in concepts.entries:
                unet_keys, _ = module_keys(entry.edlora, model, None)
                module = {k: m for m, k in unet_keys.items()}[key]
                targets.append(w0[key] + entry.unet_strength * entry.edlora.unet[module].delta().reshape(w0[key].shape))
            targets_by_key[key] = targets
            xs = [x.to(device) for x in features[key]]
            weight0 = w0[key].to(device)

            timings = time_solvers(weight0, xs, [t.to(device) for t in targets], iters, device)
            (raw_seconds, raw), (gram_seconds, gram_solution), (exact_seconds, exact) = timings
            rows = sum(x.shape[0] for x in xs)
            print(
                f"{count:>8}  {label:<36}{rows:>8}{raw_seconds:>10.2f}s{gram_seconds:>11.3f}s{exact_seconds:>8.3f}s"
                f"{raw_seconds / gram_seconds:>9.1f}x{raw_seconds / exact_seconds:>10.1f}x"
                f"{raw.loss_after:>12.4e}{gram_solution.loss_after:>12.4e}{exact.loss_after:>12.4e}"
            )
        memory_rows.append((count, concepts))
        del features

    print(
        "\nHost memory each approach holds for the 128 fused UNet layers at this resolution (float32; 20 steps at 512x512 "
        "multiply the activation column by about 20):"
    )
    print(f"{'concepts':>8}{'raw activations (original)':>30}{'Gram statistics (ours)':>26}{'ratio':>9}")
    keys = sorted({k for e in memory_rows[0][1].entries for k in module_keys(e.edlora, model, clip)[0].values()})
    from mixofshow.fusion.capture import input_group

    shapes = {k: tuple(w) for k, w in ((k, model.model.state_dict()[k].shape) for k in keys)}
    groups = {input_group(k): shapes[k][1] for k in keys}
    stats_bytes = 8 * (sum(k * k for k in groups.values()) + sum(d * k + 1 for d, k in shapes.values()))
    per_step_rows = rows_per_step(model, resolution)
    for count, _ in memory_rows:
        activation_bytes = 0
        for key in keys:
            activation_bytes += 4 * count * steps * per_step_rows[key] * shapes[key][1]
        print(
            f"{count:>8}{activation_bytes / 2**30:>28.2f} GB{stats_bytes / 2**30:>24.2f} GB{activation_bytes / stats_bytes:>8.1f}x"
        )


def time_solvers(w0, inputs, targets, iters, device):
    """``[(seconds, Solution)]`` for raw-feature LBFGS, Gram-form LBFGS and the exact solve on one layer; the Gram
    methods' times include building the statistics from the same rows."""
    import torch

    from mixofshow.fusion.solvers import solve_exact, solve_lbfgs, solve_lbfgs_raw
    from mixofshow.fusion.stats import layer_statistics

    def timed(run):
        started = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, result

    raw = timed(lambda: solve_lbfgs_raw(w0, inputs, [x @ t.T for x, t in zip(inputs, targets, strict=True)], iters))
    stats_seconds, (group, layer) = timed(lambda: layer_statistics(inputs, targets, device=device))
    gram_seconds, gram = timed(lambda: solve_lbfgs(w0, group.gram, layer.cross, layer.const, layer.rows, iters))
    exact_seconds, exact = timed(lambda: solve_exact(w0, group.gram, layer.cross, layer.const, layer.rows))
    return [raw, (gram_seconds + stats_seconds, gram), (exact_seconds + stats_seconds, exact)]


def part_synthetic(device_name: str, concepts=4, width=320, rows_per_concept=4096 * 20, iters=50):
    """One SD1.5-sized 320x320 layer with as many input rows per concept as 20 steps at 512x512 give."""
    import torch

    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(width, width, generator=g) * 0.02).to(device)
    mixing = torch.randn(width, width, generator=g) / width**0.5
    inputs = [
        (torch.randn(rows_per_concept, width, generator=g) @ mixing + 0.1 * torch.randn(width, generator=g)).to(device)
        for _ in range(concepts)
    ]
    targets = [
        w0 + (torch.randn(width, 4, generator=g) @ torch.randn(4, width, generator=g) * 0.003).to(device) for _ in range(concepts)
    ]
    (raw_seconds, raw), (gram_seconds, gram), (exact_seconds, exact) = time_solvers(w0, inputs, targets, iters, device)
    print(
        f"\n== Synthetic SD1.5-size layer: {width}x{width}, {concepts} concepts, {rows_per_concept} rows each (20 steps at "
        f"512x512), {iters} LBFGS iterations, device {device} =="
    )
    print(f"{'method':<28}{'seconds':>9}{'vs raw':>9}{'final loss':>14}")
    print(f"{'raw-feature LBFGS (original)':<28}{raw_seconds:>9.2f}{1.0:>8.1f}x{raw.loss_after:>14.6e}")
    print(f"{'Gram-form LBFGS':<28}{gram_seconds:>9.2f}{raw_seconds / gram_seconds:>8.1f}x{gram.loss_after:>14.6e}")
    print(f"{'exact solve':<28}{exact_seconds:>9.2f}{raw_seconds / exact_seconds:>8.1f}x{exact.loss_after:>14.6e}")


def rows_per_step(model, resolution):
    """Input rows per UNet call of each attention projection at ``resolution`` (tokens of its feature map)."""
    import torch

    from mixofshow.edlora.arch import cross_attention_sites

    diffusion_model = model.get_model_object("diffusion_model")
    side = resolution // 8
    tokens = {}
    for site in cross_attention_sites(diffusion_model):
        name = site.path
        base = name.rsplit(".attn2", 1)[0]
        level = {
            "input_blocks.1": 0,
            "input_blocks.2": 0,
            "input_blocks.4": 1,
            "input_blocks.5": 1,
            "input_blocks.7": 2,
            "input_blocks.8": 2,
            "middle_block": 3,
            "output_blocks.3": 2,
            "output_blocks.4": 2,
            "output_blocks.5": 2,
            "output_blocks.6": 1,
            "output_blocks.7": 1,
            "output_blocks.8": 1,
            "output_blocks.9": 0,
            "output_blocks.10": 0,
            "output_blocks.11": 0,
        }[".".join(base.split(".")[:2]) if not base.startswith("middle") else "middle_block"]
        count = (side // 2**level) ** 2
        for suffix in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
            tokens[f"diffusion_model.{base}.{suffix}.weight"] = count
        for suffix in ("attn2.to_k", "attn2.to_v"):
            tokens[f"diffusion_model.{base}.{suffix}.weight"] = 77
    del torch
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description="Mix-of-Show fusion benchmarks")
    parser.add_argument("--part", choices=["drift", "speed", "synthetic", "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    setup(args.device)
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.part in ("drift", "all"):
        part_drift()
    if args.part in ("synthetic", "all"):
        part_synthetic(args.device)
    if args.part in ("speed", "all"):
        part_speed(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
