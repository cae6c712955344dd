"""Streaming capture of layer inputs into Gram statistics with forward hooks.

Layers that read the same input share one :class:`~.stats.GramGroup` (q/k/v of a self-attention, k/v of a
cross-attention, q/k/v of a CLIP attention); the group is computed once per forward call. A hook checks that
the members of a group really received the same tensor, so another pack's attention patch that changes those
inputs stops fusion with a clear error instead of fusing the wrong statistics.

A row is what the layer multiplies by its weight matrix: a token's features for a Linear layer, a pixel's channels
for a 1x1 convolution, and the unfolded ``in_channels x k x k`` patch around each output pixel for a ``k x k`` one
(so ``W.flatten(1) @ patch`` is the convolution exactly).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .results import FusionError
from .stats import GramGroup

_SHARED_INPUT = [
    (re.compile(r"^(?P<base>.*\.attn1)\.to_(q|k|v)\.weight$"), "qkv"),
    (re.compile(r"^(?P<base>.*\.attn2)\.to_(k|v)\.weight$"), "kv"),
    (re.compile(r"^(?P<base>.*\.self_attn)\.(q|k|v)_proj\.weight$"), "qkv"),
]


def input_group(key: str) -> str:
    """The statistics group of a weight key: shared by projections that read the same input."""
    for pattern, suffix in _SHARED_INPUT:
        match = pattern.match(key)
        if match:
            return f"{match.group('base')}.{suffix}"
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _call_order(key: str) -> tuple:
    """Projections of one attention run q, k, v in that order: the first of a group computes its statistics."""
    for rank, role in enumerate(("to_q.", "q_proj.", "to_k.", "k_proj.", "to_v.", "v_proj.")):
        if role in key:
            return (key.rsplit(role, 1)[0], rank // 2)
    return (key, 0)


class FusionCaptureError(FusionError):
    """Another patch changed a layer's input under fusion's hooks; fusing such statistics would be wrong."""


def input_rows(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[rows, width]``: the vectors ``module`` multiplies by its (flattened) weight for input ``x``."""
    if isinstance(module, torch.nn.Conv2d):
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0):
            return x.movedim(1, -1).reshape(-1, x.shape[1])
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class GramCapture:
    """Context manager: hooks ``root``'s modules named by ``keys`` (weight keys relative to ``root``).

    ``row_mask`` (set by the caller before each forward, ``[batch, tokens]`` bool) selects which rows count; None
    means every row. A dict of masks by key prefix (``{"clip_l.": ..., "clip_g.": ...}``) serves models whose text
    encoders see different token lists. Rows are multiplied in ``compute_dtype`` on ``device`` and summed in float64.
    """

    def __init__(self, root: torch.nn.Module, keys: list[str], device, compute_dtype=torch.float32, prefix: str = ""):
        self.root = root
        self.keys = list(keys)
        self.device = device
        self.compute_dtype = compute_dtype
        self.prefix = prefix
        self.groups: dict[str, GramGroup] = {}
        self.row_mask: torch.Tensor | None = None
        self._group_of = {key: input_group(key) for key in self.keys}
        self._owner = {}
        for key in sorted(self.keys, key=_call_order):
            self._owner.setdefault(self._group_of[key], key)
        self._last_input: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> GramCapture:
        for key in self.keys:
            path = key[len(self.prefix) :] if key.startswith(self.prefix) else key
            module = self.root.get_submodule(path[: -len(".weight")])
            self._handles.append(module.register_forward_pre_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input.clear()

    def reset(self) -> dict[str, GramGroup]:
        """Return the groups gathered so far and start empty (one concept's statistics).

        The model runs under ``torch.inference_mode`` while it is recorded (see :func:`model_pass`), so groups made
        there are inference tensors; the copies returned are ordinary ones the solvers can differentiate through."""
        groups, self.groups = self.groups, {}
        self._last_input.clear()
        return {name: group.copy() for name, group in groups.items()}

    def _hook(self, key: str):
        group = self._group_of[key]
        owner = self._owner[group] == key

        def hook(module, args):
            x = args[0]
            if not owner:
                if self._last_input.get(group) is not x:
                    raise FusionCaptureError(
                        f"Gradient fusion expects '{key}' to read the same input as '{self._owner[group]}', but another "
                        "attention patch changed it. Fuse on a model without other attention patches."
                    )
                return None
            self._last_input[group] = x
            rows = x.detach()
            mask = self.row_mask
            if isinstance(mask, dict):
                mask = next((m for prefix, m in mask.items() if key.startswith(prefix)), None)
            if mask is not None:
                mask = mask.to(rows.device)
                if rows.shape[:-1] != mask.shape:
                    raise FusionCaptureError(f"row mask {tuple(mask.shape)} does not fit input {tuple(rows.shape)} of '{key}'")
                rows = rows[mask]
            else:
                rows = input_rows(module, rows)
            rows = rows.reshape(-1, rows.shape[-1]).to(device=self.device, dtype=self.compute_dtype)
            if group not in self.groups:
                self.groups[group] = GramGroup.empty(rows.shape[-1], device=self.device)
            self.groups[group].add_rows(rows)
            return None

        return hook


def model_pass():
    """The context every recorded model call runs in: ``torch.inference_mode``, as ComfyUI runs its nodes.

    ComfyUI loads, patches and casts weights expecting inference mode; outside it, on CUDA, its weight casting meets
    the inference tensors it loaded and fails ("Inference tensors do not track version counter"). What a pass returns
    is cloned outside before any view or solver touches it."""
    return torch.inference_mode()
