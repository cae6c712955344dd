"""Deterministic random-weight SD1.x models and ED-LoRAs that fit them.

* :func:`tiny_sd1` — an SD1.x-shaped model small enough for milliseconds per step: the same block layout as
  SD1.5 (4 levels, 2 res blocks, attention on the first three levels, so 16 cross-attention layers and the
  SD1.5 diffusers module names) at 32 channels, a 2-layer 64-wide CLIP with the real SD1 tokenizer, and a
  small VAE.
* :func:`sd15_unet` / :func:`clip_l` — the full SD1.5 UNet and CLIP-L shapes with random weights, for key
  maps and module counts.
* :func:`small_sd1` + :func:`write_checkpoint` — a checkpoint that ComfyUI's CheckpointLoaderSimple detects as
  SD1.5: SD1.5's block layout at 320 channels on every level, full CLIP-L and full VAE (fp16).
* :func:`make_edlora` — an ED-LoRA for any of these, with LoRA on every attention projection.

Call :func:`devkit.bootstrap.setup_comfy` before importing this module.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import torch

TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 64}
SD15_UNET = dict(
    use_checkpoint=False,
    image_size=32,
    out_channels=4,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    in_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_linear_in_transformer=False,
    context_dim=768,
    num_heads=8,
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
SMALL_SD1_UNET = {**SD15_UNET, "channel_mult": [1, 1, 1, 1]}
TINY_UNET = {**SD15_UNET, "model_channels": 32, "channel_mult": [1, 1, 1, 1], "context_dim": 64, "num_heads": 2}
#: SDXL's block structure (70 cross-attention blocks in 11 spatial transformers, both text encoders, ADM) at tiny
#: widths: CLIP-L 64 + CLIP-G 96 wide (context 160), pooled 96 + 6 x 256 size embeddings.
TINY_CLIP_G = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 96,
}
SDXL_UNET = dict(
    use_checkpoint=False,
    image_size=32,
    out_channels=4,
    use_spatial_transformer=True,
    legacy=False,
    num_classes="sequential",
    adm_in_channels=2816,
    in_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    channel_mult=[1, 2, 4],
    transformer_depth_middle=10,
    use_linear_in_transformer=True,
    context_dim=2048,
    num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
TINY_SDXL_UNET = {
    **SDXL_UNET,
    "model_channels": 32,
    "channel_mult": [1, 1, 1],
    "context_dim": 160,
    "adm_in_channels": 96 + 1536,
    "num_head_channels": 16,
}
#: the small SDXL that CheckpointLoaderSimple detects as SDXL: SDXL's layout at 320 channels on every level, full CLIPs
SMALL_SDXL_UNET = {**SDXL_UNET, "channel_mult": [1, 1, 1]}
TINY_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SD_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Deterministic init: N(0, std) matrices, unit norms, zero biases (ComfyUI's ops skip initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        elif name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    return module


class _TinySD15(comfy.supported_models.SD15):
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}


def _patcher(base) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device()
    )


def _unet(config_cls, unet_config: dict, seed: int, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    config = config_cls(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({})
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


def _random_clip(tokenizer, text_model, seed: int, **configs) -> comfy.sd.CLIP:
    """A float32 CLIP of ComfyUI's ``text_model`` class with deterministic random weights; ``configs`` override the
    encoders' sizes (``clip_l_model_config=...``)."""
    target = comfy.supported_models_base.ClipTarget(tokenizer, text_model)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, **configs})
    init_weights(clip.cond_stage_model, seed)
    # a real CLIP's token embeddings are much larger than its other weights; keep that ratio
    with torch.no_grad():
        for name, param in clip.cond_stage_model.named_parameters():
            if name.endswith("token_embedding.weight"):
                param.mul_(5.0)
    return clip


def _clip(seed: int, clip_config: dict | None) -> comfy.sd.CLIP:
    configs = {"clip_l_model_config": clip_config} if clip_config is not None else {}
    return _random_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, seed, **configs)


def _vae(seed: int, ddconfig: dict) -> comfy.sd.VAE:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"ddconfig": ddconfig, "embed_dim": 4}}
    module = init_weights(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed)
    return comfy.sd.VAE(sd=module.state_dict(), config=config)


def tiny_sd1(seed: int = 0, unet_dtype: torch.dtype = torch.float32, channels: int = 32):
    """``(MODEL, CLIP, VAE)``: a tiny SD1.x-shaped model (16 cross-attention layers), deterministic per seed.

    At 32 channels every GroupNorm group holds one channel, so the deepest level needs at least 2x2 cells (images
    of 128 px and more); ``channels=64`` also runs the 64 px images SD1.5 itself accepts."""
    unet = {**TINY_UNET, "model_channels": channels}
    return _unet(_TinySD15, unet, seed + 1, unet_dtype), _clip(seed + 2, TINY_CLIP), _vae(seed + 3, TINY_VAE)


class _TinySDXL(comfy.supported_models.SDXL):
    unet_config = {**comfy.supported_models.SDXL.unet_config, "context_dim": 160, "adm_in_channels": 96 + 1536}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


def _sdxl_clip(seed: int, tiny: bool) -> comfy.sd.CLIP:
    import comfy.sdxl_clip

    configs = {}
    if tiny:
        # SDXL reads the penultimate layer of both encoders, so each needs at least three
        configs = dict(clip_l_model_config={**TINY_CLIP, "num_hidden_layers": 3}, clip_g_model_config=TINY_CLIP_G)
    return _random_clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel, seed, **configs)


