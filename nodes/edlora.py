"""ED-LoRA nodes: loader, layer-wise text encoder, converter."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..edlora.apply import check_concepts_fit, load_edlora_into
from ..edlora.concepts import ConceptSet
from ..edlora.encode import encode_prompt
from ..edlora.files import write_safetensors
from ..edlora.format import EDLoRAError, load_edlora, save_edlora, to_kohya_state_dict
from ..edlora.prompt import MAX_CONCEPT_WORDS
from .files import file_fingerprint, model_path, output_path
from .inputs import MoSNode
from .types import Concepts

log = logging.getLogger("mixofshow")


def edlora_path(name) -> str:
    """Full path of an ED-LoRA listed in models/edloras; an unknown name is an error naming it."""
    return model_path("edloras", name, "ED-LoRA", EDLoRAError)


class EDLoRALoader(MoSNode):
    FILE_INPUTS = {"edlora_name": "edloras"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSEDLoRALoader",
            display_name="MoS ED-LoRA Loader",
            category="mixofshow/edlora",
            description=(
                "Loads a Mix-of-Show ED-LoRA (original .pth in either key spelling, or this pack's .safetensors): "
                "patches MODEL and CLIP with its LoRA (W + strength * up @ down) and adds its concept words to "
                "CONCEPTS for MoS Text Encode. Chain loaders to use several concepts."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL-family model to patch (the input itself is never modified)."),
                io.Clip.Input("clip", tooltip="The matching CLIP text encoder."),
                io.Combo.Input(
                    "edlora_name",
                    options=folder_paths.get_filename_list("edloras"),
                    tooltip="An ED-LoRA file from models/edloras (.pth or .safetensors).",
                ),
                io.Float.Input(
                    "unet_strength",
                    default=0.7,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="LoRA strength on the UNet; 0.7 is Mix-of-Show's sampling default, 0 means embeddings only.",
                ),
                io.Float.Input(
                    "text_encoder_strength",
                    default=0.7,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="LoRA strength on the text encoder; 0.7 is Mix-of-Show's sampling default.",
                ),
                Concepts.Input(
                    "concepts", optional=True, tooltip="CONCEPTS from a previous MoS ED-LoRA Loader, to chain several concepts."
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A patched clone with layer-wise prompt routing."),
                io.Clip.Output(display_name="CLIP", tooltip="A patched clone of the text encoder."),
                Concepts.Output(display_name="CONCEPTS", tooltip="The concept words loaded so far, for MoS Text Encode."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, edlora_name, **kwargs):
        return file_fingerprint("edloras", edlora_name)

    @classmethod
    def execute(cls, model, clip, edlora_name, unet_strength, text_encoder_strength, concepts=None) -> io.NodeOutput:
        cls.require_supported(model, clip)
        edlora = load_edlora(edlora_path(edlora_name), name=edlora_name)
        new_model, new_clip, new_concepts = load_edlora_into(model, clip, edlora, unet_strength, text_encoder_strength, concepts)
        log.info(
            "Loaded ED-LoRA %s: concept %s, %d UNet and %d text-encoder LoRA modules, %d layer-wise vectors per word",
            edlora_name,
            edlora.concept_name,
            len(edlora.unet),
            len(edlora.text_encoder),
            edlora.layers,
        )
        return io.NodeOutput(new_model, new_clip, new_concepts)


class TextEncode(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSTextEncode",
            display_name="MoS Text Encode",
            category="mixofshow/edlora",
            description=(
                "Encodes a prompt that names ED-LoRA concept words, e.g. 'a <potter1> <potter2> on the beach'. "
                "Each cross-attention layer gets the prompt encoded with that layer's concept vectors (one batched "
                "text-encoder call). Without concept words it is exactly CLIPTextEncode. Prompt weights like "
                "(word:1.2) work. Use a model from MoS ED-LoRA Loader so the layers are routed."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP from MoS ED-LoRA Loader."),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The prompt; concept words are written in angle brackets, like <potter1>. One prompt may name up "
                    f"to {MAX_CONCEPT_WORDS} distinct concept words.",
                ),
                Concepts.Input("concepts", optional=True, tooltip="CONCEPTS from MoS ED-LoRA Loader."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, clip, text, concepts=None) -> io.NodeOutput:
        if clip is None:
            raise EDLoRAError("MoS Text Encode: the clip input is empty; connect the CLIP output of a loader.")
        cls.require_supported(clip=clip)
        check_concepts_fit(concepts, None, clip)
        return io.NodeOutput(encode_prompt(clip, concepts or ConceptSet(), text))


CONVERT_TARGETS = {
    "safetensors (this pack)": ("edloras", ".safetensors"),
    "pth (original, main-branch keys)": ("edloras", ".pth"),
    "pth (original, research-branch keys)": ("edloras", ".pth"),
    "kohya LoRA (no concept embeddings)": ("loras", ".safetensors"),
}


def convert_edlora_file(source: str, target: str, destination: str) -> str:
    """Convert the ED-LoRA at ``source`` to ``target`` (a key of :data:`CONVERT_TARGETS`) at ``destination``."""
    edlora = load_edlora(source)
    if target.startswith("kohya"):
        metadata = {
            "ss_network_module": "networks.lora",
            "mixofshow.source": os.path.basename(source),
            "mixofshow.note": f"converted from an ED-LoRA; concept words {edlora.concept_name} are not included",
        }
        return write_safetensors(to_kohya_state_dict(edlora), metadata, destination)
    spelling = "research" if "research" in target else "main"
    return save_edlora(edlora, destination, spelling=spelling)


class ConvertEDLoRA(MoSNode):
    FILE_INPUTS = {"edlora_name": "edloras"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSConvertEDLoRA",
            display_name="MoS Convert ED-LoRA",
            category="mixofshow/edlora",
            description=(
                "Converts an ED-LoRA: original .pth to this pack's safetensors (or back, in either key spelling), or "
                "to a standard kohya LoRA in models/loras for tools that cannot read ED-LoRA. A kohya LoRA carries "
                "only the weights: the layer-wise concept embeddings do not carry over."
            ),
            inputs=[
                io.Combo.Input(
                    "edlora_name", options=folder_paths.get_filename_list("edloras"), tooltip="The ED-LoRA to convert."
                ),
                io.Combo.Input(
                    "target", options=list(CONVERT_TARGETS), default="safetensors (this pack)", tooltip="Output format."
                ),
                io.String.Input("output_name", default="", tooltip="File name without extension; empty means the input's name."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the converted file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, edlora_name, target, output_name, overwrite) -> io.NodeOutput:
        if target not in CONVERT_TARGETS:
            raise EDLoRAError(f"MoS Convert ED-LoRA: unknown target {target!r}; choose one of {', '.join(CONVERT_TARGETS)}.")
        source = edlora_path(edlora_name)
        folder, extension = CONVERT_TARGETS[target]
        name = output_name.strip() or os.path.splitext(os.path.basename(edlora_name))[0]
        destination = output_path(folder, name, extension, True, "MoS Convert ED-LoRA output_name", EDLoRAError)
        if os.path.abspath(destination) == os.path.abspath(source):
            raise EDLoRAError(
                f"MoS Convert ED-LoRA: output '{os.path.basename(destination)}' is the input file; choose another output_name."
            )
        destination = output_path(folder, name, extension, overwrite, "MoS Convert ED-LoRA output_name", EDLoRAError)
        path = convert_edlora_file(source, target, destination)
        message = f"Wrote {path}"
        if target.startswith("kohya"):
            warning = (
                "the layer-wise concept embeddings do not carry over to a kohya LoRA; prompts must describe the concept in words"
            )
            log.warning("MoS Convert ED-LoRA: %s (%s)", warning, edlora_name)
            message += f"\nWarning: {warning}."
        return io.NodeOutput(path, ui=ui.PreviewText(message))


NODES = [EDLoRALoader, TextEncode, ConvertEDLoRA]
