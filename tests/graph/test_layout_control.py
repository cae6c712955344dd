"""Layout preprocessors (controlnet_aux) and per-region adapter strength with a real ControlNet on the tiny model."""

from __future__ import annotations

import comfy.controlnet
import comfy.model_management
import comfy.ops
import pytest
import torch
from comfy.cldm.cldm import ControlNet

from mixofshow.devkit.models import TINY_UNET, init_weights
from mixofshow.nodes.regional import LayoutImage, RegionalControlStrengthNode
from mixofshow.regional.spec import RegionError


def square_image(height=96, width=128):
    image = torch.zeros(1, height, width, 3)
    image[:, 24:72, 32:96] = 1.0
    return image


def layout(image, method, annotator_dir=""):
    return LayoutImage.execute(
        image=image, method=method, low_threshold=100, high_threshold=200, annotator_dir=annotator_dir
    ).args[0]


def test_layout_methods_without_weights(tmp_path):
    image = square_image()
    canny = layout(image, "canny")
    assert canny.shape == image.shape
    assert canny[0, 22:26, 40:90].amax(dim=0).mean() > 0.5 and canny[0, 40:56, 50:80].max() < 0.1, (
        "edges on the border, none inside"
    )
    noisy = (image + 0.3 * torch.rand(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    lineart = layout(noisy, "lineart_standard")
    assert lineart.shape == image.shape and lineart.max() > 0
    drawing = 1.0 - image  # dark square on white paper
    sketch = layout(drawing, "sketch")
    assert torch.allclose(sketch, image, atol=1e-6), "a drawing on white becomes white-on-black"
    with pytest.raises(RegionError, match="openpose needs the annotator weights body_pose_model.pth"):
        layout(image, "openpose", annotator_dir=str(tmp_path))


def tiny_controlnet():
    config = {k: v for k, v in TINY_UNET.items() if k != "out_channels"}
    config.update(
        hint_channels=3,
        dtype=torch.float32,
        operations=comfy.ops.disable_weight_init,
        transformer_depth=list(TINY_UNET["transformer_depth"]),
    )
    model = init_weights(ControlNet(**config), seed=9, std=0.05)
    return comfy.controlnet.ControlNet(model, load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None)


def test_region_adapter_strength_with_a_real_controlnet(tiny, comfy_nodes):
    model, clip, _ = tiny
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a house")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    hint = layout(square_image(128, 128), "canny")
    controlled = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, tiny_controlnet(), hint, 0.8, 0.0, 1.0
    )
    latent = comfy_nodes.EmptyLatentImage().generate(128, 128, 1)[0]

    def run(m, pos, neg):
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(m, 4, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    def strength(text):
        return RegionalControlStrengthNode.execute(
            model=model, region_weights=text, width=128, height=128, base_strength=0.8
        ).args[0]

    without = run(model, positive, negative)
    with_control = run(model, *controlled)
    assert not torch.allclose(without, with_control), "the ControlNet must act"
    assert torch.allclose(run(strength("[0, 0, 128, 128]-0.0"), *controlled), without, rtol=1e-5, atol=1e-4)
    assert torch.allclose(run(strength("[0, 0, 128, 128]-0.8"), *controlled), with_control, rtol=1e-5, atol=1e-4)
    half = run(strength("[0, 0, 64, 128]-0.0"), *controlled)
    assert not torch.allclose(half, without) and not torch.allclose(half, with_control)


def test_regional_sampling_with_a_t2i_adapter_on_full_sd15(sd15, comfy_nodes):
    import comfy.controlnet
    import comfy.t2i_adapter.adapter

    from mixofshow.nodes.regional import RegionalConditioning, RegionNode

    model, clip = sd15
    adapter = init_weights(
        comfy.t2i_adapter.adapter.Adapter(cin=64, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1, sk=True, use_conv=False),
        seed=11,
        std=0.05,
    )
    t2i = comfy.controlnet.load_t2i_adapter(adapter.state_dict())
    assert isinstance(t2i, comfy.controlnet.T2IAdapter), "core's loader recognises the sketch-adapter layout"
    regions = RegionNode.execute(
        prompt="a red car", negative="blurry", top=0.0, left=0.0, bottom=1.0, right=0.5, mask=None, regions=None
    ).args[0]
    regional_model, positive, negative = RegionalConditioning.execute(
        model=model, clip=clip, prompt="a street", negative="lowres", regions=regions
    ).args
    sketch = layout(1.0 - square_image(64, 64), "sketch")
    controlled = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, t2i, sketch, 0.8, 0.0, 1.0)
    latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.inference_mode():
        with_adapter = comfy_nodes.common_ksampler(regional_model, 2, 1, 5.0, "euler", "normal", *controlled, latent)[0][
            "samples"
        ]
        without = comfy_nodes.common_ksampler(regional_model, 2, 1, 5.0, "euler", "normal", positive, negative, latent)[0][
            "samples"
        ]
    assert torch.isfinite(with_adapter).all() and not torch.allclose(with_adapter, without)


def test_openpose_runs_from_local_weights(tmp_path):
    """With weights present (random here; nothing can be downloaded), openpose loads them from the folder and runs."""
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.hand import handpose_model

    torch.manual_seed(0)
    for model, name in ((bodypose_model(), "body_pose_model.pth"), (handpose_model(), "hand_pose_model.pth")):
        torch.save({".".join(k.split(".")[1:]): v for k, v in model.state_dict().items()}, tmp_path / name)
    torch.save(FaceNet().state_dict(), tmp_path / "facenet.pth")
    pose = layout(square_image(96, 128), "openpose", annotator_dir=str(tmp_path))
    assert pose.shape == (1, 96, 128, 3) and torch.isfinite(pose).all()


def test_openpose_refuses_annotator_files_that_carry_code(tmp_path, monkeypatch):
    """The library loads the annotator files with a plain torch.load; the pack reads them weights-only first."""
    import pickle

    from mixofshow.edlora.errors import ModelFileError

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    for name in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(Evil(), f)
    ran = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: ran.append(a))
    with pytest.raises(ModelFileError, match=r"Refused to load 'body_pose_model.pth'.*run arbitrary code"):
        layout(square_image(), "openpose", annotator_dir=str(tmp_path))
    assert ran == [], "nothing from the file ran"


