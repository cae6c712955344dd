"""The world model: a miniature SD1.x text-to-image model trained from scratch on :mod:`devkit.world`.

It is a real SD1.x checkpoint that ComfyUI's core Load Checkpoint detects as SD1.5: SD1.5's UNet block layout (16
cross-attention layers, the SD1.5 module names, eps prediction) at 320 channels on every level, a full-size CLIP-L
and a VAE in the TAESD layout (ComfyUI builds a TAESD first stage from ``first_stage_model.taesd_*`` keys), so a
128-pixel image is a 16x16x4 latent as in SD1.x. What is trained, and why it fits on two CPU cores:

* the VAE, from an exact 8x8 block average (:func:`block_average_taesd`), as an autoencoder (object-weighted MSE) on
  crops of the world's renders and as many of a broader world (patterns in any colour pair except the concepts',
  :func:`devkit.world.broader_scene`: a VAE sees more than captions say), then its ``vae_scale``/``vae_shift`` set
  so the model-space latents (after SD1.x's 0.18215) have zero mean and unit variance;
* the UNet, from scratch, on the denoising loss of ComfyUI's own SD1.x noise schedule (offset noise and min-SNR
  weighting, object cells weighted up, see :class:`WorldSettings`), first at half the resolution (the layout, at a
  third of the cost per image) then at the full one (:class:`UNetStage`), with 10% empty captions so
  classifier-free guidance works, an exponential moving average kept for sampling;
* the CLIP-L is *not* trained: it is a deterministic random CLIP-L (rounded to the checkpoint's fp16 first, so
  training sees exactly what sampling computes) whose layers' residual branches are zero (:func:`frozen_clip`), so
  each output token is its own word at its place, which the UNet learns to read sooner than random layers' mixed
  features; concepts learn their vectors and adapters through it like through a real CLIP.

Training runs under bfloat16 autocast where the CPU computes bfloat16 natively (:func:`cpu_autocast`; the weights
stay float32) and in float32 elsewhere, deterministic for the seed on one machine.
``python scripts/train_world_model.py`` trains and caches it (32-49 minutes on two cores);
:func:`cached_world_checkpoint` finds it. It is a benchmark and demo asset; tests never need it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import comfy.sample
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import comfy.utils
import torch

from . import models, world

IMAGE_SIZE = 128  # 16x16 latents: a pattern's period spans more than one latent cell, so a small VAE can keep it
CHECKPOINT_NAME = "mos-world-sd1.safetensors"
#: bumped when :mod:`devkit.world` draws its scenes differently, so cached training stages are not reused
WORLD_VERSION = 2
SD1_LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15
#: how the world is sampled (benchmark, readback, demo). euler_ancestral at 40 steps doubles the shape readback on
#: ordinary captions (its noise lets a sample commit to one place where euler's steps carry the mean of the places
#: down into a band) but named no more concepts (README, Benchmarks), so the benchmark keeps euler and its numbers
SAMPLER = "euler"
SCHEDULER = "normal"
SAMPLING_STEPS = 20
SAMPLING_CFG = 5.0


def native_bfloat16(cpu_flags: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (the ``avx512_bf16`` or ``amx_bf16`` flag of ``/proc/cpuinfo``,
    or of ``cpu_flags`` when given). Where it does, bfloat16 autocast runs the world's work about 2x faster than
    float32; where it does not, PyTorch emulates it and the same work runs 2-3x *slower* (measured on a 2-core AVX-512
    CPU without either: a UNet step 4.3 s vs 2.1 s, a VAE step 3.3 s vs 1.0 s). Read from the flags, not timed, so the
    choice, and with it the numbers, is the same on every run on one machine."""
    words = set((_proc_cpuinfo() if cpu_flags is None else cpu_flags).split())
    return "avx512_bf16" in words or "amx_bf16" in words


