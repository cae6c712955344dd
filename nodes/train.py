"""Single-client tuning nodes: a training-image folder loader and MoS Train ED-LoRA."""

from __future__ import annotations

import hashlib
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..edlora.apply import load_edlora_into
from ..edlora.arch import architecture_name, native_resolution, text_encoder_widths
from ..edlora.format import EDLoRAError, load_edlora, save_edlora
from ..training.data import (
    DEFAULT_TEMPLATE,
    expand_captions,
    parse_concept_words,
    prepare_images,
    read_image_folder,
    training_files,
)
from ..training.loop import Preview, TrainingData, TrainSettings, check_resumable, encode_training_latents, train_edlora
from .edlora import edlora_path
from .files import file_fingerprint, output_path
from .inputs import MoSNode
from .types import Concepts

log = logging.getLogger("mixofshow")

SAMPLING_STRENGTH = 0.7
#: resume_from's value for "start a new ED-LoRA"
NO_RESUME = "(none)"
#: The widget defaults of MoS Train ED-LoRA (the original recipe).
DEFAULTS = TrainSettings()


def training_folder(folder) -> str:
    """``folder`` inside ComfyUI's input directory, where core Load Image reads too.

    Relative folders are taken inside it and may not climb out of it (``..``); an absolute folder is accepted only
    when it lies inside it. A ComfyUI served to other people must not let a prompt read the host's files into a
    model. The check is on the path as written, so a link the machine's owner put into the input directory (to a
    dataset elsewhere) is followed.
    """
    if not isinstance(folder, str) or not folder.strip():
        raise EDLoRAError("MoS Load Training Images: folder is empty; name a folder inside ComfyUI's input directory.")
    root = os.path.abspath(folder_paths.get_input_directory())
    path = os.path.normpath(os.path.join(root, folder.strip()))
    if os.path.commonpath([root, path]) != root or path == root:
        raise EDLoRAError(
            f"MoS Load Training Images: folder {folder!r} is outside ComfyUI's input directory ({root}); put the "
            "training images in a folder inside it (or link one there)."
        )
    return path