def test_the_world_sketch_controlnet_starts_as_no_change_trains_and_core_loads_it(small_model, tmp_path, comfy_nodes):
    """The small world's sketch ControlNet recipe (devkit.world_control) on the small SD1.x model (the world model's
    layout, random weights; core's loader detects no ControlNet for the tiny one): built from the UNet it adds exactly
    nothing; a few steps leave the UNet untouched and make residuals that change the sample; the file it writes is
    what core ControlNetLoader's loader reads as an SD1.x ControlNet."""
    import comfy.utils

    from mixofshow.devkit import world, world_control, world_model

    model, clip, vae = small_model
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fresh = world_control.controlnet_for(unet, model.model.model_config.unet_config, seed=1)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    scene = world.Scene("grey", (world.Thing("square", "red", position="left", size=0.4),))
    hint = world_control.hints_of([scene], 64)
    with torch.no_grad():
        residuals = fresh(x=x, hint=hint, timesteps=t, context=context)
        assert all(not r.any() for r in residuals["output"] + residuals["middle"]), "a new ControlNet adds nothing"
        assert torch.equal(unet(x, t, context=context, control=residuals), unet(x, t, context=context))

    settings = world_control.ControlSettings(image_size=64, scenes=4, steps=3, batch=2, warmup=1, lr=1e-3)
    state, info = world_control.train_controlnet(model, clip, vae, settings, report=lambda line: None)
    assert len(info["losses"]) == 1 and all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(p.requires_grad for p in unet.parameters()), "the UNet's parameters are given back as they were"
    path = str(tmp_path / "sketch_control.safetensors")
    comfy.utils.save_torch_file(state, path)
    control = world_control.load_world_controlnet(path)
    assert isinstance(control.control_model, ControlNet)

    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a red square on the left")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    controlled = world_control.apply_control(positive, negative, control, hint.permute(0, 2, 3, 1), 1.0)
    plain = world_model.sample(model, clip, vae, positive, negative=negative, steps=3, size=64)
    steered = world_model.sample(model, clip, vae, controlled[0], negative=controlled[1], steps=3, size=64)
    assert plain.shape == steered.shape == (64, 64, 3) and not torch.equal(plain, steered)
