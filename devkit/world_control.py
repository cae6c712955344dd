"""A sketch ControlNet for the world model: the layout condition the paper places its concepts with.

Mix-of-Show samples several concepts with regional prompts *and* a spatial condition (a sketch or pose T2I-Adapter /
ControlNet; the original's regionally_controlable_sampling). The world model alone draws colours and patterns
where it is asked but not shapes or places (readback: shape 35%, position 30%), and with three fused concepts in
their boxes it draws one or two objects near the middle. This module trains the missing piece for the world: a
ControlNet in ComfyUI's own ldm layout (core ControlNetLoader loads it, ControlNetApplyAdvanced applies it) that reads
a layout drawing (the objects' shapes filled in dark on white, :func:`devkit.world.sketch`, turned into the hint by
the pack's ``sketch`` layout method exactly as ``MoS Layout From Image`` does).

How it is trained, and why it fits on two CPU cores: the ControlNet is SD1.5's (the world UNet's own config, as
ComfyUI detects it), its encoder copied from the world UNet, its zero convolutions and the hint encoder's last
convolution at zero, so it starts as no change at all. The UNet stays frozen; the denoising loss flows back through
the UNet's decoder into the control residuals. The loss is the world's own (noise schedule, offset noise, object
weighting) but weighs the denoised image's error and draws noisier steps more often (:class:`ControlSettings`): the
layout is what the ControlNet is for, and it is settled at high noise, where the noise loss barely sees it. Ordinary
scenes only (no concept): the drawing says where an object is and its shape, the prompt what it looks like. About 15
minutes with bfloat16 hardware; ``python scripts/train_world_model.py`` trains it after the model,
:func:`cached_world_controlnet` finds it. A benchmark asset (``bench_world.py --sketch``); tests train it a few
steps on the small random SD1.x model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import comfy.cldm.cldm
import comfy.controlnet
import comfy.utils
import torch

from ..regional.layout import sketch_map
from . import world, world_model

CONTROLNET_NAME = "mos-world-sketch-controlnet.safetensors"
#: the checkpoint metadata key holding the world model a ControlNet was trained on (:func:`world_model.checkpoint_identity`)
BASE_KEY = "mixofshow.world_base"


@dataclass(frozen=True)
class ControlSettings:
    seed: int = 0
    image_size: int = world_model.IMAGE_SIZE
    scenes: int = 600  # ordinary scenes of one to three objects (captions are encoded once each)
    steps: int = 400
    batch: int = 12
    lr: float = 1e-3
    warmup: int = 20
    object_weight: float = 2.0  # as the world model's training: object cells count more than flat background
    # text dropped, sketch kept: the ControlNet must place objects under classifier-free guidance's empty prompt too
    uncond_rate: float = 0.1
    noise_offset: float = 0.1
    # the loss is the error of the denoised image (the noise error times sigma squared) between weights 1 and this: the
    # layout is settled at high noise, where predicting the noise is nearly trivial (the world UNet's noise error is
    # 0.003 at the top of the schedule, 0.06 near the bottom) and the noise loss barely sees where an object went
    x0_weight_cap: float = 100.0
    # timesteps drawn as len(schedule) * u ** timestep_power (u uniform): below 1 the noisier steps, where a sample
    # settles its layout, come up more often (0.5: three in four steps in the noisier half); 1 is uniform
    timestep_power: float = 0.5


#: the layout drawings the ControlNet reads are filled shapes, not outlines (``world.sketch``'s ``line``): from an
#: outline the hint encoder must first learn what lies inside it; at 120 steps outlines moved no object, filled
#: shapes began to (README, the small world)
LAYOUT_LINE = None


def layout_drawing(scene: world.Scene, size: int = world_model.IMAGE_SIZE) -> torch.Tensor:
    """``[size, size, 3]`` the layout drawing of ``scene`` in the style the ControlNet is trained on (dark on white,
    :data:`LAYOUT_LINE`): every drawing it is given, in training, readback and benchmark, comes from here."""
    return world.sketch(scene, size, LAYOUT_LINE)


def hints_of(scenes: list[world.Scene], size: int = world_model.IMAGE_SIZE) -> torch.Tensor:
    """``[N, 3, size, size]`` hints of ``scenes``: each scene's :func:`layout_drawing` through the pack's sketch
    layout method (what ``MoS Layout From Image`` gives ControlNet Apply)."""
    return torch.stack([sketch_map(layout_drawing(s, size)) for s in scenes]).permute(0, 3, 1, 2).contiguous()


def panels_sketch(concepts, size: int = world_model.IMAGE_SIZE) -> torch.Tensor:
    """``[size, size * len(concepts), 3]`` layout drawing of concepts side by side, each drawn at the centre of its
    own ``size`` square panel at the size the concepts are trained at (what the benchmark's panels ask for, left to
    right)."""
    return torch.cat([layout_drawing(world.Scene("white", (c.thing("centre"),)), size) for c in concepts], dim=1)


def controlnet_for(unet: torch.nn.Module, unet_config: dict, seed: int) -> comfy.cldm.cldm.ControlNet:
    """A ControlNet for the UNet of ``unet_config`` (as ComfyUI detects it) that changes nothing yet: the encoder and
    middle block are ``unet``'s, the hint encoder is initialised for ``seed`` with its last convolution at zero, and
    every zero convolution is zero. Float32, for training."""
    config = {k: v for k, v in unet_config.items() if k != "out_channels"}
    config.update(hint_channels=3, dtype=torch.float32, device="cpu")
    control = comfy.cldm.cldm.ControlNet(**config)
    missing, _ = control.load_state_dict(unet.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in control.named_modules():
            if not isinstance(module, torch.nn.Conv2d) or not name.startswith("input_hint_block"):
                continue
            bound = 1 / math.sqrt(module.weight[0].numel())  # PyTorch's default conv initialisation
            module.weight.copy_(torch.empty_like(module.weight).uniform_(-bound, bound, generator=generator))
            module.bias.copy_(torch.empty_like(module.bias).uniform_(-bound, bound, generator=generator))
        last = [m for m in control.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        zeroed = [last, *control.zero_convs.modules(), *control.middle_block_out.modules()]
        for module in zeroed:
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
    copied = {k for k in control.state_dict() if k not in missing}
    if not any(k.startswith("input_blocks.") for k in copied):
        raise RuntimeError("the ControlNet's encoder did not take the UNet's weights (key names differ)")
    return control


def train_controlnet(
    model, clip, vae, settings: ControlSettings = ControlSettings(), report: Callable[[str], None] = print
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a sketch ControlNet for ``model`` (a loaded SD1.x MODEL; its UNet is read, never changed), captions
    encoded by ``clip``, images encoded by ``vae``; returns its state dict (ComfyUI's ldm ControlNet keys) and what
    was measured."""
    started = time.time()
    generator = torch.Generator().manual_seed(settings.seed + 31)
    scenes = [world.random_scene(generator, 3) for _ in range(settings.scenes)]
    images = world_model.images_of(scenes, settings.image_size)
    with torch.no_grad(), world_model.cpu_autocast():  # as VAE Encode, in the model's latent space
        latents = model.model.process_latent_in(vae.encode(images.permute(0, 2, 3, 1)).float())
    weights = world_model.object_weights(images, settings.object_weight)
    hints = hints_of(scenes, settings.image_size)
    captions = [s.caption() for s in scenes]
    unique = sorted(set(captions))
    encoded = world_model.encode_captions(clip, unique + [""])
    row = {c: i for i, c in enumerate(unique)}
    contexts, empty = encoded[torch.tensor([row[c] for c in captions])], encoded[-1]
    report(f"{len(scenes)} scenes rendered, sketched, encoded ({time.time() - started:.0f} s)")

    unet = model.model.diffusion_model
    sampling = model.model.model_sampling
    frozen = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)  # gradients pass through the UNet to the control residuals, never into its weights
    try:
        control = controlnet_for(unet, model.model.model_config.unet_config, settings.seed + 32)
        control.train()
        trained = list(control.parameters())
        optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / settings.warmup) * (0.5 + 0.5 * math.cos(math.pi * s / settings.steps)),
        )
        running, losses = [], []
        for step in range(settings.steps):
            index = torch.randint(len(scenes), (settings.batch,), generator=generator)
            x0 = latents[index].float()
            context = contexts[index].float()
            drop = torch.rand(settings.batch, generator=generator) < settings.uncond_rate
            context[drop] = empty.float()
            noise = torch.randn(x0.shape, generator=generator)
            noise = noise + settings.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=generator)
            u = torch.rand(settings.batch, generator=generator) ** settings.timestep_power
            timestep = (u * len(sampling.sigmas)).long().clamp(max=len(sampling.sigmas) - 1)
            sigma = sampling.sigma(timestep.float())
            x_in = sampling.calculate_input(sigma, sampling.noise_scaling(sigma, noise, x0))
            t = sampling.timestep(sigma).float()
            with world_model.cpu_autocast():
                residuals = control(x=x_in, hint=hints[index], timesteps=t, context=context)
                prediction = unet(x_in, t, context=context, control=residuals).float()
            weight = (sigma.float() ** 2).clamp(1.0, settings.x0_weight_cap).reshape(-1, 1, 1, 1) * weights[index]
            loss = ((prediction - noise).square() * weight).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(float(loss.detach()))
            if (step + 1) % 20 == 0 or step == 0:
                losses.append(round(sum(running) / len(running), 4))
                report(f"controlnet step {step + 1}/{settings.steps} loss {losses[-1]:.4f} ({time.time() - started:.0f} s)")
                running = []
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(frozen[name])
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in control.state_dict().items()}
    info = {"settings": asdict(settings), "seconds": round(time.time() - started, 1), "losses": losses}
    return state, info


