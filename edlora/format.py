"""Reading, validating and writing ED-LoRA files.

Three on-disk forms are understood:

* the original Mix-of-Show ``.pth`` (``torch.save`` of ``{"params": {"new_concept_embedding", "text_encoder",
  "unet"}}``, with or without the ``params`` wrapper, in either LoRA key spelling, see :mod:`.keys`);
* this pack's ``.safetensors``: flat tensors ``embedding.<i>``, ``unet.<module>.lora_{down,up}.weight``,
  ``text_encoder.<module>.lora_{down,up}.weight`` plus JSON metadata naming the concept words in order. Version 2
  also records the architecture, the text encoders (``[["l", 768], ["g", 1280]]`` for SDXL: a concept vector is their
  vectors concatenated in that order) and the layer map (which spatial transformer each layer-wise vector serves),
  so a file is never applied to another architecture silently. Version 1 (SD1.x, one CLIP-L) still reads;
* export only: a standard kohya-style LoRA (see :func:`to_kohya_state_dict`).

On models with several text encoders the text-encoder modules are named with the encoder first
(``g.text_model.encoder.layers.0.self_attn.q_proj``); on SD1.x without (as the original writes them).

``.pth`` files are untrusted pickles and are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from . import keys as edkeys
from .arch import architecture_name
from .errors import ModelFileError
from .files import atomic_write, check_format, is_safetensors, read_safetensors, read_torch, write_safetensors

FORMAT_NAME = "mixofshow.edlora"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
CONCEPT_WORD_RE = re.compile(r"<[^<>\s]+>")


class EDLoRAError(ModelFileError):
    """A file or value that is not a usable ED-LoRA; the message names the file or input and the problem."""


@dataclass(frozen=True)
class LoRAPair:
    """One low-rank adapter: ``delta = up @ down`` (no division by rank, as in Mix-of-Show)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight delta ``up @ down``, shaped like the adapted Linear/1x1-conv weight."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        out = up @ down
        if self.down.dim() == 4:
            out = out.reshape(self.up.shape[0], self.down.shape[1], *self.down.shape[2:])
        return out


@dataclass
class EDLoRA:
    """An ED-LoRA: layer-wise embeddings of its concept words plus LoRA adapters.

    ``embeddings`` maps each concept word (``"<potter1>"``) to a ``[layers, width]`` tensor, in the order the
    words make up the concept. ``unet`` and ``text_encoder`` map diffusers module paths to :class:`LoRAPair`.
    """

    embeddings: dict[str, torch.Tensor]
    unet: dict[str, LoRAPair]
    text_encoder: dict[str, LoRAPair]
    name: str = "<memory>"
    metadata: dict[str, str] = field(default_factory=dict)
    #: the text encoders a concept vector spans, in order, with their widths; empty: one CLIP-L (SD1.x, as the
    #: original files are), as wide as the vectors
    encoders: dict[str, int] = field(default_factory=dict)
    #: which spatial transformer each layer-wise vector serves, ``[(block name, block id), ...]``; empty: unrecorded
    layer_map: list[tuple[str, int]] = field(default_factory=list)

    def encoder_widths(self) -> dict[str, int]:
        """``{encoder: width}`` of its vectors (``{"l": width}`` for files that do not say)."""
        return dict(self.encoders) if self.encoders else ({"l": self.width} if self.embeddings else {})

    @property
    def architecture(self) -> str:
        return architecture_name(self.encoder_widths()) if self.embeddings else "unknown"

    @property
    def words(self) -> list[str]:
        return list(self.embeddings)

    @property
    def concept_name(self) -> str:
        """The concept as written in prompts: its words joined by spaces (``"<potter1> <potter2>"``)."""
        return " ".join(self.embeddings)

    @property
    def layers(self) -> int:
        return int(next(iter(self.embeddings.values())).shape[0]) if self.embeddings else 0

    @property
    def width(self) -> int:
        return int(next(iter(self.embeddings.values())).shape[1]) if self.embeddings else 0

    @property
    def rank(self) -> int:
        for pairs in (self.unet, self.text_encoder):
            for pair in pairs.values():
                return pair.rank
        return 0


# ----------------------------------------------------------------------------------------------- reading