@functools.cache
def _proc_cpuinfo() -> str:
    """``/proc/cpuinfo``, read once (every training step asks for the autocast); empty where there is none (not
    Linux: no way to tell, and float32 is never the slow choice)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_autocast():
    """The autocast context every CPU step of the small world runs under (building the model, its concepts, the
    benchmark, the readback): bfloat16 where :func:`native_bfloat16`, else a disabled one (float32)."""
    if native_bfloat16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def cache_dir() -> str:
    """Where the world model is cached: ``$MIXOFSHOW_WORLD_DIR`` or ``~/.cache/mixofshow-world``."""
    return os.environ.get("MIXOFSHOW_WORLD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mixofshow-world")


def cached_world_checkpoint() -> str | None:
    """The cached world checkpoint, or None when it has not been trained on this machine."""
    path = os.path.join(cache_dir(), CHECKPOINT_NAME)
    return path if os.path.isfile(path) else None


@dataclass(frozen=True)
class WorldSettings:
    seed: int = 0
    scenes: int = 2000  # distinct training scenes (captions are encoded once each)
    max_things: int = 3
    vae_steps: int = 500
    vae_batch: int = 16
    vae_crop: int = 64  # the VAE is convolutional: it trains on random crops, 4x cheaper than whole images
    vae_lr: float = 5e-4
    vae_object_weight: float = 4.0  # extra loss weight on object pixels (the background is most of every image)
    # the UNet first learns the world's layout (backgrounds, colours, shapes, positions) at half the resolution, where
    # a step costs a third per image, then its detail at the full one; same weights, one schedule
    unet_coarse_steps: int = 200
    unet_coarse_batch: int = 64
    unet_steps: int = 160
    unet_batch: int = 16
    unet_lr: float = 8e-4
    # extra loss weight on latent cells the objects cover (the flat background is most of every latent)
    unet_object_weight: float = 2.0
    warmup: int = 40
    ema: float = 0.98  # a short average: a few hundred steps are early training, where a long one lags behind
    uncond_rate: float = 0.1
    # per-image, per-channel constant added to the noise: without it the schedule's last steps leak each image's mean
    # colour, the model learns to read the background from it, and sampling from pure noise paints random backgrounds
    noise_offset: float = 0.1
    min_snr: float = 5.0  # min-SNR loss weighting (eps loss times min(SNR, 5) / SNR): global structure learns sooner
    # the random CLIP-L's layers mix each token with those before it (features 0.8 cosine-similar); with its residual
    # branches zeroed each token is its own word, and 200 coarse steps read back background 100% (70% mixed), colour
    # pairs 52.5% (42.5%), patterns 57.5% (47.5%); a concept's vectors then reach cross-attention as they are
    mix_tokens: bool = False


# ------------------------------------------------------------------------------------------------------------ data


def training_scenes(settings: WorldSettings) -> list[world.Scene]:
    generator = torch.Generator().manual_seed(settings.seed)
    return [world.random_scene(generator, settings.max_things) for _ in range(settings.scenes)]


def images_of(scenes: list[world.Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, 3, size, size]`` renders in ``[0, 1]``."""
    return torch.stack([world.render(s, size) for s in scenes]).permute(0, 3, 1, 2).contiguous()


def frozen_clip(seed: int, mix_tokens: bool = False) -> comfy.sd.CLIP:
    """The world model's text encoder: a deterministic random CLIP-L with its weights rounded to fp16 (as saved).

    Unless ``mix_tokens``, every layer's residual branches (attention output and MLP output projections) are zero, so
    each output token is its own word at its place, layer-normed (why: :attr:`WorldSettings.mix_tokens`)."""
    clip = models.clip_l(seed)
    with torch.no_grad():
        for name, param in clip.cond_stage_model.named_parameters():
            if not mix_tokens and (".self_attn.out_proj." in name or ".mlp.fc2." in name):
                param.zero_()
            param.copy_(param.to(torch.float16).float())
    return clip


