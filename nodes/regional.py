"""Regional nodes: regions (mask, box or the original's text syntax), regional conditioning, layout images."""

from __future__ import annotations

import logging
import os

import comfy.patcher_extension
import folder_paths
from comfy_api.latest import io, ui

from ..regional.conditioning import regional_conditioning
from ..regional.control import RegionalControlStrength, parse_region_weights
from ..regional.layout import METHODS, layout_map
from ..regional.spec import Box, Region, parse_original_syntax
from .inputs import MoSNode
from .types import Concepts, Regions

log = logging.getLogger("mixofshow")


class RegionNode(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSRegion",
            display_name="MoS Region",
            category="mixofshow/regional",
            description=(
                "One region for MoS Regional Conditioning: its own prompt (may name ED-LoRA concepts) and negative "
                "prompt, where it applies (a MASK, or a box given as fractions of the image), chained to earlier regions."
            ),
            inputs=[
                io.String.Input(
                    "prompt",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="What this region shows, e.g. 'a <potter1> <potter2>, full body'.",
                ),
                io.String.Input(
                    "negative",
                    multiline=True,
                    default="",
                    tooltip="This region's own negative prompt (used in its unconditional half).",
                ),
                io.Float.Input(
                    "top",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Box top as a fraction of the image height (used without a mask).",
                ),
                io.Float.Input(
                    "left", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Box left as a fraction of the image width."
                ),
                io.Float.Input(
                    "bottom", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Box bottom as a fraction of the image height."
                ),
                io.Float.Input(
                    "right", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Box right as a fraction of the image width."
                ),
                io.Mask.Input("mask", optional=True, tooltip="Where the region applies (soft values blend); overrides the box."),
                Regions.Input("regions", optional=True, tooltip="Earlier regions to chain."),
            ],
            outputs=[Regions.Output(display_name="REGIONS")],
        )

    @classmethod
    def execute(cls, prompt, negative, top, left, bottom, right, mask=None, regions=None) -> io.NodeOutput:
        previous = tuple(regions or ())
        if mask is not None:
            mask = mask[0] if mask.dim() == 3 else mask
            region = Region(prompt, negative, mask=mask.detach().float().cpu())
        else:
            region = Region(prompt, negative, box=Box(top, left, bottom, right))
        region.validate(len(previous))
        return io.NodeOutput(previous + (region,))


class RegionsFromText(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSRegionsFromText",
            display_name="MoS Regions From Text",
            category="mixofshow/regional",
            description=(
                "Regions in the original Mix-of-Show syntax, so its examples paste in: "
                "'[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...' with pixel boxes (top, left, bottom, right) of a "
                "width x height image; '[]' is the whole image."
            ),
            inputs=[
                io.String.Input("text", multiline=True, tooltip="Regions separated by '|'."),
                io.Int.Input("width", default=1024, min=8, max=16384, step=8, tooltip="Width of the image the boxes refer to."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="Height of the image the boxes refer to."),
                Regions.Input("regions", optional=True, tooltip="Earlier regions to chain."),
            ],
            outputs=[Regions.Output(display_name="REGIONS")],
        )

    @classmethod
    def execute(cls, text, width, height, regions=None) -> io.NodeOutput:
        notes: list[str] = []
        parsed = parse_original_syntax(text, width, height, notes)
        for note in notes:
            log.warning("MoS Regions From Text: %s", note)
        summary = "\n".join([f"{len(parsed)} regions", *notes])
        return io.NodeOutput(tuple(regions or ()) + tuple(parsed), ui=ui.PreviewText(summary))


