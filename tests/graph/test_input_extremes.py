"""Every numeric input of every MoS node, at its declared minimum and maximum, is a value the node really accepts.

Each extreme must pass the node's own validation (what ComfyUI runs when a prompt is queued) and then run on a tiny
model: to the end where the value shapes the result (strengths, seeds, thresholds, ranks...), and until the long
work has started where the value only sets how much work there is (iterations, steps, sampling resolution): those
runs are stopped when they reach the heavy call, which proves every check before it passed. A few extremes are
unusable on their own by design (a box whose top is at the bottom edge); they must end in a named error.
"""

from __future__ import annotations

import os

import comfy.sample
import pytest
import torch
from comfy_api.latest import io

from mixofshow.devkit.models import make_edlora, tiny_sd1
from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
from mixofshow.edlora.errors import MixOfShowError
from mixofshow.edlora.format import save_edlora
from mixofshow.nodes import all_nodes
from mixofshow.regional.spec import Box, Region
from mixofshow.training import loop as training_loop


class HeavyWorkReached(Exception):
    """Raised by a patched heavy call: the node got past every check with this value."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import folder_paths

    with torch.inference_mode():
        model, clip, vae = tiny_sd1(seed=5, channels=64)
    root = tmp_path_factory.mktemp("extremes")
    for sub in ("edloras", "loras", "mixofshow_fused", "input"):
        (root / sub).mkdir()
    from mixofshow.devkit.loras import write_lora

    write_lora(str(root / "loras" / "lx.safetensors"), model, clip, scope="attention", seed=3)
    save_edlora(make_edlora(model, clip, words=("<ex1>", "<ex2>"), seed=1, name="ex.pth"), str(root / "edloras" / "ex.pth"))
    save_edlora(make_edlora(model, clip, words=("<ey1>",), seed=2, name="ey.pth"), str(root / "edloras" / "ey.pth"))
    from PIL import Image

    folder = root / "input" / "concept"
    folder.mkdir()
    for i in range(2):  # as large as the largest resolution the loader offers: smaller images are refused
        Image.new("RGB", (2048, 2048), (40 * i + 60, 90, 200)).save(folder / f"p{i}.png")
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("edloras", "loras", "mixofshow_fused")}
    folder_paths.folder_names_and_paths["edloras"] = ([str(root / "edloras")], {".pth", ".safetensors"})
    folder_paths.folder_names_and_paths["loras"] = ([str(root / "loras")], {".safetensors"})
    folder_paths.folder_names_and_paths["mixofshow_fused"] = ([str(root / "mixofshow_fused")], {".safetensors"})
    input_dir = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.filename_list_cache.clear()
    from mixofshow.edlora.format import load_edlora

    # two concepts: per-concept seeds are derived from the seed input (the maximum seed once overflowed there)
    concepts = ConceptSet().add(ConceptEntry(load_edlora(str(root / "edloras" / "ex.pth")), 0.7, 0.7))
    concepts = concepts.add(ConceptEntry(load_edlora(str(root / "edloras" / "ey.pth")), 0.7, 0.7))
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    from mixofshow.fusion.procedure import weight_fusion

    with torch.inference_mode():
        fused = weight_fusion(model, clip, concepts, measure_drift=False)
    yield {"model": model, "clip": clip, "vae": vae, "concepts": concepts, "images": images, "root": root, "fused": fused}
    for key, value in saved.items():
        if value is None:
            folder_paths.folder_names_and_paths.pop(key, None)
        else:
            folder_paths.folder_names_and_paths[key] = value
    folder_paths.set_input_directory(input_dir)
    folder_paths.filename_list_cache.clear()


def base_inputs(node_id: str, world) -> dict:
    """Inputs that make each node run quickly on the tiny model; widgets not named here take their defaults."""
    model, clip, vae, concepts = world["model"], world["clip"], world["vae"], world["concepts"]
    region = (Region("a <ex1> <ex2>", box=Box(0.0, 0.0, 1.0, 0.5)),)
    return {
        "MoSEDLoRALoader": dict(model=model, clip=clip, edlora_name="ex.pth"),
        "MoSTextEncode": dict(clip=clip, text="a <ex1> <ex2>", concepts=concepts),
        "MoSConvertEDLoRA": dict(edlora_name="ex.pth", output_name="converted", overwrite=True),
        "MoSEDLoRAStack": dict(edlora_name="ex.pth"),
        "MoSLoRAConcept": dict(lora_name="lx.safetensors", prompts="photo of lx person"),
        "MoSExportFusedLoRA": dict(fused=world["fused"], model=model, clip=clip, filename="exported", overwrite=True),
        "MoSGradientFusion": dict(
            model=model, clip=clip, concepts=concepts, text_encoder_iters=2, unet_iters=2, sample_steps=1, sample_resolution=64
        ),
        "MoSWeightFusion": dict(model=model, clip=clip, concepts=concepts, measure_drift=False),
        "MoSSaveFused": None,  # no numeric inputs
        "MoSLoadFused": None,
        "MoSRegion": dict(prompt="a <ex1> <ex2>"),
        "MoSRegionsFromText": dict(text="[a <ex1> <ex2>]-*-[]-*-[]"),
        "MoSRegionalConditioning": dict(model=model, clip=clip, prompt="two things", regions=region, concepts=concepts),
        "MoSLayoutImage": dict(image=world["images"][:1], method="canny"),
        "MoSRegionalControlStrength": dict(model=model, region_weights="[0, 0, 8, 8]-0.5"),
        "MoSLoadTrainingImages": dict(folder="concept"),
        "MoSTrainEDLoRA": dict(
            model=model, clip=clip, vae=vae, images=world["images"], resolution=64, steps=1, filename="trained", overwrite=True
        ),
    }[node_id]


#: (node, input) -> the part of the run that is long work: the value is proven accepted when the run gets there.
HEAVY = {
    ("MoSGradientFusion", "text_encoder_iters"): "solver",
    ("MoSGradientFusion", "unet_iters"): "solver",
    ("MoSGradientFusion", "sample_steps"): "sample",
    ("MoSGradientFusion", "sample_resolution"): "sample",
    ("MoSTrainEDLoRA", "steps"): "train",
    ("MoSTrainEDLoRA", "resolution"): "encode",
}
#: (node, input, extreme) -> the named error a lone extreme must give: a box edge on the opposite border is empty.
UNUSABLE_ALONE = {
    ("MoSRegion", "top", "max"): "must satisfy 0 <= top < bottom",
    ("MoSRegion", "left", "max"): "must satisfy 0 <= top < bottom <= 1 and 0 <= left < right",
    ("MoSRegion", "bottom", "min"): "must satisfy 0 <= top < bottom",
    ("MoSRegion", "right", "min"): "must satisfy 0 <= top < bottom <= 1 and 0 <= left < right",
}


def numeric_extremes():
    for node in all_nodes():
        schema = node.define_schema()
        for spec in schema.inputs:
            if isinstance(spec, (io.Int.Input, io.Float.Input)):
                for which in ("min", "max"):
                    yield pytest.param(node, spec.id, which, id=f"{schema.node_id}.{spec.id}={which}")


def widget_defaults(node) -> dict:
    out = {}
    for spec in node.define_schema().inputs:
        if isinstance(spec, io.Combo.Input):
            out[spec.id] = spec.default if spec.default is not None else (spec.options[0] if spec.options else None)
        elif hasattr(spec, "default") and spec.default is not None:
            out[spec.id] = spec.default
    return out


@pytest.mark.parametrize(("node", "name", "which"), list(numeric_extremes()))
def test_declared_extremes_are_accepted(world, monkeypatch, node, name, which):
    schema = node.define_schema()
    spec = next(s for s in schema.inputs if s.id == name)
    value = getattr(spec, which)
    inputs = {**widget_defaults(node), **base_inputs(schema.node_id, world), name: value}
    if (schema.node_id, name) == ("MoSTrainEDLoRA", "resolution"):
        # images at least as large as any resolution (0: the model's own, 512): smaller ones are refused by design
        inputs["images"] = torch.rand(1, spec.max, spec.max, 3, generator=torch.Generator().manual_seed(0))
    assert node.validate_inputs(**{k: v for k, v in inputs.items() if not torch.is_tensor(v)}) is True

    heavy = HEAVY.get((schema.node_id, name))
    if heavy == "solver":
        from mixofshow.fusion import solvers

        def stop(*args, **kwargs):
            raise HeavyWorkReached

        monkeypatch.setattr(solvers, "solve_lbfgs", stop)
    elif heavy == "sample":
        monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: (_ for _ in ()).throw(HeavyWorkReached()))
    elif heavy == "encode":
        from mixofshow.nodes import train as train_node

        monkeypatch.setattr(train_node, "encode_training_latents", lambda *a, **k: (_ for _ in ()).throw(HeavyWorkReached()))
    elif heavy == "train":
        monkeypatch.setattr(training_loop._Session, "losses", lambda *a, **k: (_ for _ in ()).throw(HeavyWorkReached()))

    expected_error = UNUSABLE_ALONE.get((schema.node_id, name, which))
    try:
        with torch.inference_mode():
            output = node.execute(**inputs)
    except HeavyWorkReached:
        assert heavy is not None, "a heavy call was reached where none was patched"
        return
    except MixOfShowError as exc:
        assert expected_error is not None and expected_error in str(exc), f"{schema.node_id}.{name}={value!r}: {exc}"
        return
    assert expected_error is None, f"{schema.node_id}.{name}={value!r} should have been refused ({expected_error})"
    assert heavy is None, f"{schema.node_id}.{name}={value!r} never reached its long work"
    for result in output.args:
        if torch.is_tensor(result):
            assert torch.isfinite(result).all(), f"{schema.node_id}.{name}={value!r} produced non-finite output"
    if schema.node_id == "MoSTrainEDLoRA":
        assert os.path.exists(world["root"] / "edloras" / "trained.safetensors")
