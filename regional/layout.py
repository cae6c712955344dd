"""Layout images for spatial control from a picture: sketch, canny and lineart need no weights; pose needs them.

The preprocessors are controlnet_aux's (imported only when used). Outputs are ComfyUI IMAGE tensors
``[batch, height, width, 3]`` in [0, 1] at the input's size, white structure on black, as T2I-Adapter sketch /
ControlNet canny and lineart expect.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..edlora.files import read_torch
from .spec import RegionError

METHODS = ("sketch", "canny", "lineart_standard", "openpose")
OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")


def sketch_map(image: torch.Tensor) -> torch.Tensor:
    """Lines drawn dark on a light background (or already light on dark) -> light lines on black."""
    gray = image[..., :3].mean(dim=-1, keepdim=True)
    if float(gray.mean()) > 0.5:
        gray = 1.0 - gray
    return gray.expand(*gray.shape[:-1], 3).contiguous()


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _from_numpy(array, height: int, width: int) -> torch.Tensor:
    out = torch.from_numpy(np.asarray(array)).float() / 255.0
    if out.dim() == 2:
        out = out[..., None]
    if out.shape[-1] == 1:
        out = out.expand(*out.shape[:-1], 3)
    out = out.permute(2, 0, 1)[None]
    if out.shape[-2:] != (height, width):
        out = torch.nn.functional.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 1).contiguous()


def _controlnet_aux(method: str):
    try:
        import controlnet_aux
    except ImportError:
        raise RegionError(
            f"layout method {method!r} needs the controlnet_aux package, which is not installed in ComfyUI's Python: "
            "pip install -r custom_nodes/<this pack>/requirements.txt (or pip install controlnet_aux); 'sketch' works without it."
        ) from None
    return controlnet_aux


def layout_map(
    images: torch.Tensor, method: str, low_threshold: int = 100, high_threshold: int = 200, annotator_dir: str = ""
) -> torch.Tensor:
    """Apply ``method`` to every image of a ``[batch, height, width, channels]`` IMAGE."""
    if method not in METHODS:
        raise RegionError(f"unknown layout method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "sketch":
        return sketch_map(images)
    height, width = images.shape[1], images.shape[2]
    resolution = min(height, width)
    aux = _controlnet_aux(method)
    if method == "canny":
        detector = aux.CannyDetector()
        options = {"low_threshold": low_threshold, "high_threshold": high_threshold, "image_resolution": resolution}
    elif method == "lineart_standard":
        detector = aux.LineartStandardDetector()
        options = {}
    else:
        missing = (
            [f for f in OPENPOSE_FILES if not os.path.isfile(os.path.join(annotator_dir, f))]
            if annotator_dir
            else list(OPENPOSE_FILES)
        )
        if missing:
            raise RegionError(
                f"openpose needs the annotator weights {', '.join(OPENPOSE_FILES)} in a local folder "
                f"(annotator_dir={annotator_dir!r} lacks {', '.join(missing)}); nothing is downloaded. "
                "Use sketch/canny/lineart_standard, or feed a ready pose image to the adapter directly."
            )
        for name in OPENPOSE_FILES:
            # the library loads these with a plain torch.load; a weights-only read first refuses pickled code
            # whatever torch's default is, so the library's own load can only rebuild tensors
            read_torch(os.path.join(annotator_dir, name), name)
        detector = aux.OpenposeDetector.from_pretrained(annotator_dir)
        options = {"image_resolution": resolution}
    options.update(detect_resolution=resolution, output_type="np")
    return torch.stack([_from_numpy(detector(_to_uint8(image), **options), height, width) for image in images])
