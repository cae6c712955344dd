"""Fusion nodes: the ED-LoRA stack, gradient fusion, weight fusion, saving and loading fused models."""

from __future__ import annotations

import logging
import math
import os

import folder_paths
from comfy_api.latest import io, ui

from ..edlora.concepts import ConceptEntry, ConceptSet
from ..edlora.files import write_safetensors
from ..edlora.format import EDLoRA, load_edlora
from ..edlora.loras import LoRAFileError, load_lora_file, suggested_prompts
from ..edlora.prompt import check_known_words
from ..fusion.bundle import FusedFileError, check_fits, load_fused, save_fused
from ..fusion.export import export_lora
from ..fusion.procedure import gradient_fusion, weight_fusion
from ..fusion.results import FusionError, FusionSettings, fingerprint
from ..fusion.solvers import SOLVERS
from ..fusion.weights import BaseWeights
from .edlora import edlora_path
from .files import file_fingerprint, file_sha256, model_path, output_path
from .inputs import MoSNode
from .types import Concepts, Fused

FUSED_FOLDER = "mixofshow_fused"
log = logging.getLogger("mixofshow")


def fused_file_list() -> list[str]:
    names = folder_paths.get_filename_list(FUSED_FOLDER)
    return [n for n in names if not n.endswith(".json") or os.path.basename(n) == "new_concept_cfg.json"]


def _outputs(model, clip, fused):
    fused_model, fused_clip = fused.apply(model, clip)
    report = fused.report()
    return io.NodeOutput(fused_model, fused_clip, fused.concepts, fused, report, ui=ui.PreviewText(report))


FUSION_OUTPUTS = [
    io.Model.Output(
        display_name="MODEL", tooltip="The base model with the fused weights (patches on a clone) and layer routing."
    ),
    io.Clip.Output(display_name="CLIP", tooltip="The base text encoder with the fused weights."),
    Concepts.Output(display_name="CONCEPTS", tooltip="All fused concept words, for MoS Text Encode."),
    Fused.Output(display_name="FUSED", tooltip="The fusion result, for MoS Save Fused (and to extend it later)."),
    io.String.Output(display_name="report", tooltip="Objective per layer group and identity drift per concept."),
]


class EDLoRAStack(MoSNode):
    FILE_INPUTS = {"edlora_name": "edloras"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSEDLoRAStack",
            display_name="MoS ED-LoRA Stack",
            category="mixofshow/fusion",
            description=(
                "Adds one ED-LoRA with its fusion strengths to a CONCEPTS stack without patching any model. Chain one per "
                "concept and feed the stack to MoS Gradient Fusion or MoS Weight Fusion."
            ),
            inputs=[
                io.Combo.Input(
                    "edlora_name", options=folder_paths.get_filename_list("edloras"), tooltip="An ED-LoRA from models/edloras."
                ),
                io.Float.Input(
                    "unet_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength of this concept's UNet LoRA in its fusion target (1.0 as in the original).",
                ),
                io.Float.Input(
                    "text_encoder_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength of this concept's text-encoder LoRA in its fusion target.",
                ),
                Concepts.Input("concepts", optional=True, tooltip="The stack so far."),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="Prompts that show this concept, one per line, with its words (e.g. 'photo of <potter1> "
                    "<potter2> in a street'); fusion fits every layer on them. Empty: the original's 'photo of a "
                    "<concept>' and '<concept>'. More varied prompts help.",
                ),
            ],
            outputs=[Concepts.Output(display_name="CONCEPTS")],
        )

    @classmethod
    def fingerprint_inputs(cls, edlora_name, **kwargs):
        return file_fingerprint("edloras", edlora_name)

    @classmethod
    def execute(cls, edlora_name, unet_strength, text_encoder_strength, concepts=None, prompts="") -> io.NodeOutput:
        edlora = load_edlora(edlora_path(edlora_name), name=edlora_name)
        lines = prompt_lines(prompts)
        entry = ConceptEntry(edlora, unet_strength, text_encoder_strength, prompts=lines)
        stack = (concepts or ConceptSet()).add(entry)
        check_prompt_words(entry, stack)
        return io.NodeOutput(stack, ui=ui.PreviewText(prompts_summary(entry)))


