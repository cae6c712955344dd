"""Training images, subject masks and captions for single-client ED-LoRA tuning.

Images of any size become squares the way the original crops people: the short side is scaled to the training
resolution and the centre is kept (the subject is expected near the middle). Masks follow the same transform.
Captions mark the concept with ``<TOK>``; a missing caption becomes the template, and a caption that does not
mention ``<TOK>`` gets the template in front of it so the concept is always in the prompt it is trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..edlora.format import CONCEPT_WORD_RE, EDLoRAError

TOKEN = "<TOK>"
DEFAULT_TEMPLATE = "a photo of <TOK>"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_concept_words(text: str) -> list[str]:
    """``"<name1>+<name2>"`` -> ``["<name1>", "<name2>"]``; each word must look like ``<word>`` and be unique."""
    words = [w.strip() for w in text.split("+")]
    if not text.strip() or any(not w for w in words):
        raise EDLoRAError(f"concept_words {text!r}: write the concept's words joined by '+', e.g. <name1>+<name2>.")
    for word in words:
        if not CONCEPT_WORD_RE.fullmatch(word):
            raise EDLoRAError(
                f"concept_words: {word!r} is not a concept word; concept words are written in angle brackets "
                "without spaces, e.g. <potter1>."
            )
        if word == TOKEN:
            raise EDLoRAError(f"concept_words: {TOKEN} marks the concept in captions and cannot be a concept word.")
    if len(set(words)) != len(words):
        raise EDLoRAError(f"concept_words {text!r} names a word twice.")
    return words


def square_crop(image: torch.Tensor, resolution: int, mode: str = "bicubic") -> torch.Tensor:
    """``[H, W, C]`` -> ``[resolution, resolution, C]``: short side scaled to ``resolution``, centre kept."""
    height, width = image.shape[:2]
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    chw = image.permute(2, 0, 1).unsqueeze(0).float()
    if (new_h, new_w) != (height, width):
        antialias = mode in ("bilinear", "bicubic") and scale < 1
        chw = F.interpolate(chw, size=(new_h, new_w), mode=mode, align_corners=False, antialias=antialias)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    chw = chw[:, :, top : top + resolution, left : left + resolution]
    return chw.squeeze(0).permute(1, 2, 0).clamp(0.0, 1.0)


def prepare_images(
    images: list[torch.Tensor], masks: list[torch.Tensor] | None, resolution: int, names: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Square crops of ``images`` (each ``[H, W, 3]`` in 0..1) and of their ``masks`` (each ``[H, W]``).

    Returns ``([N, res, res, 3], [N, res, res] or None)``. An image must be at least ``resolution`` on its short side
    (upscaled photos teach the model blur); a mask must match its image's size and cover something. ``names`` (e.g.
    quoted file names) make the messages name the image instead of giving its position.
    """
    if resolution < 64 or resolution % 8:
        # ComfyUI's UNets take any latent size (their upsamplers follow the skip connections), so the VAE's 8-pixel
        # cell is the only constraint
        raise EDLoRAError(
            f"resolution {resolution}: use at least 64 and a multiple of 8 (512 for SD1.x as the original trains, 1024 for SDXL)."
        )
    if not images:
        raise EDLoRAError("No training images were given.")
    if masks is not None and len(masks) != len(images):
        raise EDLoRAError(f"{len(masks)} masks were given for {len(images)} images; give one mask per image or none.")
    out_images, out_masks = [], []
    for i, image in enumerate(images):
        if min(image.shape[0], image.shape[1]) < resolution:
            which = names[i] if names else str(i)
            raise EDLoRAError(
                f"Training image {which} is {image.shape[1]}x{image.shape[0]}, smaller than the training resolution "
                f"{resolution} on its short side: use images at least {resolution} px on the short side, or a lower resolution."
            )
        out_images.append(square_crop(image[..., :3], resolution))
        if masks is not None:
            mask = masks[i]
            if tuple(mask.shape[:2]) != tuple(image.shape[:2]):
                raise EDLoRAError(
                    f"Mask {i} is {tuple(mask.shape[:2])} but image {i} is {tuple(image.shape[:2])} (height, width)."
                )
            cropped = square_crop(mask[..., None], resolution, mode="bilinear")[..., 0]
            if float(cropped.max()) <= 0.0:
                raise EDLoRAError(f"Mask {i} is empty after cropping to the centre square; the subject must be visible.")
            out_masks.append(cropped)
    return torch.stack(out_images), (torch.stack(out_masks) if masks is not None else None)


