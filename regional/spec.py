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


class RegionError(ValueError):
    """A region that cannot be used; the message names the region and the problem."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box as fractions of the image: ``0 <= top < bottom <= 1``, ``0 <= left < right <= 1``."""

    top: float
    left: float
    bottom: float
    right: float

    @classmethod
    def from_pixels(cls, y1: float, x1: float, y2: float, x2: float, width: int, height: int) -> Box:
        """The original's pixel box ``[y1, x1, y2, x2]`` of a ``width x height`` image, clipped to the image."""
        return cls(max(0.0, y1 / height), max(0.0, x1 / width), min(1.0, y2 / height), min(1.0, x2 / width))

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


def parse_original_syntax(text: str, width: int, height: int) -> list[Region]:
    """Parse ``[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...`` (pixel boxes, top-left-bottom-right; ``[]`` = whole image)."""
    regions = []
    for index, part in enumerate(p for p in text.split("|") if p.strip()):
        fields = part.split("-*-")
        if len(fields) != 3:
            raise RegionError(f"region {index + 1} ({part.strip()[:40]!r}): expected '[prompt]-*-[negative]-*-[y1, x1, y2, x2]'.")
        prompt, negative, box_text = (f.strip() for f in fields)
        prompt = prompt.replace("[", "").replace("]", "").strip()
        negative = negative.replace("[", "").replace("]", "").strip()
        numbers = re.findall(r"-?\d+(?:\.\d+)?", box_text)
        if not box_text.strip().startswith("[") or not box_text.strip().endswith("]"):
            raise RegionError(f"region {index + 1} ({prompt[:40]!r}): the box {box_text!r} must look like [y1, x1, y2, x2].")
        if numbers and len(numbers) != 4:
            raise RegionError(f"region {index + 1} ({prompt[:40]!r}): the box {box_text!r} needs 4 numbers (y1, x1, y2, x2).")
        box = Box.from_pixels(*(float(n) for n in numbers), width, height) if numbers else Box(0.0, 0.0, 1.0, 1.0)
        region = Region(prompt, negative, box=box)
        region.validate(index)
        regions.append(region)
    if not regions:
        raise RegionError("the region text holds no region.")
    return regions


def mask_weights(mask: torch.Tensor, height: int, width: int, label: str = "region") -> torch.Tensor:
    """A soft mask resized to a ``height x width`` feature grid (area averaging when shrinking)."""
    mh, mw = mask.shape
    if abs(mh / mw - height / width) > 0.02 * (height / width) + 1.0 / min(height, width):
        raise RegionError(
            f"{label}: the mask is {mw}x{mh} but the image's aspect ratio is {width}x{height}; "
            "make the mask the size of the image (or of its latent)."
        )
    grid = mask.float()[None, None]
    mode = "area" if mh >= height and mw >= width else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(grid, size=(height, width), mode=mode, **kwargs)[0, 0].clamp(0.0, 1.0)


def region_weights(region: Region, height: int, width: int, label: str = "region") -> torch.Tensor:
    """The region's coverage weights on a ``height x width`` grid."""
    if region.box is not None:
        return region.box.rasterise(height, width)
    return mask_weights(region.mask, height, width, label)
