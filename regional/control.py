"""Per-region strength of spatial control (ControlNet / T2I-Adapter), like the original's region adapter weights.

The original multiplies each adapter feature map by a weight map: the global adapter weight everywhere, overridden
by a region's weight inside its box. ComfyUI's apply nodes already scale control by their ``strength``, so the map
here is relative to it: ``region weight / base strength`` inside a box and 1 elsewhere (later boxes win overlaps).
"""

from __future__ import annotations

import re

import torch

from .spec import NUMBER, PIXEL_BOX, Box, RegionError

_WEIGHT_RE = re.compile(rf"{PIXEL_BOX}\s*-\s*({NUMBER})")


def parse_region_weights(text: str, width: int, height: int, notes: list[str] | None = None) -> list[tuple[Box, float]]:
    """``"[y1, x1, y2, x2]-w|..."`` (pixel boxes of a ``width x height`` image) -> ``[(box, w)]``.

    Boxes reaching outside the image are clipped to it; a note for each goes to ``notes`` when given."""
    out = []
    for index, part in enumerate(p.strip() for p in text.split("|") if p.strip()):
        match = _WEIGHT_RE.fullmatch(part)
        if match is None:
            raise RegionError(f"adapter weight {index + 1} ({part!r}): expected '[y1, x1, y2, x2]-weight' with plain numbers.")
        y1, x1, y2, x2, weight = (float(v) for v in match.groups())
        box, note = Box.from_pixels(y1, x1, y2, x2, width, height, f"adapter weight {index + 1} ({part!r})")
        if note and notes is not None:
            notes.append(note)
        if weight < 0:
            raise RegionError(f"adapter weight {index + 1} ({part!r}): the weight must not be negative.")
        out.append((box, weight))
    return out


def strength_map(boxes: list[tuple[Box, float]], base_strength: float, height: int, width: int) -> torch.Tensor:
    """The ``[height, width]`` multiplier for control features at one resolution; a box covers the cells it covers
    in region attention (:meth:`.spec.Box.cells`)."""
    if base_strength <= 0:
        raise RegionError("base_strength must be positive (the strength of the ControlNet/T2I-Adapter apply node).")
    grid = torch.ones(height, width)
    for box, weight in boxes:
        y0, y1, x0, x1 = box.cells(height, width)
        if y1 > y0 and x1 > x0:
            grid[y0:y1, x0:x1] = weight / base_strength
    return grid


def scale_control(control: dict | None, boxes, base_strength: float) -> dict | None:
    """A copy of ComfyUI's control residuals ``{"input"|"middle"|"output": [tensor | None]}`` scaled by the map."""
    if not control:
        return control
    out = {}
    for name, residuals in control.items():
        if not isinstance(residuals, list):
            out[name] = residuals
            continue
        scaled = []
        for residual in residuals:
            if residual is None or residual.dim() != 4:
                scaled.append(residual)
                continue
            grid = strength_map(boxes, base_strength, residual.shape[2], residual.shape[3]).to(residual)
            scaled.append(residual * grid)
        out[name] = scaled
    return out


class RegionalControlStrength:
    """DIFFUSION_MODEL wrapper applying :func:`scale_control` to the control residuals of every UNet call."""

    def __init__(self, boxes, base_strength: float):
        self.boxes = boxes
        self.base_strength = base_strength

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        return executor(
            x, timesteps, context, y, scale_control(control, self.boxes, self.base_strength), transformer_options, **kwargs
        )