def expand_captions(captions: str, count: int, concept: str, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One training prompt per image with ``<TOK>`` replaced by ``concept`` (its words joined by spaces).

    ``captions`` holds one caption per line, in image order; an empty line, or an entirely empty ``captions``,
    gives that image the template. A caption without ``<TOK>`` becomes ``"<template>, <caption>"``.
    """
    if TOKEN not in template:
        raise EDLoRAError(f"caption_template {template!r} must contain {TOKEN} where the concept goes.")
    lines = [line.strip() for line in captions.split("\n")] if captions.strip() else [""] * count
    while len(lines) > count and not lines[-1]:
        lines.pop()  # a trailing newline is not a caption
    if len(lines) != count:
        raise EDLoRAError(f"captions has {len(lines)} lines for {count} images; write one caption per image, one per line.")
    out = []
    for line in lines:
        if not line:
            line = template
        elif TOKEN not in line:
            line = f"{template}, {line}"
        out.append(line.replace(TOKEN, concept))
    return out


@dataclass(frozen=True)
class TrainingFiles:
    """The files a training folder contributes, per image (sorted by name): the image, its mask and caption paths
    (None where there is none)."""

    image_dir: str
    mask_dir: str
    names: tuple[str, ...]
    images: tuple[str, ...]
    masks: tuple[str | None, ...]
    captions: tuple[str | None, ...]


def training_files(folder: str) -> TrainingFiles:
    """Which files :func:`read_image_folder` reads from ``folder`` (two directory listings, no reading).

    Two layouts: the original Mix-of-Show dataset (``image/``, ``mask/``, ``caption/`` subfolders) and a flat folder
    (images with ``<name>.txt`` captions beside them and masks in ``mask/``). Masks are ``<name>.png``.
    """
    if not os.path.isdir(folder):
        raise EDLoRAError(f"Training image folder '{folder}' does not exist.")
    image_dir = os.path.join(folder, "image") if os.path.isdir(os.path.join(folder, "image")) else folder
    caption_dir = os.path.join(folder, "caption") if os.path.isdir(os.path.join(folder, "caption")) else image_dir
    mask_dir = os.path.join(folder, "mask")
    names = tuple(sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)))
    if not names:
        raise EDLoRAError(f"Training image folder '{image_dir}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")

    def existing(directory: str, stem: str, extension: str) -> str | None:
        path = os.path.join(directory, stem + extension)
        return path if os.path.isfile(path) else None

    stems = [os.path.splitext(n)[0] for n in names]
    return TrainingFiles(
        image_dir,
        mask_dir,
        names,
        tuple(os.path.join(image_dir, n) for n in names),
        tuple(existing(mask_dir, stem, ".png") for stem in stems),
        tuple(existing(caption_dir, stem, ".txt") for stem in stems),
    )


def read_image_folder(folder: str) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor] | None, list[str]]:
    """Images, masks and captions from ``folder`` (see :func:`training_files` for the layouts).

    Captions are the first line of ``<name>.txt`` (an empty string when there is none). Masks must exist for all
    images or for none.
    """
    from PIL import Image, ImageOps

    files = training_files(folder)
    images, masks, captions, missing_masks = [], [], [], []
    for name, path, mask_path, caption_path in zip(files.names, files.images, files.masks, files.captions, strict=True):
        try:
            with Image.open(path) as img:
                rgb = ImageOps.exif_transpose(img).convert("RGB")
        except OSError as exc:
            raise EDLoRAError(f"Training image '{path}' cannot be read: {exc}") from None
        images.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3) / 255.0)
        if mask_path is not None:
            try:
                with Image.open(mask_path) as m:
                    gray = ImageOps.exif_transpose(m).convert("L")
            except OSError as exc:
                raise EDLoRAError(f"Training mask '{mask_path}' cannot be read: {exc}") from None
            masks.append(torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(gray.height, gray.width) / 255.0)
        else:
            missing_masks.append(name)
        caption = ""
        if caption_path is not None:
            with open(caption_path, encoding="utf-8", errors="replace") as f:
                caption = f.readline().strip()
        captions.append(caption)
    if masks and missing_masks:
        raise EDLoRAError(
            f"'{files.mask_dir}' has masks for {len(masks)} of {len(files.names)} images (missing: {', '.join(missing_masks[:5])}); "
            "give every image a mask or remove the folder."
        )
    return list(files.names), images, (masks or None), captions
