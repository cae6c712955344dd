"""The pack in a real headless ComfyUI: it loads, its nodes are listed, the shipped workflows run."""

from __future__ import annotations

import glob
import json
import os

import pytest

from mixofshow.devkit.server import TEST_CHECKPOINT as DEMO_CKPT
from mixofshow.devkit.server import TEST_SDXL_CHECKPOINT as SDXL_CKPT
from mixofshow.devkit.server import ComfyServerError, load_workflow, set_inputs

PACK_NODES = {
    "MoSEDLoRALoader",
    "MoSTextEncode",
    "MoSConvertEDLoRA",
    "MoSEDLoRAStack",
    "MoSGradientFusion",
    "MoSWeightFusion",
    "MoSSaveFused",
    "MoSLoadFused",
    "MoSLoadTrainingImages",
    "MoSTrainEDLoRA",
    "MoSLoRAConcept",
    "MoSExportFusedLoRA",
}
WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows")


def single_concept_prompt(text=None):
    prompt = load_workflow("edlora_single_concept")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(prompt, "EmptyLatentImage", width=128, height=192)
    set_inputs(prompt, "KSampler", steps=3)
    if text is not None:
        set_inputs(prompt, "MoSTextEncode", text=text)
    return prompt


def test_pack_imports_without_failure_and_registers_the_folder(server, object_info):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, server.log_tail()
    assert "custom_nodes/mixofshow" in log
    assert PACK_NODES <= set(object_info)
    loader = object_info["MoSEDLoRALoader"]
    assert loader["category"] == "mixofshow/edlora"
    assert set(loader["input"]["required"]["edlora_name"][1]["options"]) >= {"edlora_potter.pth", "edlora_hermione.safetensors"}
    assert loader["output"] == ["MODEL", "CLIP", "MOS_CONCEPTS"]
    assert server.get("/models/edloras") == sorted(server.get("/models/edloras"))
    for node_id in PACK_NODES:
        assert object_info[node_id]["description"], f"{node_id} needs a description"


def test_every_node_has_a_help_page(object_info):
    ours = sorted(n for n in object_info if n.startswith("MoS"))
    assert len(ours) == 17
    docs = os.path.join(os.path.dirname(WORKFLOWS), "web", "docs")
    assert [n for n in ours if not os.path.isfile(os.path.join(docs, f"{n}.md"))] == []
    assert all(object_info[n]["category"].startswith("mixofshow/") for n in ours)