def prompt_lines(text) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


def check_prompt_words(entry: ConceptEntry, stack: ConceptSet) -> None:
    """Concept words in a concept's prompts must be loaded (so far in the stack), named before any work starts."""
    for prompt in entry.prompts:
        check_known_words(prompt, stack.words, where=f"prompts of {entry.name}")


def prompts_summary(entry: ConceptEntry) -> str:
    source = "given" if entry.prompts else "default"
    return f"{entry.name}: fusion prompts ({source}):\n" + "\n".join(f"  {p}" for p in entry.text_prompts())


class LoRAConcept(MoSNode):
    FILE_INPUTS = {"lora_name": "loras"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSLoRAConcept",
            display_name="MoS LoRA Concept",
            category="mixofshow/fusion",
            description=(
                "Adds an ordinary LoRA (kohya, diffusers/PEFT, LyCORIS LoCon/LoHa/LoKr, DoRA: anything core LoraLoader "
                "reads) from models/loras to a CONCEPTS stack, with prompts that show it by its trigger words. Mix it "
                "with ED-LoRAs and fuse them all with MoS Gradient Fusion, so several characters live in one model "
                "without their identities bleeding into each other."
            ),
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip="A LoRA from models/loras."),
                io.Float.Input(
                    "model_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength of the LoRA on the model (UNet) in its fusion target, as in core LoraLoader.",
                ),
                io.Float.Input(
                    "clip_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength of the LoRA on CLIP in its fusion target, as in core LoraLoader.",
                ),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="",
                    tooltip="Prompts that show the concept, one per line, with its trigger words (e.g. 'photo of hatsune "
                    "miku, twintails' and 'hatsune miku standing in a street'). Empty: suggested from the file's training "
                    "tags when it has them (the node shows which).",
                ),
                Concepts.Input("concepts", optional=True, tooltip="The stack so far."),
            ],
            outputs=[Concepts.Output(display_name="CONCEPTS", tooltip="The stack with this LoRA added.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return file_fingerprint("loras", lora_name)

    @classmethod
    def execute(cls, lora_name, model_strength, clip_strength, prompts, concepts=None) -> io.NodeOutput:
        lora = load_lora_file(model_path("loras", lora_name, "LoRA", LoRAFileError), name=lora_name)
        lines = prompt_lines(prompts)
        source = "given"
        if not lines:
            lines = tuple(suggested_prompts(lora))
            source = "suggested from the file's training tags"
            if not lines:
                raise LoRAFileError(
                    f"MoS LoRA Concept: '{lora_name}' has no training tags to suggest prompts from; write prompts that show "
                    "the concept with its trigger words, one per line (e.g. 'photo of hatsune miku, twintails')."
                )
        empty = EDLoRA({}, {}, {}, name=lora_name)
        entry = ConceptEntry(empty, model_strength, clip_strength, lora=lora, prompts=lines)
        stack = (concepts or ConceptSet()).add(entry)
        check_prompt_words(entry, stack)
        log.info("MoS LoRA Concept %s: fusion prompts (%s): %s", lora_name, source, " | ".join(lines))
        text = f"{lora_name}: fusion prompts ({source}):\n" + "\n".join(f"  {p}" for p in lines)
        return io.NodeOutput(stack, ui=ui.PreviewText(text))


class GradientFusion(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSGradientFusion",
            display_name="MoS Gradient Fusion",
            category="mixofshow/fusion",
            description=(
                "Fuses many ED-LoRAs into one model without losing their identities (Mix-of-Show gradient fusion): "
                "text-encoder layers first, then cross-attention K/V with the fused text encoder, then the other UNet "
                "layers from one sample per concept; each layer is fitted so that it reproduces every concept's own "
                "outputs. Statistics stream into Gram matrices, so memory does not grow with concepts, steps or resolution."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (without any ED-LoRA applied)."),
                io.Clip.Input("clip", tooltip="The base text encoder."),
                Concepts.Input("concepts", tooltip="The ED-LoRAs to fuse, from MoS ED-LoRA Stack."),
                io.Int.Input(
                    "text_encoder_iters",
                    default=500,
                    min=0,
                    max=10000,
                    tooltip="LBFGS iterations per text-encoder and cross-attention K/V layer (500 in the original).",
                ),
                io.Int.Input(
                    "unet_iters",
                    default=50,
                    min=0,
                    max=10000,
                    tooltip="LBFGS iterations per other UNet layer (50 in the original).",
                ),
                io.Int.Input(
                    "sample_steps",
                    default=20,
                    min=1,
                    max=200,
                    tooltip="Sampling steps recorded per concept (20 in the original).",
                ),
                io.Int.Input(
                    "sample_resolution",
                    default=FusionSettings.sample_resolution,
                    min=0,
                    max=2048,
                    step=8,
                    tooltip="Resolution of the per-concept sample whose UNet features are recorded. 0: the model's own, "
                    "512 for SD1.x and 1024 for SDXL.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the per-concept samples; fusion is deterministic. Keep 'control after generate' at "
                    "fixed: another seed means another fusion run.",
                ),
                io.Combo.Input(
                    "solver",
                    options=list(SOLVERS),
                    default="lbfgs",
                    tooltip="; ".join(f"{s.name}: {s.description}" for s in SOLVERS.values()) + ".",
                ),
                io.Combo.Input(
                    "device",
                    options=["auto", "cpu", "cuda"],
                    default="auto",
                    tooltip="Where statistics and solvers run; auto = the GPU when there is one.",
                ),
                io.Combo.Input(
                    "token_positions",
                    options=["padded", "original"],
                    default="padded",
                    tooltip="padded: fit text-encoder and K/V layers on every position of the padded prompt, as ComfyUI "
                    "encodes it (lower identity drift). original: only real tokens / concept tokens, as the research code.",
                ),
                io.Boolean.Input(
                    "measure_drift",
                    default=True,
                    tooltip="Measure each concept's identity drift for the report (a few UNet calls per concept at 512x512). "
                    "Added after the first release: older workflows get the default.",
                ),
                io.Float.Input(
                    "statistics_memory_gb",
                    default=FusionSettings.statistics_budget_gb,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="Memory for the fusion statistics (float64, on 'device'). Layers whose statistics do not fit "
                    "(large convolutions of LoCon files first) are weight-fused instead; the report names them. "
                    "ED-LoRAs on SD1.5 need about 1.2 GB.",
                ),
                io.Combo.Input(
                    "conv_layers",
                    options=["weight", "statistics"],
                    default="weight",
                    tooltip="k x k convolutions (LoCon files): weight = weight fusion (the mean of the concepts' changes; "
                    "measured to keep identities better on our tests); statistics = fit them like Linear layers on the "
                    "unfolded patches they see (exact, but large: 1-4 GB per SD1.5 layer).",
                ),
                Fused.Input(
                    "previous",
                    optional=True,
                    tooltip="A fusion saved with its statistics: its concepts are not re-sampled, new ones are added.",
                ),
            ],
            outputs=FUSION_OUTPUTS,
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        concepts,
        text_encoder_iters,
        unet_iters,
        sample_steps,
        sample_resolution,
        seed,
        solver,
        device,
        token_positions,
        measure_drift=True,
        statistics_memory_gb=FusionSettings.statistics_budget_gb,
        conv_layers="weight",
        previous=None,
    ) -> io.NodeOutput:
        cls.require_supported(model, clip)
        settings = FusionSettings(
            text_encoder_iters=text_encoder_iters,
            unet_iters=unet_iters,
            sample_steps=sample_steps,
            sample_resolution=sample_resolution,
            seed=seed,
            solver=solver,
            device=device,
            token_positions=token_positions,
            statistics_budget_gb=statistics_memory_gb,
            conv_layers=conv_layers,
        )
        fused = gradient_fusion(model, clip, concepts, settings, previous=previous, measure_drift=measure_drift)
        return _outputs(model, clip, fused)


class WeightFusion(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSWeightFusion",
            display_name="MoS Weight Fusion",
            category="mixofshow/fusion",
            description=(
                "The paper's baseline: W0 + sum_i w_i * strength_i * up_i @ down_i with weights summing to 1. Instant, "
                "but each concept keeps only part of its LoRA; compare its identity drift with MoS Gradient Fusion."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model."),
                io.Clip.Input("clip", tooltip="The base text encoder."),
                Concepts.Input("concepts", tooltip="The ED-LoRAs to fuse, from MoS ED-LoRA Stack."),
                io.String.Input(
                    "weights", default="", tooltip="Comma-separated weights per concept (normalised to sum 1); empty = equal."
                ),
                io.Boolean.Input("measure_drift", default=True, tooltip="Measure each concept's identity drift for the report."),
            ],
            outputs=FUSION_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, clip, concepts, weights, measure_drift) -> io.NodeOutput:
        cls.require_supported(model, clip)
        values = None
        if weights.strip():
            try:
                values = [float(v) for v in weights.split(",")]
            except ValueError:
                values = None
            if values is None or not all(math.isfinite(v) for v in values):
                raise FusionError(f"MoS Weight Fusion: weights {weights!r} must be comma-separated finite numbers.")
        fused = weight_fusion(model, clip, concepts, values, measure_drift=measure_drift)
        return _outputs(model, clip, fused)


class SaveFused(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSSaveFused",
            display_name="MoS Save Fused",
            category="mixofshow/fusion",
            description=(
                "Saves a fusion result as one .safetensors in models/mixofshow_fused: the fused weights (diffs against the "
                "base, or full tensors), the concept table and how it was made. MoS Load Fused restores it bit for bit."
            ),
            inputs=[
                Fused.Input("fused", tooltip="FUSED from MoS Gradient Fusion or MoS Weight Fusion."),
                io.Model.Input("model", tooltip="The base model the fusion was made on (checked, and used for full storage)."),
                io.Clip.Input("clip", tooltip="The base text encoder the fusion was made on."),
                io.String.Input("filename", default="fused_concepts", tooltip="File name without extension."),
                io.Combo.Input(
                    "storage",
                    options=["diff", "full"],
                    default="diff",
                    tooltip="diff: differences to the base (small to share with people who have the base). full: fused tensors.",
                ),
                io.Boolean.Input(
                    "include_statistics",
                    default=False,
                    tooltip="Also store the Gram statistics, so a later fusion can add a concept without re-sampling these.",
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, fused, model, clip, filename, storage, include_statistics, overwrite) -> io.NodeOutput:
        cls.require_supported(model, clip)
        path = output_path(FUSED_FOLDER, filename, ".safetensors", overwrite, "MoS Save Fused filename", FusedFileError)
        base = BaseWeights(model, clip)
        keys = sorted({*fused.unet_diffs, *fused.text_diffs})
        base_weights = base(keys)
        if fused.base_fingerprint:
            if fingerprint(base_weights) != fused.base_fingerprint:
                raise FusedFileError("MoS Save Fused: the connected MODEL/CLIP are not the base this fusion was made on.")
        sources = {}
        for entry in fused.concepts.entries:
            source = folder_paths.get_full_path("loras" if entry.kind == "lora" else "edloras", entry.source)
            if source:
                sources[entry.source] = {"sha256": file_sha256(source)}
        save_fused(
            fused, path, base_weights=base_weights, storage=storage, include_statistics=include_statistics, sources=sources
        )
        return io.NodeOutput(path, ui=ui.PreviewText(f"Saved {path}\n{fused.report()}"))


class LoadFused(MoSNode):
    FILE_INPUTS = {"fused_name": FUSED_FOLDER}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSLoadFused",
            display_name="MoS Load Fused",
            category="mixofshow/fusion",
            description=(
                "Loads a fused model onto the base MODEL/CLIP: this pack's bundles from MoS Save Fused, the original "
                "Mix-of-Show research combined_model .pth, or a main-branch fused diffusers folder (pick its "
                "new_concept_cfg.json) placed in models/mixofshow_fused."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model the fusion was made on."),
                io.Clip.Input("clip", tooltip="The base text encoder."),
                io.Combo.Input("fused_name", options=fused_file_list(), tooltip="A file in models/mixofshow_fused."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                Concepts.Output(display_name="CONCEPTS"),
                Fused.Output(display_name="FUSED"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, fused_name, **kwargs):
        return file_fingerprint(FUSED_FOLDER, fused_name)

    @classmethod
    def execute(cls, model, clip, fused_name) -> io.NodeOutput:
        cls.require_supported(model, clip)
        path = model_path(FUSED_FOLDER, fused_name, "Fused model", FusedFileError)
        fused = load_fused(path, BaseWeights(model, clip))
        check_fits(fused, model, clip, fused_name)
        fused_model, fused_clip = fused.apply(model, clip)
        return io.NodeOutput(fused_model, fused_clip, fused.concepts, fused)


class ExportFusedLoRA(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSExportFusedLoRA",
            display_name="MoS Export Fused LoRA",
            category="mixofshow/fusion",
            description=(
                "Writes a fusion as one ordinary LoRA file in models/loras that core LoraLoader and other tools load: "
                "rank 0 writes the fused weight differences exactly; a rank writes each as its best low-rank "
                "approximation (the node reports the error). Concept words' layer-wise vectors cannot go into a LoRA: "
                "ED-LoRA concepts still need MoS Load Fused; LoRA concepts work with their trigger words."
            ),
            inputs=[
                Fused.Input("fused", tooltip="FUSED from MoS Gradient Fusion, MoS Weight Fusion or MoS Load Fused."),
                io.Model.Input("model", tooltip="The base model the fusion was made on (names the layers; checked)."),
                io.Clip.Input("clip", tooltip="The base text encoder the fusion was made on."),
                io.String.Input("filename", default="fused_lora", tooltip="File name in models/loras, without extension."),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=4096,
                    tooltip="0: exact (full differences, a large file). Otherwise the rank of each layer's approximation; "
                    "exact where a layer's difference has at most that rank.",
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the LoRA was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, fused, model, clip, filename, rank, overwrite) -> io.NodeOutput:
        cls.require_supported(model, clip)
        path = output_path("loras", filename, ".safetensors", overwrite, "MoS Export Fused LoRA filename", FusedFileError)
        keys = sorted({*fused.unet_diffs, *fused.text_diffs})
        if fused.base_fingerprint and fingerprint(BaseWeights(model, clip)(keys)) != fused.base_fingerprint:
            raise FusedFileError("MoS Export Fused LoRA: the connected MODEL/CLIP are not the base this fusion was made on.")
        tensors, metadata, report = export_lora(fused, model, clip, rank)
        write_safetensors(tensors, metadata, path)
        text = f"Wrote {path}\n{report.text(rank)}"
        if fused.concepts.words:
            text += f"\nNot included: the layer-wise vectors of {' '.join(fused.concepts.words)} (use MoS Load Fused for them)."
        log.info("MoS Export Fused LoRA: %s", text.replace("\n", " "))
        return io.NodeOutput(path, ui=ui.PreviewText(text))


NODES = [EDLoRAStack, LoRAConcept, GradientFusion, WeightFusion, SaveFused, LoadFused, ExportFusedLoRA]