def load_edlora(path: str, name: str | None = None) -> EDLoRA:
    """Read an ED-LoRA from ``path`` (``.pth``/``.pt``/``.bin`` or ``.safetensors``/``.sft``) and validate it."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise EDLoRAError(f"ED-LoRA file '{name}' does not exist ({path}).")
    if is_safetensors(path):
        return _read_safetensors(path, name)
    return edlora_from_state(read_torch(path, name, EDLoRAError), name)


def _read_safetensors(path: str, name: str) -> EDLoRA:
    tensors, metadata = read_safetensors(path, name, EDLoRAError)
    if metadata.get("format_name") != FORMAT_NAME:
        raise EDLoRAError(f"'{name}' is a safetensors file but not an ED-LoRA: {_describe_foreign(tensors)}")
    version = check_format(metadata, name, FORMAT_NAME, READABLE_VERSIONS, EDLoRAError)
    try:
        words = json.loads(metadata["concept_words"])
    except (KeyError, json.JSONDecodeError):
        raise EDLoRAError(f"'{name}': metadata 'concept_words' is missing or not a JSON list.") from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise EDLoRAError(f"'{name}': metadata 'concept_words' must be a JSON list of strings.")
    embeddings = {}
    for i, word in enumerate(words):
        key = f"embedding.{i}"
        if key not in tensors:
            raise EDLoRAError(f"'{name}': concept word {word} has no tensor '{key}'.")
        embeddings[word] = tensors.pop(key)
    sections: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for key, tensor in tensors.items():
        section, _, rest = key.partition(".")
        if section not in sections or not rest:
            raise EDLoRAError(f"'{name}': unexpected tensor '{key}' (expected embedding.<i>, unet.* or text_encoder.*).")
        sections[section][rest] = tensor
    state = {"new_concept_embedding": embeddings, **sections}
    layout = ("format_name", "format_version", "concept_words", "architecture", "encoders", "layer_map")
    extra = {k: v for k, v in metadata.items() if k not in layout}
    edlora = edlora_from_state(state, name)
    edlora.metadata = extra
    if version != "1":
        edlora.encoders, edlora.layer_map = _read_layout(metadata, name, edlora)
    return edlora


def _read_layout(metadata: dict, name: str, edlora: EDLoRA) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """The text encoders and layer map a version-2 file records, checked against its tensors."""
    try:
        encoders = {str(n): int(w) for n, w in json.loads(metadata.get("encoders", "[]"))}
        layer_map = [(str(b), int(i)) for b, i in json.loads(metadata.get("layer_map", "[]"))]
    except (json.JSONDecodeError, TypeError, ValueError):
        raise EDLoRAError(f"'{name}': metadata 'encoders' or 'layer_map' is malformed; the file is damaged.") from None
    if encoders and sum(encoders.values()) != edlora.width:
        raise EDLoRAError(
            f"'{name}': its text encoders {encoders} add up to {sum(encoders.values())} but its vectors are {edlora.width} wide."
        )
    if layer_map and len(layer_map) != edlora.layers:
        raise EDLoRAError(f"'{name}': its layer map lists {len(layer_map)} layers but it holds {edlora.layers} vectors per word.")
    return encoders, layer_map


def _describe_foreign(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "it looks like a standard (kohya) LoRA; load it with ComfyUI's LoraLoader instead."
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "it looks like a full Stable Diffusion checkpoint; load it with a checkpoint loader."
    if any(k.startswith(("string_to_param", "emb_params", "clip_l", "clip_g")) for k in keys):
        return "it looks like a textual-inversion embedding; put it in models/embeddings instead."
    sample = ", ".join(keys[:3]) if keys else "no tensors"
    return f"no ED-LoRA sections found (first keys: {sample})."


def edlora_from_state(state, name: str = "<memory>") -> EDLoRA:
    """Build and validate an :class:`EDLoRA` from an original-format state (with or without ``params``)."""
    if not isinstance(state, dict):
        raise EDLoRAError(f"'{name}' is not an ED-LoRA: it holds a {type(state).__name__}, not a dict.")
    if "params" in state and isinstance(state["params"], dict) and len(state) == 1:
        state = state["params"]
    sections = ("new_concept_embedding", "text_encoder", "unet")
    if not any(s in state for s in sections):
        inner = state.get("state_dict") if isinstance(state.get("state_dict"), dict) else state
        raise EDLoRAError(f"'{name}' is not an ED-LoRA: {_describe_foreign(k for k in inner if isinstance(k, str))}")
    for section in sections:
        value = state.get(section, {})
        if not isinstance(value, dict):
            raise EDLoRAError(f"'{name}': section '{section}' must be a dict, found {type(value).__name__}.")
    embeddings = validate_embeddings(state.get("new_concept_embedding", {}), name)
    unet = _pair_up(state.get("unet", {}), "unet", name)
    text = _pair_up(state.get("text_encoder", {}), "text_encoder", name)
    if not embeddings:
        raise EDLoRAError(
            f"'{name}' has no concept embeddings ('new_concept_embedding' is empty), so no concept word can be prompted."
        )
    return EDLoRA(embeddings=embeddings, unet=unet, text_encoder=text, name=name)


def validate_embeddings(raw: dict, name: str) -> dict[str, torch.Tensor]:
    embeddings: dict[str, torch.Tensor] = {}
    shape = None
    for word, tensor in raw.items():
        if not isinstance(word, str) or not CONCEPT_WORD_RE.fullmatch(word):
            raise EDLoRAError(f"'{name}': concept word {word!r} is not of the form <name> (angle brackets, no spaces).")
        if not torch.is_tensor(tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
            got = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise EDLoRAError(f"'{name}': embedding of {word} must be a float tensor [layers, width], found {got}.")
        if shape is not None and tuple(tensor.shape) != shape:
            raise EDLoRAError(f"'{name}': embedding of {word} has shape {tuple(tensor.shape)}, other words have {shape}.")
        if not torch.isfinite(tensor).all():
            raise EDLoRAError(f"'{name}': embedding of {word} contains NaN or infinite values.")
        shape = tuple(tensor.shape)
        embeddings[word] = tensor.detach().to(torch.float32).contiguous()
    return embeddings


def _pair_up(raw: dict, section: str, name: str) -> dict[str, LoRAPair]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        split = edkeys.split_lora_key(key) if isinstance(key, str) else None
        if split is None:
            raise EDLoRAError(
                f"'{name}': '{section}' holds '{key}', which is not a LoRA tensor key (expected "
                "'<module>.lora_down.weight' or '<module>_lora.down.weight' and their 'up' forms)."
            )
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            raise EDLoRAError(f"'{name}': '{section}.{key}' is not a float tensor.")
        if not torch.isfinite(tensor).all():
            raise EDLoRAError(f"'{name}': '{section}.{key}' contains NaN or infinite values; the file is damaged.")
        module, part = split
        if part in parts.setdefault(module, {}):
            raise EDLoRAError(f"'{name}': '{section}' holds module '{module}' twice (both key spellings?).")
        parts[module][part] = tensor
    pairs: dict[str, LoRAPair] = {}
    for module, pp in parts.items():
        if set(pp) != {"down", "up"}:
            missing = ({"down", "up"} - set(pp)).pop()
            raise EDLoRAError(f"'{name}': '{section}' module '{module}' has no lora {missing} tensor.")
        down, up = pp["down"], pp["up"]
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
            raise EDLoRAError(
                f"'{name}': '{section}' module '{module}' has mismatched LoRA shapes "
                f"down {tuple(down.shape)} / up {tuple(up.shape)}."
            )
        pairs[module] = LoRAPair(down=down.detach().contiguous(), up=up.detach().contiguous())
    return pairs


# ----------------------------------------------------------------------------------------------- writing


def to_original_state(edlora: EDLoRA, spelling: str = "main") -> dict:
    """The original ``{"params": ...}`` layout, in the ``main`` or ``research`` key spelling."""
    key_fn = {"main": edkeys.main_branch_key, "research": edkeys.research_branch_key}[spelling]
    params = {
        "new_concept_embedding": {w: t.clone() for w, t in edlora.embeddings.items()},
        "text_encoder": {},
        "unet": {},
    }
    for section, pairs in (("unet", edlora.unet), ("text_encoder", edlora.text_encoder)):
        for module, pair in pairs.items():
            params[section][key_fn(module, "down")] = pair.down.clone()
            params[section][key_fn(module, "up")] = pair.up.clone()
    return {"params": params}


def to_safetensors_state(edlora: EDLoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors and string metadata of this pack's safetensors form."""
    tensors: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(edlora.embeddings.values()):
        tensors[f"embedding.{i}"] = tensor.contiguous()
    for section, pairs in (("unet", edlora.unet), ("text_encoder", edlora.text_encoder)):
        for module, pair in pairs.items():
            tensors[f"{section}.{edkeys.main_branch_key(module, 'down')}"] = pair.down.contiguous()
            tensors[f"{section}.{edkeys.main_branch_key(module, 'up')}"] = pair.up.contiguous()
    metadata = {k: str(v) for k, v in edlora.metadata.items()}
    metadata.update(
        format_name=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        concept_words=json.dumps(edlora.words),
        architecture=edlora.architecture,
        encoders=json.dumps([[n, w] for n, w in edlora.encoder_widths().items()]),
        # a map names what each of the vectors serves; one vector per word serves every layer and needs none
        layer_map=json.dumps([[b, i] for b, i in edlora.layer_map] if len(edlora.layer_map) == edlora.layers else []),
    )
    return tensors, metadata