def controlnet_path(checkpoint: str) -> str:
    """Where the sketch ControlNet of the world checkpoint at ``checkpoint`` is cached: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CONTROLNET_NAME)


def cached_world_controlnet(checkpoint: str) -> str | None:
    """The sketch ControlNet cached beside the world checkpoint at ``checkpoint`` and trained on it, or None (none
    trained, or trained on another world model)."""
    path = controlnet_path(checkpoint)
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        base = (f.metadata() or {}).get(BASE_KEY)
    return path if base == world_model.checkpoint_identity(checkpoint) else None


def build_world_controlnet(
    checkpoint: str, path: str, settings: ControlSettings = ControlSettings(), report: Callable[[str], None] = print
) -> dict:
    """Train the sketch ControlNet of the world checkpoint at ``checkpoint`` and write it to ``path`` (fp16, stamped
    with the checkpoint's identity); returns what was measured."""
    torch.manual_seed(settings.seed)
    model, clip, vae = world_model.load_world_model(checkpoint)
    state, info = train_controlnet(model, clip, vae, settings, report)
    metadata = {"mixofshow.devkit": "world sketch controlnet", BASE_KEY: world_model.checkpoint_identity(checkpoint)}
    metadata["mixofshow.world_control"] = json.dumps(info)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    comfy.utils.save_torch_file(state, partial, metadata=metadata)
    os.replace(partial, path)
    report(f"sketch controlnet written to {path} ({info['seconds'] / 60:.1f} min)")
    return info


def load_world_controlnet(path: str) -> comfy.controlnet.ControlNet:
    """The ControlNet at ``path`` through ComfyUI's own loader (what core ControlNetLoader runs); refuses a file it
    does not load as an SD1.x ControlNet."""
    control = comfy.controlnet.load_controlnet(path)
    if not isinstance(control, comfy.controlnet.ControlNet):
        raise RuntimeError(f"{path}: ComfyUI did not load it as a ControlNet ({type(control).__name__})")
    return control


def apply_control(positive, negative, control, layout: torch.Tensor, strength: float = 1.0, end: float = 1.0):
    """``(positive, negative)`` with ``control`` applied to both for the IMAGE ``layout`` ``[1, H, W, 3]`` (a hint,
    light on black) from the first step until ``end`` of the schedule, by core ControlNetApplyAdvanced itself."""
    import nodes as comfy_nodes  # ComfyUI's core nodes (after setup_comfy)

    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, layout, strength, 0.0, end)[:2]