@torch.no_grad()
def encode_captions(clip: comfy.sd.CLIP, captions: list[str], batch: int = 64) -> torch.Tensor:
    """``[N, 77, 768]`` float16 contexts as ComfyUI's SD1 CLIP computes them for each caption (one 77-token chunk)."""
    encoder = clip.cond_stage_model.clip_l
    tokens = []
    for caption in captions:
        (chunk, *rest) = clip.tokenize(caption)["l"]
        if rest:
            raise ValueError(f"caption longer than one 77-token chunk: {caption!r}")
        tokens.append([int(t[0]) for t in chunk])
    out = []
    for start in range(0, len(tokens), batch):
        with cpu_autocast():
            out.append(encoder(tokens[start : start + batch])[0].to(torch.float16))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------------- VAE


@torch.no_grad()
def init_from_scratch(module: torch.nn.Module, seed: int, zero: Callable[[str], bool] = lambda name: False) -> None:
    """PyTorch's default initialisation, deterministic for ``seed`` (ComfyUI's ops skip initialisation); parameters
    whose module name ``zero`` accepts start at zero (residual branches that start as identities)."""
    torch.manual_seed(seed)
    for name, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5))
            if sub.bias is not None:
                torch.nn.init.zeros_(sub.bias)
            if zero(name):
                torch.nn.init.zeros_(sub.weight)
        elif isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if sub.weight is not None:
                torch.nn.init.ones_(sub.weight)
                torch.nn.init.zeros_(sub.bias)


@torch.no_grad()
def block_average_taesd(latent_gain: float = 0.1) -> comfy.taesd.taesd.TAESD:
    """A TAESD-layout autoencoder that starts as an exact block average: its encoder writes each 8x8 cell's mean
    colour (times ``latent_gain``, which keeps the decoder's tanh clamp linear) into latent channels 0-2 and 0 into
    channel 3; its decoder repeats each cell's colour over the cell. Every residual branch starts at zero, so training
    from here only has to add what an average loses (edges, patterns finer than a cell); from random weights the same
    network needs far more steps than two CPU cores allow to get colours right at all."""
    vae = comfy.taesd.taesd.TAESD()
    init_from_scratch(vae, 11, lambda name: name.endswith("conv.4"))
    encoder, decoder = vae.taesd_encoder, vae.taesd_decoder

    def copy_channels(conv, gain: float, channels: int = 3) -> None:
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[c, c, 1, 1] = gain
        if conv.bias is not None:
            conv.bias.zero_()

    copy_channels(encoder[0], 1.0)
    copy_channels(encoder[14], latent_gain)
    for index in (2, 6, 10):  # stride-2 3x3 convolutions: the mean of each 2x2 block
        encoder[index].weight.zero_()
        for c in range(encoder[index].weight.shape[0]):
            encoder[index].weight[c, c, 1:, 1:] = 0.25
    copy_channels(decoder[1], 1.0 / latent_gain)
    for index in (7, 12, 17):  # after each nearest upsampling
        copy_channels(decoder[index], 1.0, decoder[index].weight.shape[0])
    copy_channels(decoder[19], 1.0)
    return vae


