"""Region specifications: a prompt, a negative prompt and where it applies (a soft mask or a box).

A :class:`Box` holds fractions ``(top, left, bottom, right)`` of the image; the original's string syntax
``[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...`` gives them in pixels of a ``width x height`` image. A box covers
the same cells of a feature grid wherever it is used (region attention and per-region adapter strength):
:meth:`Box.cells` is the one rasteriser.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..edlora.errors import MixOfShowError


class RegionError(MixOfShowError):
    """A region that cannot be used; the message names the region and the problem."""


#: A plain decimal number, and the original's pixel box ``[y1, x1, y2, x2]`` of four of them (groups 1-4).
NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
PIXEL_BOX = rf"\[\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*\]"


def _pixels(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


@dataclass(frozen=True)
class Box:
    """An axis-aligned box as fractions of the image: ``0 <= top < bottom <= 1``, ``0 <= left < right <= 1``."""

    top: float
    left: float
    bottom: float
    right: float

    @classmethod
    def from_pixels(
        cls, y1: float, x1: float, y2: float, x2: float, width: int, height: int, label: str
    ) -> tuple[Box, str | None]:
        """The original's pixel box ``[y1, x1, y2, x2]`` of a ``width x height`` image, clipped to the image, and a
        note saying so when it reached outside; a box with nothing inside the image is an error naming ``label``."""
        values = (y1, x1, y2, x2)
        if not all(math.isfinite(v) for v in values):
            raise RegionError(f"{label}: the box {list(values)} has a value that is not a finite number.")
        box = cls(max(0.0, y1 / height), max(0.0, x1 / width), min(1.0, y2 / height), min(1.0, x2 / width))
        if not box.is_valid():
            raise RegionError(
                f"{label}: the box [y1, x1, y2, x2] = {_pixels(values)} covers nothing of the {width}x{height} image "
                "(y1 < y2 and x1 < x2 are needed, inside 0..height and 0..width)."
            )
        clipped = (max(0.0, y1), max(0.0, x1), min(float(height), y2), min(float(width), x2))
        note = None
        if clipped != tuple(float(v) for v in values):
            note = (
                f"{label}: the box {_pixels(values)} reaches outside the {width}x{height} image; clipped to {_pixels(clipped)}."
            )
        return box, note

    def as_tuple(self) -> tuple[float, float, float, float]:
        return self.top, self.left, self.bottom, self.right

    def is_valid(self) -> bool:
        return 0.0 <= self.top < self.bottom <= 1.0 and 0.0 <= self.left < self.right <= 1.0

    def cells(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of the grid cells the box covers, mapped as the original does
        (start = ceil(fraction * size), end = floor(fraction * size)): a box smaller than a cell covers none."""
        return (
            math.ceil(self.top * height),
            math.floor(self.bottom * height),
            math.ceil(self.left * width),
            math.floor(self.right * width),
        )

    def rasterise(self, height: int, width: int) -> torch.Tensor:
        """Binary ``[height, width]`` coverage of the box on a feature grid."""
        y0, y1, x0, x1 = self.cells(height, width)
        out = torch.zeros(height, width)
        if y1 > y0 and x1 > x0:
            out[y0:y1, x0:x1] = 1.0
        return out


@dataclass(frozen=True)
class Region:
    prompt: str
    negative: str = ""
    box: Box | None = None
    mask: torch.Tensor | None = None  # [height, width], values in [0, 1]

    def label(self, index: int) -> str:
        text = self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "..."
        return f"region {index + 1} ({text!r})"

    def validate(self, index: int) -> None:
        if not self.prompt.strip():
            raise RegionError(f"{self.label(index)}: the prompt is empty.")
        if (self.box is None) == (self.mask is None):
            raise RegionError(f"{self.label(index)}: give either a box or a mask.")
        if self.box is not None:
            if not self.box.is_valid():
                raise RegionError(
                    f"{self.label(index)}: box (top, left, bottom, right) = {self.box.as_tuple()} must satisfy "
                    "0 <= top < bottom <= 1 and 0 <= left < right <= 1."
                )
        else:
            if self.mask.dim() != 2:
                raise RegionError(f"{self.label(index)}: mask must be 2-D [height, width], got {tuple(self.mask.shape)}.")
            if float(self.mask.max()) <= 0.0:
                raise RegionError(f"{self.label(index)}: the mask is empty (all zero); paint the area the region covers.")