class LoadTrainingImages(MoSNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSLoadTrainingImages",
            display_name="MoS Load Training Images",
            category="mixofshow/training",
            description=(
                "Reads a concept's training images (5-20 is typical), their captions and subject masks from a folder, "
                "and crops them to squares like the original: short side scaled to the resolution, centre kept. "
                "Layouts: the original Mix-of-Show dataset (image/, caption/, mask/ subfolders) or a flat folder "
                "(photo.jpg with photo.txt beside it, masks in mask/photo.png). Captions use <TOK> for the concept."
            ),
            inputs=[
                io.String.Input(
                    "folder",
                    default="mixofshow_concept",
                    tooltip="Folder inside ComfyUI's input directory (relative, or an absolute path inside it). Folders "
                    "outside it are refused, as core Load Image does; link a dataset into input/ to use it.",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=64,
                    max=2048,
                    step=8,
                    tooltip="Side of the square crops: 512 for SD1.x, 1024 for SDXL (images "
                    "smaller than this on their short side are refused).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The cropped images, one batch."),
                io.Mask.Output(
                    display_name="MASK", tooltip="Subject masks, cropped the same way (all ones when the folder has no masks)."
                ),
                io.String.Output(display_name="captions", tooltip="One caption per line, in image order (empty lines: none)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, resolution):
        """Size and time of exactly the files the node reads (two directory listings, no walk of the tree)."""
        try:
            files = training_files(training_folder(folder))
        except EDLoRAError as exc:
            return f"unusable: {exc}"  # execute reports it
        digest = hashlib.sha256(f"{resolution}".encode())
        for path in (*files.images, *files.masks, *files.captions):
            if path is not None:
                stat = os.stat(path)
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, folder, resolution) -> io.NodeOutput:
        names, images, masks, captions = read_image_folder(training_folder(folder))
        cropped, cropped_masks = prepare_images(images, masks, resolution, names=[f"'{name}'" for name in names])
        if cropped_masks is None:
            cropped_masks = torch.ones(cropped.shape[:3])
        log.info(
            "MoS Load Training Images: %d images from %s (%s masks, %d captions)",
            len(names),
            folder,
            "with" if masks else "no",
            sum(1 for c in captions if c),
        )
        return io.NodeOutput(cropped, cropped_masks, "\n".join(captions))


class TrainEDLoRA(MoSNode):
    FILE_INPUTS = {"resume_from": "edloras"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoSTrainEDLoRA",
            display_name="MoS Train ED-LoRA",
            category="mixofshow/training",
            description=(
                "Single-client tuning (Mix-of-Show 3.3.1): learns one concept from a few images as an ED-LoRA, i.e. "
                "layer-wise vectors per concept word (16 on SD1.x, 11 on SDXL) plus a rank-4 LoRA on every text-encoder "
                "and UNet attention. Saves it to models/edloras (loader, fusion and the original tools read it), shows "
                "samples of the concept while it trains, and returns the model patched with it at strength 0.7 for "
                "sampling right away. Defaults are the original recipe; needs a GPU for real use."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL-family base model (never modified)."),
                io.Clip.Input("clip", tooltip="Its CLIP text encoder."),
                io.Vae.Input("vae", tooltip="Its VAE, to encode the training images."),
                io.Image.Input(
                    "images", tooltip="The concept's images (5-20 is typical); resized and centre-cropped to the resolution."
                ),
                io.Mask.Input(
                    "masks",
                    optional=True,
                    tooltip="Subject masks, one per image, white (1) = subject: the loss counts only the subject and the "
                    "attention of the concept words is kept on it. A mask covering the whole image is the same as none. "
                    "(Core Load Image's MASK is inverted alpha; invert it first.)",
                ),
                io.String.Input(
                    "concept_words",
                    default="+".join(DEFAULTS.words),
                    tooltip="The concept's words joined by '+'; write them in prompts separated by a space: <name1> <name2>.",
                ),
                io.String.Input(
                    "class_word",
                    default=DEFAULTS.class_word,
                    tooltip="One-token word the last concept word starts from (man, woman, dog, car...). Empty: all words random.",
                ),
                io.String.Input(
                    "captions",
                    default="",
                    multiline=True,
                    tooltip="One caption per image, <TOK> where the concept goes. Empty lines use the template; a caption "
                    "without <TOK> gets the template in front.",
                ),
                io.String.Input(
                    "caption_template", default=DEFAULT_TEMPLATE, tooltip="Used where a caption is missing; must contain <TOK>."
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=2048,
                    step=8,
                    tooltip="Training resolution (square). 0: the model's own, 512 for SD1.x and 1024 for SDXL. Images "
                    "smaller than it on their short side are refused.",
                ),
                io.Int.Input("rank", default=DEFAULTS.rank, min=1, max=128, tooltip="LoRA rank (4 in Mix-of-Show)."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=100000, tooltip="Optimiser steps."),
                io.Int.Input("batch_size", default=DEFAULTS.batch_size, min=1, max=64, tooltip="Images per step."),
                io.Int.Input(
                    "seed",
                    default=DEFAULTS.seed,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Same seed, same inputs: the same ED-LoRA on CPU. Keep 'control after generate' at fixed: "
                    "another seed means another training run.",
                ),
                io.Float.Input(
                    "lr_embedding",
                    default=DEFAULTS.lr_embedding,
                    min=0.0,
                    max=1.0,
                    step=0.00001,
                    tooltip="Learning rate of the concept vectors.",
                ),
                io.Float.Input(
                    "lr_text_encoder",
                    default=DEFAULTS.lr_text_encoder,
                    min=0.0,
                    max=1.0,
                    step=0.000001,
                    tooltip="Learning rate of the text-encoder LoRA.",
                ),
                io.Float.Input(
                    "lr_unet", default=DEFAULTS.lr_unet, min=0.0, max=1.0, step=0.00001, tooltip="Learning rate of the UNet LoRA."
                ),
                io.Float.Input(
                    "weight_decay", default=DEFAULTS.weight_decay, min=0.0, max=1.0, step=0.001, tooltip="AdamW weight decay."
                ),
                io.Float.Input(
                    "noise_offset",
                    default=DEFAULTS.noise_offset,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Per-channel noise offset.",
                ),
                io.Float.Input(
                    "embedding_norm_threshold",
                    default=DEFAULTS.embedding_norm_threshold,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="The concept vectors stop learning once their mean norm reaches this (0: never).",
                ),
                io.Boolean.Input(
                    "mask_loss", default=DEFAULTS.mask_loss, tooltip="With masks: count the loss only on the subject."
                ),
                io.Float.Input(
                    "attention_reg_weight",
                    default=DEFAULTS.attention_reg_weight,
                    min=0.0,
                    max=10.0,
                    step=0.001,
                    tooltip="With masks: weight of the penalty on concept-word attention outside the subject (0: off).",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=DEFAULTS.gradient_checkpointing,
                    tooltip="Recompute UNet blocks in the backward pass: much less memory (for 8-12 GB GPUs), about a third slower.",
                ),
                io.String.Input("filename", default="my_concept", tooltip="File name in models/edloras (without extension)."),
                io.Boolean.Input(
                    "save_pth",
                    default=False,
                    tooltip="Also write the original Mix-of-Show .pth layout (SD1.x only: it holds one text encoder).",
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace existing files of that name."),
                # appended after the first release, optional so that saved API prompts without them keep running
                io.Int.Input(
                    "preview_every",
                    default=100,
                    min=0,
                    max=100000,
                    optional=True,
                    tooltip="Sample the concept (caption template, 12 Euler steps, seed 0) every this many steps and show "
                    "it on the node above the loss curve, and once at the end (0: loss curve only).",
                ),
                io.Combo.Input(
                    "resume_from",
                    options=[NO_RESUME, *folder_paths.get_filename_list("edloras")],
                    default=NO_RESUME,
                    optional=True,
                    tooltip="Continue training this ED-LoRA from models/edloras (its words, rank and vectors; a fresh "
                    "optimiser and learning-rate schedule over 'steps' more steps) instead of starting anew.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="The model with the new ED-LoRA at strength 0.7 and layer routing."
                ),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the new ED-LoRA at strength 0.7."),
                Concepts.Output(display_name="CONCEPTS", tooltip="The new concept's words, for MoS Text Encode."),
                io.String.Output(display_name="edlora_name", tooltip="The saved file's name in models/edloras."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, resume_from=NO_RESUME, **kwargs):
        return file_fingerprint("edloras", resume_from) if resume_from != NO_RESUME else NO_RESUME

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        images,
        concept_words,
        class_word,
        captions,
        caption_template,
        resolution,
        rank,
        steps,
        batch_size,
        seed,
        lr_embedding,
        lr_text_encoder,
        lr_unet,
        weight_decay,
        noise_offset,
        embedding_norm_threshold,
        mask_loss,
        attention_reg_weight,
        gradient_checkpointing,
        filename,
        save_pth,
        overwrite,
        masks=None,
        preview_every=100,
        resume_from=NO_RESUME,
    ) -> io.NodeOutput:
        cls.require_supported(model, clip)
        words = parse_concept_words(concept_words)
        architecture = architecture_name(text_encoder_widths(clip))
        if save_pth and architecture != "SD1.x":
            raise EDLoRAError(
                f"MoS Train ED-LoRA: save_pth is on, but the original .pth layout holds one text encoder (SD1.x) and this "
                f"is an {architecture} model; turn save_pth off (the .safetensors file is always written)."
            )
        paths = output_paths(filename, save_pth, overwrite)
        start = None
        if resume_from != NO_RESUME:
            start = load_edlora(edlora_path(resume_from), name=resume_from)
            check_resumable(start, model, clip, tuple(words))
        resolution = resolution or native_resolution(model)
        if masks is not None:
            masks = masks.reshape(-1, *masks.shape[-2:]) if masks.dim() >= 2 else masks
            if masks.shape[0] == images.shape[0] and bool((masks >= 0.999).all()):
                log.info("MoS Train ED-LoRA: the masks cover the whole images; training without masks.")
                masks = None
        labels = [f"{i} of the 'images' input" for i in range(images.shape[0])]
        crops, crop_masks = prepare_images(list(images), None if masks is None else list(masks), resolution, names=labels)
        prompts = expand_captions(captions, crops.shape[0], " ".join(words), caption_template)
        settings = TrainSettings(
            words=tuple(words),
            class_word=class_word,
            rank=rank,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            lr_embedding=lr_embedding,
            lr_text_encoder=lr_text_encoder,
            lr_unet=lr_unet,
            weight_decay=weight_decay,
            noise_offset=noise_offset,
            embedding_norm_threshold=embedding_norm_threshold,
            mask_loss=mask_loss,
            attention_reg_weight=attention_reg_weight,
            gradient_checkpointing=gradient_checkpointing,
        )
        latents = encode_training_latents(vae, model, crops)
        data = TrainingData(latents, prompts, None if crop_masks is None else crop_masks[:, None])
        board = TrainingBoard(steps, model, vae)
        preview = None
        if preview_every > 0:
            prompt = expand_captions("", 1, " ".join(words), caption_template)[0]
            preview = Preview(every=preview_every, prompt=prompt, show=board.show_sample, size=resolution)
        name = os.path.basename(paths[0])
        result = train_edlora(model, clip, data, settings, on_step=board.on_step, name=name, start=start, preview=preview)
        for path in paths:
            save_edlora(result.edlora, path)
        board.finish()
        new_model, new_clip, concepts = load_edlora_into(model, clip, result.edlora, SAMPLING_STRENGTH, SAMPLING_STRENGTH)
        text = summary(result, paths, prompts, resume_from if start is not None else None)
        return io.NodeOutput(new_model, new_clip, concepts, name, ui=ui.PreviewText(text))


class TrainingBoard:
    """What the node shows while it trains: a progress bar whose preview is the latest sample of the concept above
    the loss curve, and a log line every twentieth of the run. Each step checks ComfyUI's interrupt.

    Samples taken during the run are shown through ComfyUI's own latent previewer (the user's preview method:
    latent2rgb or TAESD), because a full VAE decode in the middle of a run could make ComfyUI move the training model
    off the GPU to make room; the last sample is decoded with the VAE once the run is over."""

    def __init__(self, steps: int, model, vae):
        self.steps = steps
        self.vae = vae
        self.process_latent_in = model.get_model_object("process_latent_in")
        latent_format = model.model.latent_format
        # the preview_every widget asks for samples, so they are shown even where sampler previews are off
        # (ComfyUI's default): then with latent2rgb, as ComfyUI's "auto" method does
        self.previewer = latent_preview.get_previewer(model.load_device, latent_format) or latent_preview.Latent2RGBPreviewer(
            latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias, latent_format.latent_rgb_factors_reshape
        )
        self.bar = comfy.utils.ProgressBar(steps)
        self.report_every = max(1, steps // 20)
        self.losses: list[float] = []
        self.sample = None  # PIL image of the latest preview sample
        self.last_latent: torch.Tensor | None = None

    def on_step(self, step: int, total: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.losses.append(loss)
        report = step % self.report_every == 0 or step == total
        self.bar.update_absolute(step, total, ("JPEG", self.picture(), 512) if report else None)
        if report:
            log.info("MoS Train ED-LoRA: step %d/%d loss %.4f", step, total, loss)

    def show_sample(self, step: int, latent: torch.Tensor) -> None:
        """A sample taken at ``step`` (a VAE-space latent, as samplers return them)."""
        self.last_latent = latent
        self.sample = self.previewer.decode_latent_to_preview(self.process_latent_in(latent.float()))
        self.bar.update_absolute(step, self.steps, ("JPEG", self.picture(), 512))

    def finish(self) -> None:
        """Decode the last sample with the VAE, now that the training model may leave the GPU."""
        if self.last_latent is None:
            return
        from PIL import Image

        image = self.vae.decode(self.last_latent)[0].clamp(0, 1)
        self.sample = Image.fromarray((image[..., :3] * 255).round().to(torch.uint8).cpu().numpy())
        self.bar.update_absolute(self.steps, self.steps, ("JPEG", self.picture(), 512))

    def picture(self):
        curve = loss_curve(self.losses, self.steps)
        if self.sample is None:
            return curve
        from PIL import Image

        width = curve.width
        sample = self.sample.resize((width, max(1, round(self.sample.height * width / self.sample.width))))
        board = Image.new("RGB", (width, sample.height + curve.height))
        board.paste(sample, (0, 0))
        board.paste(curve, (0, sample.height))
        return board


def output_paths(filename: str, save_pth: bool, overwrite: bool) -> list[str]:
    """Where the ED-LoRA goes; refused before training when a file exists and ``overwrite`` is off."""
    stem = filename.strip() if isinstance(filename, str) else filename
    if isinstance(stem, str) and stem.lower().endswith((".safetensors", ".pth")):
        stem = os.path.splitext(stem)[0]
    extensions = [".safetensors", ".pth"] if save_pth else [".safetensors"]
    return [output_path("edloras", stem, ext, overwrite, "MoS Train ED-LoRA filename", EDLoRAError) for ext in extensions]


def loss_curve(losses: list[float], total: int, width: int = 256, height: int = 128):
    """A small picture of the loss so far (raw in grey, a running mean in white), shown as the node's preview."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (24, 24, 24))
    if len(losses) < 2:
        return image
    draw = ImageDraw.Draw(image)
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))
    ]

    def points(values):
        return [
            (4 + i * (width - 8) / max(1, total - 1), height - 4 - (v - low) / span * (height - 8)) for i, v in enumerate(values)
        ]

    draw.line(points(losses), fill=(110, 110, 110), width=1)
    draw.line(points(smooth), fill=(240, 240, 240), width=2)
    draw.text((6, 4), f"loss {smooth[-1]:.4f}", fill=(240, 240, 240))
    return image


def summary(result, paths: list[str], prompts: list[str], resumed_from: str | None = None) -> str:
    losses = result.losses
    span = max(1, len(losses) // 10)
    first, last = sum(losses[:span]) / span, sum(losses[-span:]) / span
    frozen = f"concept vectors frozen after step {result.frozen_at}" if result.frozen_at else "concept vectors learned to the end"
    lines = [
        f"Trained {result.edlora.concept_name} for {len(losses)} steps{f' more, from {resumed_from}' if resumed_from else ''}: "
        f"loss {first:.4f} (first {span}) -> {last:.4f} (last {span}).",
        frozen + ".",
        *[f"Saved {p}" for p in paths],
        f"Training prompt example: {prompts[0]}",
    ]
    return "\n".join(lines)


NODES = [LoadTrainingImages, TrainEDLoRA]