def train_vae(images: torch.Tensor, settings: WorldSettings, report: Callable[[str], None]) -> comfy.taesd.taesd.TAESD:
    """A TAESD-layout autoencoder, from :func:`block_average_taesd`, trained on random crops of ``images``
    ``[N, 3, H, W]`` in ``[0, 1]`` (object pixels weighted up); latent statistics folded into ``vae_scale`` and
    ``vae_shift`` so model-space latents are standardised."""
    torch.manual_seed(settings.seed + 11)
    vae = block_average_taesd()
    generator = torch.Generator().manual_seed(settings.seed + 12)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / settings.warmup) * (1 - s / settings.vae_steps)
    )
    start, crop, size = time.time(), settings.vae_crop, images.shape[-1]
    for step in range(settings.vae_steps):
        index = torch.randint(len(images), (settings.vae_batch,), generator=generator)
        # crops on the 8-pixel grid, as the latent cells lie
        y, x = (int(torch.randint((size - crop) // 8 + 1, (1,), generator=generator)) * 8 for _ in range(2))
        batch = images[index, :, y : y + crop, x : x + crop]
        with cpu_autocast():
            out = vae.taesd_decoder(vae.taesd_encoder(batch)).float()
        background = images[index, :, :1, :1]  # of the whole image: a crop's corner may lie on an object
        on_object = world.object_mask(batch.permute(0, 2, 3, 1), background.permute(0, 2, 3, 1))[:, None].float()
        loss = ((out - batch).square() * (1 + settings.vae_object_weight * on_object)).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step == 0:
            report(
                f"vae step {step + 1}/{settings.vae_steps} weighted mse {float(loss.detach()):.5f} ({time.time() - start:.0f} s)"
            )
    with torch.no_grad(), cpu_autocast():
        raw = torch.cat([vae.taesd_encoder(images[i : i + 128]).float() for i in range(0, min(len(images), 512), 128)])
        mean, std = float(raw.mean()), float(raw.std())
        vae.vae_scale.fill_(std * SD1_LATENT_SCALE)
        vae.vae_shift.fill_(-mean / (std * SD1_LATENT_SCALE))
    report(f"vae latents: mean {mean:.3f} std {std:.3f}")
    return vae


def _concept_of(thing: world.Thing) -> str:
    return next(c.name for c in world.CONCEPTS if c.thing(thing.position, thing.size) == thing)


@torch.no_grad()
def vae_reconstruction(vae: comfy.taesd.taesd.TAESD) -> dict[str, float]:
    """How recognisably the VAE reconstructs the world: the share of concept renders (every concept at three
    positions on every background) the evaluator still identifies after encode and decode, and the share of the
    ordinary scenes whose background and object colours read back the same."""
    concept_scenes = [
        world.Scene(bg, (c.thing(position),)) for c in world.CONCEPTS for bg in world.BACKGROUNDS for position in world.POSITIONS
    ]
    generator = torch.Generator().manual_seed(1234)
    ordinary = [world.random_scene(generator, 1) for _ in range(60)]
    images = images_of(concept_scenes + ordinary)
    with cpu_autocast():
        decoded = vae.decode(vae.encode(images * 2 - 1)).float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 1)
    named = [
        world.identify(image) == _concept_of(t) for image, t in zip(decoded, [s.things[0] for s in concept_scenes], strict=False)
    ]
    same = []
    for image, scene in zip(decoded[len(concept_scenes) :], ordinary, strict=True):
        got, want = world.measure(image), world.measure(world.render(scene))
        same.append(
            got.background == want.background and got.pair() == want.pair() and world.shape_of(got) == world.shape_of(want)
        )
    return {"concepts_identified": sum(named) / len(named), "ordinary_read_back": sum(same) / len(same)}


# ------------------------------------------------------------------------------------------------------------ UNet


def _zero_branch(name: str) -> bool:
    """Residual branches that start at zero: each ResBlock's last conv, each transformer's output, the final conv."""
    return name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2"


@dataclass(frozen=True)
class UNetStage:
    """One resolution of the UNet's training: model-space ``latents`` ``[N, 4, h, w]``, per-cell loss ``weights``
    ``[N, 1, h, w]`` (row ``i`` of both is scene ``i``, whose caption context is row ``i`` of the contexts), and how
    many steps of how many images it runs."""

    latents: torch.Tensor
    weights: torch.Tensor
    steps: int
    batch: int


def object_weights(images: torch.Tensor, object_weight: float) -> torch.Tensor:
    """``[N, 1, H/8, W/8]`` loss weights for the latents of ``images`` ``[N, 3, H, W]``: 1 plus ``object_weight``
    times the share of each 8x8 cell that objects cover (:func:`devkit.world.object_mask`)."""
    on_object = world.object_mask(images.permute(0, 2, 3, 1))[:, None].float()
    return 1 + object_weight * torch.nn.functional.avg_pool2d(on_object, 8)


def train_unet(
    stages: list[UNetStage],
    contexts: torch.Tensor,
    empty: torch.Tensor,
    settings: WorldSettings,
    report: Callable[[str], None],
) -> dict[str, torch.Tensor]:
    """Train SD1.5's UNet layout from scratch through ``stages`` in turn (one optimiser, one learning-rate schedule
    over all their steps) on the denoising loss, each latent cell weighted by its stage's weights; returns the
    exponential moving average of the weights (what sampling uses)."""
    config = comfy.supported_models.SD15(dict(models.SMALL_SD1_UNET))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    unet = base.diffusion_model
    init_from_scratch(unet, settings.seed + 21, _zero_branch)
    sampling = base.model_sampling
    live = {k: v for k, v in unet.state_dict().items() if v.is_floating_point()}  # views of the parameters
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.01)
    total, warm = sum(s.steps for s in stages), settings.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * (0.5 + 0.5 * math.cos(math.pi * s / total))
    )
    generator = torch.Generator().manual_seed(settings.seed + 22)
    start, running, step = time.time(), [], 0
    for stage in stages:
        for _ in range(stage.steps):
            index = torch.randint(len(stage.latents), (stage.batch,), generator=generator)
            x0 = stage.latents[index].float()
            context = contexts[index].float()
            drop = torch.rand(stage.batch, generator=generator) < settings.uncond_rate
            context[drop] = empty.float()
            noise = torch.randn(x0.shape, generator=generator)
            noise = noise + settings.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=generator)
            timestep = torch.randint(0, len(sampling.sigmas), (stage.batch,), generator=generator)
            sigma = sampling.sigma(timestep.float())
            x_in = sampling.calculate_input(sigma, sampling.noise_scaling(sigma, noise, x0))
            with cpu_autocast():
                prediction = unet(x_in, sampling.timestep(sigma).float(), context=context).float()
            snr = sigma.float() ** -2
            weight = (snr.clamp(max=settings.min_snr) / snr).reshape(-1, 1, 1, 1) * stage.weights[index]
            loss = ((prediction - noise).square() * weight).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(settings.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_([ema[k] for k in live], list(live.values()), 1 - decay)
            running.append(float(loss.detach()))
            step += 1
            if step % 50 == 0 or step == 1:
                side = x0.shape[-1] * 8
                report(
                    f"unet step {step}/{total} ({side} px) loss {sum(running) / len(running):.4f} ({time.time() - start:.0f} s)"
                )
                running = []
    return ema


# ----------------------------------------------------------------------------------------------------- the whole


def _digest(settings: WorldSettings, stage: str) -> str:
    import hashlib

    fields = {
        k: v
        for k, v in asdict(settings).items()
        if stage == "all" or k.startswith(stage) or k in ("seed", "scenes", "max_things", "warmup")
    }
    record = {**fields, "size": IMAGE_SIZE, "world": WORLD_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def _latents(vae: comfy.taesd.taesd.TAESD, images: torch.Tensor) -> torch.Tensor:
    """Model-space float16 latents of ``images`` ``[N, 3, H, W]`` in ``[0, 1]``."""
    with cpu_autocast():
        latents = torch.cat([vae.encode(images[i : i + 256] * 2 - 1).float() for i in range(0, len(images), 256)])
    return (latents * SD1_LATENT_SCALE).to(torch.float16)


def build_world_model(path: str, settings: WorldSettings = WorldSettings(), report: Callable[[str], None] = print) -> dict:
    """Train the world model and write it to ``path`` as one fp16 SD1.x checkpoint; returns what was measured."""
    started = time.time()
    torch.manual_seed(settings.seed)
    scenes = training_scenes(settings)
    images = images_of(scenes)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    broader = images_of([world.broader_scene(generator, settings.max_things) for _ in range(settings.scenes)])
    report(f"{len(scenes)} captioned scenes and {len(broader)} broader ones rendered at {IMAGE_SIZE} px")

    vae_path = os.path.join(os.path.dirname(os.path.abspath(path)), "stages", f"vae-{_digest(settings, 'vae')}.safetensors")
    if os.path.isfile(vae_path):  # the same VAE settings were trained before (a UNet-only rerun)
        vae = comfy.taesd.taesd.TAESD()
        vae.load_state_dict(comfy.utils.load_torch_file(vae_path, safe_load=True))
        report(f"vae reused from {vae_path}")
    else:
        vae = train_vae(torch.cat([images, broader]), settings, report)
        os.makedirs(os.path.dirname(vae_path), exist_ok=True)
        comfy.utils.save_torch_file({k: v.contiguous() for k, v in vae.state_dict().items()}, vae_path)
    vae_seconds = time.time() - started
    reconstruction = vae_reconstruction(vae)
    report(f"vae reconstruction: {reconstruction}")
    coarse = images_of(scenes, IMAGE_SIZE // 2)
    stages = [
        UNetStage(
            _latents(vae, coarse),
            object_weights(coarse, settings.unet_object_weight),
            settings.unet_coarse_steps,
            settings.unet_coarse_batch,
        ),
        UNetStage(
            _latents(vae, images), object_weights(images, settings.unet_object_weight), settings.unet_steps, settings.unet_batch
        ),
    ]

    clip = frozen_clip(settings.seed, settings.mix_tokens)
    captions = [s.caption() for s in scenes]
    unique = sorted(set(captions))
    encoded = encode_captions(clip, unique + [""])
    row = {c: i for i, c in enumerate(unique)}
    contexts = encoded[torch.tensor([row[c] for c in captions])]
    empty = encoded[-1]
    report(f"{len(unique)} captions encoded ({time.time() - started:.0f} s)")

    ema = train_unet(stages, contexts, empty, settings, report)
    config = comfy.supported_models.SD15(dict(models.SMALL_SD1_UNET))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    base.diffusion_model.load_state_dict(ema)
    sd = base.state_dict_for_saving(clip.get_sd(), vae.state_dict())
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    seconds = time.time() - started
    info = {
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
        "vae_seconds": round(vae_seconds, 1),
        "threads": torch.get_num_threads(),
        "vae_reconstruction": reconstruction,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    comfy.utils.save_torch_file(sd, partial, metadata={"mixofshow.devkit": "world model", "mixofshow.world": json.dumps(info)})
    os.replace(partial, path)
    report(f"world model written to {path} ({seconds / 60:.1f} min)")
    return info


def checkpoint_identity(path: str) -> str:
    """A short id of the world checkpoint at ``path`` (a digest of the training record it carries, which includes its
    settings and timings): files trained on one world model are never reused with another."""
    import hashlib

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        record = (f.metadata() or {}).get("mixofshow.world", "")
    return hashlib.sha256(record.encode()).hexdigest()[:12]


def load_world_model(path: str):
    """``(MODEL, CLIP, VAE)`` through ComfyUI's own checkpoint loader (what core Load Checkpoint runs); refuses a file
    that ComfyUI does not detect as SD1.5 with a TAESD first stage."""
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:4]
    if not isinstance(model.model.model_config, comfy.supported_models.SD15):
        raise RuntimeError(f"{path}: ComfyUI detected {type(model.model.model_config).__name__}, not SD15")
    if not isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD):
        raise RuntimeError(f"{path}: the VAE was not built as TAESD")
    return model, clip, vae


def sample(
    model,
    clip,
    vae,
    prompt,
    seed: int = 0,
    steps: int = SAMPLING_STEPS,
    cfg: float = SAMPLING_CFG,
    negative="",
    size: int = IMAGE_SIZE,
    sampler: str = SAMPLER,
    width: int | None = None,
):
    """One image ``[size, width, 3]`` (``width`` default ``size``) for ``prompt`` and ``negative`` (each a text, or
    ready CONDITIONING) the way KSampler makes it (``sampler``, :data:`SCHEDULER` schedule; the noise an ancestral
    sampler adds is seeded by ``seed`` too), decoded by ``vae``."""
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt)) if isinstance(prompt, str) else prompt
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative)) if isinstance(negative, str) else negative
    latent = torch.zeros(1, 4, size // 8, (width or size) // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler, SCHEDULER, positive, negative_cond, latent, denoise=1.0, disable_pbar=True, seed=seed
    )
    return vae.decode(samples)[0, ..., :3].float().clamp(0, 1)