def to_kohya_state_dict(edlora: EDLoRA) -> dict[str, torch.Tensor]:
    """A standard kohya LoRA with the same weight deltas (``alpha = rank``, so scale 1 as in ED-LoRA).

    The layer-wise concept embeddings cannot be represented in this format and are not included.
    """
    out: dict[str, torch.Tensor] = {}
    for pairs, namer in ((edlora.unet, edkeys.kohya_unet_name), (edlora.text_encoder, edkeys.kohya_text_name)):
        for module, pair in pairs.items():
            base = namer(module)
            out[f"{base}.lora_down.weight"] = pair.down.contiguous()
            out[f"{base}.lora_up.weight"] = pair.up.contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(pair.rank))
    return out


def save_edlora(edlora: EDLoRA, path: str, spelling: str = "main") -> str:
    """Write ``edlora`` to ``path``: safetensors for ``.safetensors``, the original layout for ``.pth``.

    The file is written next to its destination and moved into place, so a failure never leaves half a file.
    """
    if is_safetensors(path):
        tensors, metadata = to_safetensors_state(edlora)
        return write_safetensors(tensors, metadata, path)
    if len(edlora.encoder_widths()) > 1:
        raise EDLoRAError(
            f"'{os.path.basename(path)}': the original .pth layout holds one text encoder (SD1.x); an {edlora.architecture} "
            "ED-LoRA is saved as .safetensors."
        )
    return atomic_write(path, lambda tmp: torch.save(to_original_state(edlora, spelling), tmp))
