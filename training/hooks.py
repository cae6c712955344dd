"""What makes a ComfyUI model trainable for a while and leaves it exactly as it was afterwards.

* :func:`autograd_usable`: ComfyUI loads weights under ``torch.inference_mode``; such tensors cannot take part in
  autograd, so during a run they are swapped for ordinary copies with the same values and put back afterwards.
* :func:`layer_norm_inputs_kept`: ComfyUI's CLIP updates its residual stream in place, which breaks backward.
* :func:`checkpointed_blocks`: gradient checkpointing of UNet blocks.
* :class:`LoRAHooks`: trainable rank-r adapters added to Linear outputs by forward hooks (``y = W x + up(down(x))``).
* :class:`AttentionProbe`: explicit cross-attention that keeps the maps the attention regulariser needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.utils.checkpoint

from ..edlora.format import EDLoRAError, LoRAPair
from ..edlora.targets import Target


@contextmanager
def autograd_usable(*modules: torch.nn.Module) -> Iterator[None]:
    """Within the block, weights created under ``torch.inference_mode`` are replaced by ordinary copies and no
    base weight requires a gradient; afterwards every tensor object is back in place unchanged."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    frozen: list[torch.nn.Parameter] = []
    copies: dict[int, torch.Tensor] = {}
    try:
        with torch.inference_mode(False):
            for root in modules:
                for module in root.modules():
                    for store in (module._parameters, module._buffers):
                        for name, tensor in list(store.items()):
                            if tensor is None:
                                continue
                            if tensor.is_inference():
                                copy = copies.get(id(tensor))
                                if copy is None:
                                    copy = tensor.clone()
                                    if isinstance(tensor, torch.nn.Parameter):
                                        copy = torch.nn.Parameter(copy, requires_grad=False)
                                    copies[id(tensor)] = copy
                                swapped.append((store, name, tensor))
                                store[name] = copy
                            elif isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
                                tensor.requires_grad_(False)
                                frozen.append(tensor)
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor
        for tensor in frozen:
            tensor.requires_grad_(True)


@contextmanager
def layer_norm_inputs_kept(root: torch.nn.Module) -> Iterator[None]:
    """Give every LayerNorm in ``root`` a copy of its input while the block lasts.

    ComfyUI's CLIP layers update the residual stream in place (``x += attn(norm(x))``), which is fine for
    inference but destroys the input LayerNorm saved for its backward pass. A copy per LayerNorm is the
    smallest change that makes the text encoder trainable without touching ComfyUI's code.
    """
    handles = []
    try:
        for module in root.modules():
            if isinstance(module, torch.nn.LayerNorm):
                handles.append(module.register_forward_pre_hook(lambda _module, args: (args[0].clone(), *args[1:])))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def checkpointed_blocks(diffusion_model: torch.nn.Module) -> Iterator[int]:
    """Recompute every UNet res block and spatial transformer in the backward pass instead of keeping its
    activations (less memory, about a third more time). Yields how many layers are checkpointed.

    Each call gets its own shallow copy of ``transformer_options``: the UNet rewrites ``block`` for every block, and
    the recomputation must see the values of the original call or cross-attention would be routed to the wrong layer.
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    blocks = [*getattr(diffusion_model, "input_blocks", []), getattr(diffusion_model, "middle_block", None)]
    blocks += list(getattr(diffusion_model, "output_blocks", []))
    layers = [
        layer for block in blocks if block is not None for layer in block if isinstance(layer, (ResBlock, SpatialTransformer))
    ]

    def wrap(layer):
        original = layer.forward

        def forward(*args, **kwargs):
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

        return forward

    try:
        for layer in layers:
            layer.forward = wrap(layer)
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


class LoRAHooks:
    """Trainable rank-r adapters on Linear modules, added to their outputs by forward hooks while attached."""

    def __init__(self, root: torch.nn.Module, targets: list[Target], start: dict[str, LoRAPair], device):
        missing = [t.name for t in targets if t.name not in start]
        if missing:
            raise EDLoRAError(f"The starting ED-LoRA has no LoRA for '{missing[0]}' ({len(missing)} modules missing).")
        self.targets = targets
        self.modules = [root.get_submodule(t.module_path) for t in targets]
        self.down = [torch.nn.Parameter(start[t.name].down.float().to(device).clone()) for t in targets]
        self.up = [torch.nn.Parameter(start[t.name].up.float().to(device).clone()) for t in targets]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.down, *self.up]

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        try:
            for module, down, up in zip(self.modules, self.down, self.up, strict=True):
                handles.append(module.register_forward_hook(_lora_hook(down, up)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def pairs(self) -> dict[str, LoRAPair]:
        return {
            t.name: LoRAPair(down=d.detach().float().cpu().clone(), up=u.detach().float().cpu().clone())
            for t, d, u in zip(self.targets, self.down, self.up, strict=True)
        }


def _lora_hook(down: torch.Tensor, up: torch.Tensor):
    def hook(module, args, output):
        x = args[0]
        return output + ((x.to(down.dtype) @ down.t()) @ up.t()).to(output.dtype)

    return hook


class AttentionProbe:
    """attn2_replace patch: explicit cross-attention that keeps each layer's head-averaged attention to the
    concept-word positions of each image (set :attr:`positions`, ``[B, words]``, before the UNet call)."""

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.maps: list[tuple[torch.Tensor, tuple[int, int]]] = []

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        batch, pixels, inner = q.shape
        dim = inner // heads
        qh = q.reshape(batch, pixels, heads, dim).transpose(1, 2)
        kh = k.reshape(batch, -1, heads, dim).transpose(1, 2)
        vh = v.reshape(batch, -1, heads, dim).transpose(1, 2)
        probs = ((qh.float() @ kh.float().transpose(-1, -2)) * dim**-0.5).softmax(dim=-1)
        if self.positions is not None and self.positions.shape[0] == batch:
            index = self.positions.to(probs.device)[:, None, :].expand(-1, pixels, -1)
            shape = extra_options.get("activations_shape")
            side = math.isqrt(pixels)  # training crops are square
            grid = tuple(shape[-2:]) if shape is not None else (side, side)
            self.maps.append((probs.mean(dim=1).gather(-1, index), grid))
        return (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(batch, pixels, inner)