@torch.no_grad()
def caption_steering(model, clip, vae, count: int = 12, sigmas=(14.0, 3.0), seed: int = 5, size: int = IMAGE_SIZE) -> dict:
    """How far the caption steers what the model predicts, without sampling: for ``count`` single objects of the
    ordinary world, the model's denoised latent (conditional, no guidance) from one input, the object's empty scene
    noised at each sigma, asked three ways: the object on the left, on the right, and on the left in another colour.
    Per sigma: ``position_shift``, how far the object's evidence (the latent's distance from the empty scene's) moves
    right, as a share of the width, from the left caption to the right one (the exact renders move it ``exact_shift``,
    about 0.5); ``position_change`` and ``colour_change``, the prediction's change when only the place or only the
    colour word changes, relative to the prediction's own distance from the empty scene. A model that reads colour
    words and ignores place words shows a large colour change and no shift: the attribute readback cannot tell that
    from drawing the place badly."""
    inner = model.model
    generator = torch.Generator().manual_seed(seed)

    def latent(scene: world.Scene) -> torch.Tensor:
        return inner.process_latent_in(vae.encode(world.render(scene, size)[None]).float())

    def centre_x(x: torch.Tensor, empty: torch.Tensor) -> float:
        evidence = (x - empty).square().sum(dim=1)[0].sum(dim=0)  # per column
        columns = (torch.arange(len(evidence)).float() + 0.5) / len(evidence)
        return float((evidence * columns).sum() / evidence.sum())

    rows = {sigma: {"position_shift": [], "position_change": [], "colour_change": []} for sigma in sigmas}
    exact = []
    for _ in range(count):
        thing = world.random_scene(generator, 1).things[0]
        background = world.random_scene(generator, 1).background
        left, right = (world.Scene(background, (replace(thing, position=p),)) for p in ("left", "right"))
        other = next(c for c in world.COLOURS if c not in (thing.colour, thing.second, "black"))
        recoloured = world.Scene(background, (replace(thing, position="left", colour=other),))
        empty = latent(world.Scene(background, ()))
        exact.append(centre_x(latent(right), empty) - centre_x(latent(left), empty))
        conds = [clip.encode_from_tokens(clip.tokenize(s.caption())) for s in (left, right, recoloured)]
        noise = torch.randn(empty.shape, generator=generator)
        for sigma in sigmas:
            x = empty + sigma * noise
            on_left, on_right, other_colour = (inner.apply_model(x, torch.tensor([sigma]), c_crossattn=c).float() for c in conds)
            scale = float((on_left - empty).norm())
            rows[sigma]["position_shift"].append(centre_x(on_right, empty) - centre_x(on_left, empty))
            rows[sigma]["position_change"].append(float((on_right - on_left).norm()) / scale)
            rows[sigma]["colour_change"].append(float((other_colour - on_left).norm()) / scale)

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 3)

    return {
        "exact_shift": mean(exact),
        **{f"sigma {sigma:g}": {k: mean(v) for k, v in row.items()} for sigma, row in rows.items()},
    }