def test_every_ui_workflow_has_an_api_twin_with_the_same_nodes():
    """What the UI files hold is checked in the real frontend (tests/browser); here only that the twins pair up."""
    ui_files = glob.glob(os.path.join(WORKFLOWS, "*.json"))
    assert len(ui_files) == 7, "workflows/ ships the seven UI-format workflows"
    for path in ui_files:
        with open(path) as f:
            workflow = json.load(f)
        api_twin = os.path.join(WORKFLOWS, "api", os.path.basename(path))
        assert os.path.exists(api_twin), f"{os.path.basename(path)} needs an API-format twin"
        with open(api_twin) as f:
            api = json.load(f)
        ui_types = sorted(n["type"] for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote"))
        assert ui_types == sorted(n["class_type"] for n in api.values())


def test_browse_templates_lists_only_ui_workflows(server):
    templates = server.get("/workflow_templates")["mixofshow"]
    assert sorted(templates) == [
        "edlora_single_concept",
        "fuse_loras_regional",
        "gradient_fusion_three_concepts",
        "regional_three_concepts_sketch",
        "sdxl_edlora_single_concept",
        "sdxl_fuse_loras_regional",
        "train_edlora_from_folder",
    ]
    for name in templates:
        workflow = json.loads(server.get_bytes(f"/api/workflow_templates/mixofshow/{name}.json"))
        assert "nodes" in workflow and "links" in workflow, f"{name} must be a UI-format workflow"


def test_shipped_single_concept_workflow_renders_an_image(server):
    entry = server.run(single_concept_prompt())
    images = server.image_files(entry)
    assert len(images) == 1 and os.path.getsize(images[0]) > 1000
    with open(images[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    name = os.path.basename(images[0])
    png = server.get_bytes(f"/view?filename={name}&subfolder=mixofshow&type=output")
    assert png[:4] == b"\x89PNG"
    assert "Loaded ED-LoRA edlora_potter.pth" in server.log_text()


def test_two_chained_edloras_over_the_api(server):
    prompt = single_concept_prompt("<potter1> <potter2> and <hermione1> <hermione2> in the hall")
    prompt["20"] = {
        "class_type": "MoSEDLoRALoader",
        "inputs": {
            "model": ["2", 0],
            "clip": ["2", 1],
            "concepts": ["2", 2],
            "edlora_name": "edlora_hermione.safetensors",
            "unet_strength": 0.7,
            "text_encoder_strength": 0.7,
        },
    }
    prompt["3"]["inputs"].update(clip=["20", 1], concepts=["20", 2])
    prompt["4"]["inputs"].update(clip=["20", 1])
    prompt["6"]["inputs"].update(model=["20", 0])
    assert len(server.image_files(server.run(prompt))) == 1


def test_unknown_concept_word_fails_with_its_name(server):
    with pytest.raises(ComfyServerError, match=r"Unknown concept word <ron1>"):
        server.run(single_concept_prompt("a <ron1> <potter2>"))


def test_missing_file_is_an_error_naming_it(server):
    prompt = single_concept_prompt()
    set_inputs(prompt, "MoSEDLoRALoader", edlora_name="not_there.pth")
    with pytest.raises(ComfyServerError, match=r"edlora_name: 'not_there.pth' is not a file in models/edloras"):
        server.run(prompt)


def test_shipped_fusion_workflow_fuses_saves_and_samples(server):
    prompt = load_workflow("gradient_fusion_three_concepts")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(
        prompt,
        "MoSGradientFusion",
        text_encoder_iters=5,
        unet_iters=3,
        sample_steps=2,
        sample_resolution=128,
        measure_drift=False,
    )
    set_inputs(prompt, "EmptyLatentImage", width=192, height=128)
    set_inputs(prompt, "KSampler", steps=2)
    entry = server.run(prompt)
    assert len(server.image_files(entry)) == 1
    report = " ".join(entry["outputs"]["5"]["text"])
    assert "cross_attention_kv: 32 layers" in report and "<thanos1> <thanos2>" in report
    saved = os.path.join(server.base_dir, "models", "mixofshow_fused", "potter+hermione+thanos.safetensors")
    assert os.path.getsize(saved) > 0

    reload = load_workflow("edlora_single_concept")
    set_inputs(reload, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(reload, "EmptyLatentImage", width=128, height=128)
    set_inputs(reload, "KSampler", steps=2)
    reload["2"] = {
        "class_type": "MoSLoadFused",
        "inputs": {"model": ["1", 0], "clip": ["1", 1], "fused_name": "potter+hermione+thanos.safetensors"},
    }
    reload["3"]["inputs"]["text"] = "<thanos1> <thanos2> and <potter1> <potter2>"
    assert len(server.image_files(server.run(reload))) == 1


def test_shipped_regional_workflow_with_sketch_layout(server):
    fusion = load_workflow("gradient_fusion_three_concepts")
    set_inputs(fusion, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(fusion, "MoSGradientFusion", solver="exact", sample_steps=1, sample_resolution=128, measure_drift=False)
    set_inputs(fusion, "MoSSaveFused", filename="regional_test_fused")
    for node in ("7", "8", "9", "10", "11", "12"):
        del fusion[node]
    server.run(fusion)

    prompt = load_workflow("regional_three_concepts_sketch")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(prompt, "MoSLoadFused", fused_name="regional_test_fused.safetensors")
    set_inputs(prompt, "ControlNetLoader", control_net_name="test_sketch_control.safetensors")
    set_inputs(prompt, "EmptyLatentImage", width=192, height=96)
    set_inputs(prompt, "KSampler", steps=2)
    entry = server.run(prompt)
    images = server.image_files(entry)
    assert len(images) == 1
    from PIL import Image

    assert Image.open(images[0]).size == (192, 96)


def test_shipped_training_workflow_trains_saves_and_samples(server):
    prompt = load_workflow("train_edlora_from_folder")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(prompt, "MoSLoadTrainingImages", resolution=128)
    set_inputs(prompt, "MoSTrainEDLoRA", resolution=128, steps=2, filename="server_trained", save_pth=True)
    set_inputs(prompt, "EmptyLatentImage", width=128, height=128)
    set_inputs(prompt, "KSampler", steps=2)
    entry = server.run(prompt)
    assert len(server.image_files(entry)) == 1
    report = " ".join(entry["outputs"]["3"]["text"])
    assert "Trained <name1> <name2> for 2 steps" in report and "<name1> <name2> on a purple wall" in report
    assert "MoS Train ED-LoRA: step 2/2" in server.log_text()
    assert "MoS Load Training Images: 3 images" in server.log_text()
    folder = os.path.join(server.base_dir, "models", "edloras")
    assert {"server_trained.safetensors", "server_trained.pth"} <= set(os.listdir(folder))
    assert "server_trained.safetensors" in server.get("/models/edloras")

    reload = single_concept_prompt("a photo of <name1> <name2> in the garden")
    set_inputs(reload, "MoSEDLoRALoader", edlora_name="server_trained.pth")
    assert len(server.image_files(server.run(reload))) == 1


def test_shipped_lora_workflow_fuses_three_loras_and_samples_one_per_region(server):
    prompt = load_workflow("fuse_loras_regional")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=DEMO_CKPT)
    set_inputs(prompt, "MoSGradientFusion", solver="exact", sample_steps=1, sample_resolution=64, measure_drift=False)
    set_inputs(prompt, "MoSRegionsFromText", width=192, height=64)
    set_inputs(prompt, "EmptyLatentImage", width=192, height=64)
    set_inputs(prompt, "KSampler", steps=2)
    text = prompt["6"]["inputs"]["text"]
    prompt["6"]["inputs"]["text"] = (
        text.replace("[0, 0, 512, 330]", "[0, 0, 64, 62]")
        .replace("[0, 347, 512, 677]", "[0, 65, 64, 126]")
        .replace("[0, 694, 512, 1024]", "[0, 130, 64, 192]")
    )
    entry = server.run(prompt)
    images = server.image_files(entry)
    assert len(images) == 1
    from PIL import Image

    assert Image.open(images[0]).size == (192, 64)
    shown = " ".join(entry["outputs"]["2"]["text"])
    assert "photo of hatsune miku, twintails, aqua hair" in shown


def test_shipped_sdxl_single_concept_workflow_renders_an_image(server):
    prompt = load_workflow("sdxl_edlora_single_concept")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=SDXL_CKPT)
    set_inputs(prompt, "EmptyLatentImage", width=128, height=192)
    set_inputs(prompt, "KSampler", steps=2)
    entry = server.run(prompt)
    images = server.image_files(entry)
    assert len(images) == 1
    from PIL import Image

    assert Image.open(images[0]).size == (128, 192)
    assert "Loaded ED-LoRA edlora_sdxl_lin.safetensors" in server.log_text()
    assert "Requested to load SDXL" in server.log_text(), "core Load Checkpoint detected SDXL"


def test_an_sd1_edlora_on_the_sdxl_checkpoint_is_refused_by_name(server):
    prompt = load_workflow("sdxl_edlora_single_concept")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=SDXL_CKPT)
    set_inputs(prompt, "MoSEDLoRALoader", edlora_name="edlora_hermione.safetensors")
    with pytest.raises(
        ComfyServerError, match=r"'edlora_hermione.safetensors' is an SD1.x ED-LoRA .* but the connected model is SDXL"
    ):
        server.run(prompt)


def test_shipped_sdxl_fusion_and_regional_workflow(server):
    prompt = load_workflow("sdxl_fuse_loras_regional")
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=SDXL_CKPT)
    # full-size CLIP-G on a 2-core CPU: one prompt per concept, and a small statistics budget so most layers are
    # weight-fused (statistics on SDXL are tested in-process on the tiny SDXL); the graph is the shipped one
    set_inputs(
        prompt,
        "MoSGradientFusion",
        solver="exact",
        sample_steps=1,
        sample_resolution=64,
        measure_drift=False,
        statistics_memory_gb=0.05,
    )
    prompt["2"]["inputs"]["prompts"] = "photo of hatsune miku"
    prompt["3"]["inputs"]["prompts"] = "photo of asuka langley"
    set_inputs(prompt, "MoSEDLoRAStack", prompts="a photo of <lin1> <lin2>")
    set_inputs(prompt, "MoSRegionsFromText", width=192, height=64)
    set_inputs(prompt, "EmptyLatentImage", width=192, height=64)
    set_inputs(prompt, "KSampler", steps=2)
    text = prompt["6"]["inputs"]["text"]
    prompt["6"]["inputs"]["text"] = (
        text.replace("[0, 0, 768, 496]", "[0, 0, 64, 62]")
        .replace("[0, 520, 768, 1016]", "[0, 65, 64, 126]")
        .replace("[0, 1040, 768, 1536]", "[0, 130, 64, 192]")
    )
    entry = server.run(prompt)
    images = server.image_files(entry)
    assert len(images) == 1
    from PIL import Image

    assert Image.open(images[0]).size == (192, 64)
    report = " ".join(entry["outputs"]["5"]["text"])
    methods = report.split("layers by method: ")[1].split("\n")[0]
    assert sum(int(part.split()[0]) for part in methods.split(", ")) == 736, "all SDXL attention layers are fused"
    assert "text_encoder:" in report, "the text encoders' layers that fit the budget are fused from statistics"