def tiny_sdxl(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` with SDXL's block structure at tiny widths (70 cross-attention blocks in 11 spatial
    transformers, CLIP-L + CLIP-G, pooled output and size conditioning through ADM), deterministic per seed."""
    return _unet(_TinySDXL, TINY_SDXL_UNET, seed + 1), _sdxl_clip(seed + 2, tiny=True), _vae(seed + 3, TINY_VAE)


def small_sdxl(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` that CheckpointLoaderSimple detects as SDXL: SDXL's layout at 320 channels on every level,
    full CLIP-L and CLIP-G, the full VAE."""
    return _unet(comfy.supported_models.SDXL, SMALL_SDXL_UNET, seed + 1), _sdxl_clip(seed + 2, tiny=False), _vae(seed + 3, SD_VAE)


def sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The full SDXL base UNet (2.6 B parameters) with random weights (benchmarks; too large for the tests)."""
    return _unet(comfy.supported_models.SDXL, SDXL_UNET, seed + 1, dtype)


def sdxl_clip(seed: int = 0) -> comfy.sd.CLIP:
    """Full-size SDXL text encoders (CLIP-L and OpenCLIP bigG) with random weights."""
    return _sdxl_clip(seed + 2, tiny=False)


def sdxl_unet_meta():
    """The full SDXL UNet (2.6 B parameters) on the meta device: every key and shape, no memory."""
    with torch.device("meta"):
        config = comfy.supported_models.SDXL(dict(SDXL_UNET))
        config.set_inference_dtype(torch.float16, None)
        base = config.get_model({}, device=torch.device("meta"))
    return _patcher(base)


def sd15_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The full SD1.5 UNet (860 M parameters) with random weights."""
    return _unet(comfy.supported_models.SD15, SD15_UNET, seed + 1, dtype)


def clip_l(seed: int = 0) -> comfy.sd.CLIP:
    """A full-size SD1.x CLIP-L text encoder with random weights."""
    return _clip(seed + 2, None)


def small_sd1(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` that CheckpointLoaderSimple detects as SD1.5: SD1.5's layout at 320 channels on every
    level (16 cross-attention layers, SD1.5 module names), full CLIP-L and the full SD VAE."""
    return _unet(comfy.supported_models.SD15, SMALL_SD1_UNET, seed + 1), _clip(seed + 2, None), _vae(seed + 3, SD_VAE)


def write_checkpoint(path: str, model, clip, vae) -> str:
    """Save MODEL/CLIP/VAE as one fp16 checkpoint in the layout checkpoint loaders read."""
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, path, metadata={"mixofshow.devkit": "random weights, for tests and the demo"})
    return path


# ------------------------------------------------------------------------------------------------ ED-LoRAs


def make_edlora(
    model,
    clip,
    words=("<demo1>", "<demo2>"),
    seed: int = 0,
    rank: int = 4,
    layers: int | None = None,
    lora_scale: float = 0.05,
    name: str = "<memory>",
    identical_layers: bool = False,
):
    """An ED-LoRA with LoRA on every attention projection of ``model`` and ``clip`` and random embeddings.

    ``layers`` defaults to the model's (16 for SD1.x, 11 for SDXL); ``identical_layers`` repeats one vector over all
    layers (the single-vector special case).
    """
    from mixofshow.edlora.apply import text_embedding_width
    from mixofshow.edlora.arch import cross_attention_sites, text_encoder_widths
    from mixofshow.edlora.format import EDLoRA, LoRAPair
    from mixofshow.edlora.targets import text_attention_targets, unet_attention_targets

    generator = torch.Generator().manual_seed(seed)
    width = text_embedding_width(clip)
    units = (
        list(dict.fromkeys(site.unit for site in cross_attention_sites(model.get_model_object("diffusion_model"))))
        if model
        else []
    )
    layers = layers if layers is not None else (len(units) or 16)
    embeddings = {}
    for word in words:
        if identical_layers:
            vec = torch.randn(1, width, generator=generator) * 0.4
            embeddings[word] = vec.repeat(layers, 1)
        else:
            embeddings[word] = torch.randn(layers, width, generator=generator) * 0.4

    def pairs(targets):
        out = {}
        for target in targets:
            out_f, in_f = target.shape[:2]
            down = torch.randn(rank, in_f, generator=generator) * lora_scale
            up = torch.randn(out_f, rank, generator=generator) * lora_scale
            out[target.name] = LoRAPair(down=down, up=up)
        return out

    return EDLoRA(
        embeddings=embeddings,
        unet=pairs(unet_attention_targets(model)) if model is not None else {},
        text_encoder=pairs(text_attention_targets(clip)),
        name=name,
        encoders=text_encoder_widths(clip),
        layer_map=units if len(units) == layers else [],
    )


def write_controlnet(path: str, seed: int = 0) -> str:
    """A ControlNet (random weights, 3-channel hint) for the :func:`small_sd1` layout that ControlNetLoader loads."""
    from comfy.cldm.cldm import ControlNet

    config = {k: v for k, v in SMALL_SD1_UNET.items() if k != "out_channels"}
    config.update(hint_channels=3, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    control = init_weights(ControlNet(**config), seed)
    sd = {f"control_model.{k}": v.to(torch.float16).contiguous() for k, v in control.state_dict().items()}
    comfy.utils.save_torch_file(sd, path, metadata={"mixofshow.devkit": "random-weight ControlNet for the small SD1 layout"})
    return path