class RegionalConditioning(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSRegionalConditioning",
            display_name="MoS Regional Conditioning",
            category="mixofshow/regional",
            description=(
                "Mix-of-Show regionally controllable sampling: the global prompt is attended everywhere as usual; inside "
                "each region the queries attend to that region's own prompt (with its concepts' layer-wise embeddings); "
                "overlaps average; the unconditional half uses each region's own negative. Returns a MODEL with "
                "region-aware cross-attention and the global positive/negative for any KSampler; works with ControlNet "
                "and T2I-Adapter apply nodes and with other attention patches."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The (fused) model."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True, tooltip="The global (context) prompt."),
                io.String.Input("negative", multiline=True, default="", tooltip="The global negative prompt."),
                Regions.Input("regions", tooltip="From MoS Region or MoS Regions From Text."),
                Concepts.Input(
                    "concepts", optional=True, tooltip="CONCEPTS of the (fused) ED-LoRAs, for concept words in prompts."
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A clone with region-aware cross-attention."),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, negative, regions, concepts=None) -> io.NodeOutput:
        cls.require_supported(model, clip)
        return io.NodeOutput(*regional_conditioning(model, clip, prompt, negative, tuple(regions or ()), concepts))


class LayoutImage(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSLayoutImage",
            display_name="MoS Layout From Image",
            category="mixofshow/regional",
            description=(
                "Turns a picture into a layout for a T2I-Adapter or ControlNet (apply it with core ControlNet Apply): "
                "sketch (your drawing, dark lines on white or light on dark), canny and lineart_standard (controlnet_aux, "
                "no weights needed), or openpose (needs the annotator weights in a local folder)."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The picture or drawing."),
                io.Combo.Input("method", options=list(METHODS), default="sketch", tooltip="The preprocessor."),
                io.Int.Input("low_threshold", default=100, min=0, max=255, tooltip="Canny lower threshold."),
                io.Int.Input("high_threshold", default=200, min=0, max=255, tooltip="Canny upper threshold."),
                io.String.Input(
                    "annotator_dir",
                    default="",
                    tooltip="For openpose: a folder holding body_pose_model.pth, "
                    "hand_pose_model.pth and facenet.pth (empty: models/annotators).",
                ),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, image, method, low_threshold, high_threshold, annotator_dir) -> io.NodeOutput:
        directory = annotator_dir.strip() or os.path.join(folder_paths.models_dir, "annotators")
        return io.NodeOutput(layout_map(image, method, low_threshold, high_threshold, directory))


class RegionalControlStrengthNode(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSRegionalControlStrength",
            display_name="MoS Regional Adapter Strength",
            category="mixofshow/regional",
            description=(
                "Per-region strength of ControlNet / T2I-Adapter guidance, like the original's region adapter weights: "
                "'[y1, x1, y2, x2]-weight|...' (pixel boxes of a width x height image) overrides the apply node's "
                "strength (base_strength) inside each box."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model that samples with the control applied."),
                io.String.Input(
                    "region_weights",
                    multiline=True,
                    default="",
                    tooltip="e.g. '[4, 6, 1024, 490]-1.0|[10, 500, 1024, 1000]-0.5'.",
                ),
                io.Int.Input("width", default=1024, min=8, max=16384, step=8, tooltip="Width of the image the boxes refer to."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="Height of the image the boxes refer to."),
                io.Float.Input(
                    "base_strength",
                    default=1.0,
                    min=0.01,
                    max=10.0,
                    step=0.01,
                    tooltip="The strength set on the ControlNet/T2I-Adapter apply node.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, region_weights, width, height, base_strength) -> io.NodeOutput:
        cls.require_supported(model)
        notes: list[str] = []
        boxes = parse_region_weights(region_weights, width, height, notes)
        for note in notes:
            log.warning("MoS Regional Adapter Strength: %s", note)
        new_model = model.clone()
        if boxes:
            new_model.add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                "mixofshow_regional_control",
                RegionalControlStrength(boxes, base_strength),
            )
        return io.NodeOutput(new_model, ui=ui.PreviewText("\n".join([f"{len(boxes)} boxes", *notes])))


NODES = [RegionNode, RegionsFromText, RegionalConditioning, LayoutImage, RegionalControlStrengthNode]