def parse_original_syntax(text: str, width: int, height: int, notes: list[str] | None = None) -> list[Region]:
    """Parse ``[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...`` (pixel boxes, top-left-bottom-right; ``[]`` = whole image).

    Boxes reaching outside the image are clipped to it; a note for each goes to ``notes`` when given."""
    regions = []
    for index, part in enumerate(p for p in text.split("|") if p.strip()):
        fields = part.split("-*-")
        if len(fields) != 3:
            raise RegionError(f"region {index + 1} ({part.strip()[:40]!r}): expected '[prompt]-*-[negative]-*-[y1, x1, y2, x2]'.")
        prompt, negative, box_text = (f.strip() for f in fields)
        prompt = prompt.replace("[", "").replace("]", "").strip()
        negative = negative.replace("[", "").replace("]", "").strip()
        box = Box(0.0, 0.0, 1.0, 1.0)
        if box_text.replace(" ", "") != "[]":
            match = re.fullmatch(PIXEL_BOX, box_text)
            if match is None:
                raise RegionError(
                    f"region {index + 1} ({prompt[:40]!r}): the box {box_text!r} must look like [y1, x1, y2, x2] "
                    "(4 plain numbers; [] for the whole image)."
                )
            box, note = Box.from_pixels(
                *(float(n) for n in match.groups()), width, height, f"region {index + 1} ({prompt[:40]!r})"
            )
            if note and notes is not None:
                notes.append(note)
        region = Region(prompt, negative, box=box)
        region.validate(index)
        regions.append(region)
    if not regions:
        raise RegionError("the region text holds no region.")
    return regions


#: Pixels per latent cell of the SD1.x/SDXL VAEs, to name image sizes in messages about latents.
LATENT_SCALE = 8


def mask_fits(mask: torch.Tensor, height: int, width: int) -> bool:
    """True when a ``[h, w]`` mask has the aspect ratio of a ``height x width`` grid (within a cell)."""
    mh, mw = mask.shape
    return abs(mh / mw - height / width) <= 0.02 * (height / width) + 1.0 / min(height, width)


def check_masks_fit(regions, latent_height: int, latent_width: int) -> None:
    """Refuse, before sampling starts, region masks whose aspect ratio is not the image's (a latent of that size)."""
    for index, region in enumerate(regions):
        if region.mask is not None and not mask_fits(region.mask, latent_height, latent_width):
            mh, mw = region.mask.shape
            raise RegionError(
                f"{region.label(index)}: the mask is {mw}x{mh} but the image is "
                f"{latent_width * LATENT_SCALE}x{latent_height * LATENT_SCALE} (latent {latent_width}x{latent_height}), "
                "another aspect ratio; make the mask the size of the image."
            )


def mask_weights(mask: torch.Tensor, height: int, width: int, label: str = "region") -> torch.Tensor:
    """A soft mask resized to a ``height x width`` feature grid (area averaging when shrinking)."""
    mh, mw = mask.shape
    if not mask_fits(mask, height, width):
        raise RegionError(f"{label}: the mask is {mw}x{mh} but this feature grid is {width}x{height}, another aspect ratio.")
    grid = mask.float()[None, None]
    mode = "area" if mh >= height and mw >= width else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(grid, size=(height, width), mode=mode, **kwargs)[0, 0].clamp(0.0, 1.0)


def region_weights(region: Region, height: int, width: int, label: str = "region") -> torch.Tensor:
    """The region's coverage weights on a ``height x width`` grid."""
    if region.box is not None:
        return region.box.rasterise(height, width)
    return mask_weights(region.mask, height, width, label)
