"""A fused model as one ordinary LoRA file, for core LoraLoader and other tools that never heard of Mix-of-Show.

A fusion is a set of weight differences against the base. ``rank = 0`` writes them exactly, as ``.diff`` (and
``.diff_b`` for biases) entries that ComfyUI's LoRA loader applies as they are; the file is as large as the
fused layers. ``rank = r`` writes each difference as its best rank-``r`` approximation (truncated SVD:
``up = U_r S_r``, ``down = V_r^T``, ``alpha = r`` so the scale is 1), which is exact for layers whose difference has
rank at most ``r`` (a single LoRA of rank ``r``) and otherwise leaves out the smaller singular values; the relative
error of every layer is reported. Module names are kohya's (``lora_unet_<diffusers path>``, ``lora_te_...``), which
ComfyUI, A1111-style UIs and kohya's tools read. Concept words' layer-wise vectors cannot be expressed in a LoRA:
ED-LoRA concepts keep needing the bundle (MoS Load Fused); ordinary LoRA concepts work with their trigger words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import comfy.lora
import comfy.utils
import torch

from .results import FusedModel, FusionError


@dataclass
class ExportReport:
    layers: int
    exact: int
    max_error: float  # largest relative Frobenius error of a layer's difference
    mean_error: float

    def text(self, rank: int) -> str:
        if rank == 0:
            return f"{self.layers} layers written exactly (full differences)."
        return (
            f"{self.layers} layers at rank {rank}: {self.exact} exact; relative error of the others' differences "
            f"mean {self.mean_error:.4f}, max {self.max_error:.4f}."
        )


def lora_names(model, clip) -> dict[str, str]:
    """``model or clip weight key -> kohya LoRA module name`` for every weight ComfyUI's loader maps back to it."""
    names: dict[str, str] = {}
    if model is not None:
        for key in model.model.state_dict():
            if key.startswith("diffusion_model.") and key.endswith(".weight"):
                names[key] = "lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        for dkey, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
            if dkey.endswith(".weight") and f"diffusion_model.{ldm}" in names:
                names[f"diffusion_model.{ldm}"] = "lora_unet_" + dkey[: -len(".weight")].replace(".", "_")
    if clip is not None:
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        # SDXL LoRAs name CLIP-L lora_te1_ and CLIP-G lora_te2_ (core maps lora_te_ onto CLIP-L too); SD1.x: lora_te_
        two_encoders = any(name.startswith("lora_te2_") for name in clip_map)
        preferred = ("lora_te1_", "lora_te2_", "lora_te_") if two_encoders else ("lora_te_", "lora_te1_", "lora_te2_")
        for name, key in sorted(clip_map.items()):
            if isinstance(key, str) and name.startswith(preferred):
                current = names.get(key)
                if current is None or preferred.index(_prefix(name)) < preferred.index(_prefix(current)):
                    names[key] = name
    return names


def _prefix(name: str) -> str:
    for prefix in ("lora_te1_", "lora_te2_", "lora_te_"):
        if name.startswith(prefix):
            return prefix
    return name


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, relative error)`` of the best rank-``rank`` approximation of a weight difference, in the LoRA
    layout of its weight (Linear ``[out, r] @ [r, in]``; convolutions ``[out, r, 1, 1]`` and ``[r, in, k, k]``)."""
    matrix = diff.double().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[0])
    total = float((s**2).sum())
    error = (float((s[r:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
    up = (u[:, :r] * s[:r]).float()
    down = vh[:r].float()
    if diff.dim() == 4:
        up = up.reshape(diff.shape[0], r, 1, 1)
        down = down.reshape(r, *diff.shape[1:])
    return up.contiguous(), down.contiguous(), error


def export_lora(fused: FusedModel, model, clip, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str], ExportReport]:
    """``(tensors, metadata, report)`` of the LoRA file that reproduces ``fused`` on its base (see the module doc)."""
    if rank < 0:
        raise FusionError(f"rank must be 0 (exact) or more, got {rank}.")
    names = lora_names(model, clip)
    tensors: dict[str, torch.Tensor] = {}
    errors: list[float] = []
    for key, diff in sorted({**fused.unet_diffs, **fused.text_diffs}.items()):
        weight_key = key[: -len(".bias")] + ".weight" if key.endswith(".bias") else key
        if weight_key not in names:
            raise FusionError(f"the fused weight '{key}' has no LoRA name in the connected model; is it the fusion's base?")
        name = names[weight_key]
        if key.endswith(".bias") or diff.dim() < 2:
            tensors[f"{name}.diff_b" if key.endswith(".bias") else f"{name}.diff"] = diff.float().contiguous()
        elif rank == 0:
            tensors[f"{name}.diff"] = diff.float().contiguous()
        else:
            up, down, error = low_rank(diff, rank)
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
            errors.append(error)
    layers = len(fused.unet_diffs) + len(fused.text_diffs)
    report = ExportReport(
        layers=layers,
        exact=layers - sum(1 for e in errors if e >= 1e-6),
        max_error=max(errors, default=0.0),
        mean_error=sum(errors) / len(errors) if errors else 0.0,
    )
    words = fused.concepts.words
    metadata = {
        "ss_network_module": "networks.lora",
        "mixofshow.fused_from": fused.concepts.describe(),
        "mixofshow.method": fused.method,
        "mixofshow.export_rank": str(rank),
        "mixofshow.export_report": report.text(rank),
        "mixofshow.base_fingerprint": fused.base_fingerprint,
        "mixofshow.concept_words_not_included": json.dumps(words),
    }
    return tensors, metadata, report
