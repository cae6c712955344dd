"""Fused-model bundles: one safetensors file with the fused weights, the concept table and how it was made.

Layout (``format_name = mixofshow.fused``, ``format_version = 1``):

* ``unet.<model key>`` / ``text_encoder.<clip key>``: fused weights, as diffs against the base (``storage = diff``)
  or as full tensors (``storage = full``, independent of the base they are loaded onto);
* ``embedding.<i>``: the concept words' ``[layers, width]`` embeddings, words listed in ``concept_words``;
* optionally ``stats.<stage>.gram.<group>``, ``stats.<stage>.cross.<key>``, ``stats.<stage>.const.<key>``: the Gram
  statistics that let a later fusion add a concept without re-sampling the others;
* metadata: ``concepts`` (names, words, source files and hashes, strengths), ``settings``, ``method``, ``report``,
  ``base_fingerprint``, ``stats_index``.

Also reads the original Mix-of-Show outputs: the research branch's ``combined_model*.pth`` and the main branch's
diffusers folder with ``new_concept_cfg.json`` (weights read with ``weights_only`` / safetensors).
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..edlora.apply import check_embeddings_fit
from ..edlora.arch import architecture_name, require_supported, text_encoder_widths
from ..edlora.concepts import ConceptEntry, ConceptSet
from ..edlora.errors import ModelFileError
from ..edlora.files import check_format, is_safetensors, read_safetensors, read_torch, write_safetensors
from ..edlora.format import EDLoRA, EDLoRAError, validate_embeddings
from .results import FusedModel, StageReport
from .stats import FusionStats

FORMAT_NAME = "mixofshow.fused"
FORMAT_VERSION = "2"  # 2: records the base's text encoders (architecture); 1 (SD1.x only) still reads
READABLE_VERSIONS = ("1", "2")


class FusedFileError(ModelFileError):
    """A fused model file (or the inputs of saving one) that cannot be used; the message names the file."""


def save_fused(
    fused: FusedModel,
    path: str,
    base_weights: dict[str, torch.Tensor] | None = None,
    storage: str = "diff",
    include_statistics: bool = False,
    sources: dict[str, dict] | None = None,
) -> str:
    """Write ``fused`` to ``path``. ``storage = "full"`` needs ``base_weights`` (the base's effective weights)."""
    if storage not in ("diff", "full"):
        raise FusedFileError(f"storage must be 'diff' or 'full', not {storage!r}")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, diffs in (("unet", fused.unet_diffs), ("text_encoder", fused.text_diffs)):
        for key, diff in diffs.items():
            value = diff.float()
            if storage == "full":
                if base_weights is None or key not in base_weights:
                    raise FusedFileError(f"storage 'full' needs the base weight of '{key}'")
                value = base_weights[key].float() + value
            tensors[f"{prefix}.{key}"] = value.contiguous()
    words = fused.concepts.words
    table = fused.concepts.embedding_table()
    for i, word in enumerate(words):
        tensors[f"embedding.{i}"] = table[word].contiguous()
    stats_index = {}
    if include_statistics:
        if fused.stats is None:
            raise FusedFileError(f"this {fused.method} result has no statistics to include (only gradient fusion keeps them).")
        for stage, stats in fused.stats.items():
            stage_tensors, stats_index[stage] = stats.to_tensors(f"stats.{stage}")
            tensors.update(stage_tensors)
    sources = sources or {}
    concepts_meta = [
        {
            "name": e.name,
            "kind": e.kind,
            "words": e.edlora.words,
            "source": e.source,
            "sha256": sources.get(e.source, {}).get("sha256", ""),
            "unet_strength": e.unet_strength,
            "text_encoder_strength": e.text_encoder_strength,
            "prompts": list(e.prompts),
        }
        for e in fused.concepts.entries
    ]
    metadata = {
        "format_name": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "storage": storage,
        "method": fused.method,
        "concept_words": json.dumps(words),
        "concepts": json.dumps(concepts_meta),
        "settings": json.dumps(fused.settings),
        "report": fused.report(),
        "base_fingerprint": fused.base_fingerprint,
        "stats_index": json.dumps(stats_index),
        "drift": json.dumps(fused.drift),
        "stage_reports": json.dumps({k: vars(v) for k, v in fused.stage_reports.items()}),
        "layer_methods": json.dumps(fused.layer_methods),
        "notes": json.dumps(fused.notes),
        "architecture": fused.architecture,
        "encoders": json.dumps([[n, w] for n, w in fused.encoders.items()]),
    }
    return write_safetensors(tensors, metadata, path)


def load_fused(path: str, base_weights_fn=None) -> FusedModel:
    """Read a bundle, or the original's ``combined_model*.pth`` / ``new_concept_cfg.json`` folder.

    ``base_weights_fn(keys) -> {key: tensor}`` gives the base's effective weights; it is needed to turn full
    tensors into diffs against the model they are loaded onto. Every structural problem (missing or malformed
    metadata, missing tensors, non-finite values) is a :class:`FusedFileError` naming the file and the field.
    """
    name = os.path.basename(path)
    if os.path.basename(path) == "new_concept_cfg.json":
        return _load_diffusers_folder(os.path.dirname(path), base_weights_fn)
    if not is_safetensors(path):
        return _load_research_combined(path, base_weights_fn)
    tensors, metadata = read_safetensors(path, name, FusedFileError)
    if metadata.get("format_name") != FORMAT_NAME:
        raise FusedFileError(f"'{name}' is not a Mix-of-Show fused bundle (an ED-LoRA goes to MoS ED-LoRA Loader).")
    check_format(metadata, name, FORMAT_NAME, READABLE_VERSIONS, FusedFileError)
    words = _metadata_json(metadata, "concept_words", None, list, name)
    try:
        encoders = {str(n): int(w) for n, w in _metadata_json(metadata, "encoders", [], list, name)}
    except (TypeError, ValueError):
        raise FusedFileError(f"'{name}': metadata 'encoders' is malformed; the file is damaged.") from None
    embeddings = {}
    for i, word in enumerate(words):
        key = f"embedding.{i}"
        if key not in tensors:
            raise FusedFileError(f"'{name}': concept word {word!r} has no tensor '{key}'; the file is damaged.")
        embeddings[word] = tensors[key]
    embeddings = _checked(lambda: validate_embeddings(embeddings, name))
    concepts = _concept_set(_metadata_json(metadata, "concepts", [], list, name), embeddings, name, encoders)
    sections: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in sections:
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise FusedFileError(f"'{name}': fused weight '{key}' is not finite floating-point data; the file is damaged.")
            sections[prefix][rest] = tensor
    if metadata.get("storage") == "full":
        sections = {s: _full_to_diff(v, base_weights_fn, name) for s, v in sections.items()}
    index = _metadata_json(metadata, "stats_index", {}, dict, name)
    try:
        stats = {stage: FusionStats.from_tensors(tensors, entry, f"stats.{stage}") for stage, entry in index.items()}
        reports = {k: StageReport(**v) for k, v in _metadata_json(metadata, "stage_reports", {}, dict, name).items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise FusedFileError(
            f"'{name}': its statistics or stage reports are incomplete ({exc!r}); the file is damaged."
        ) from None
    return FusedModel(
        method=metadata.get("method", "fused"),
        unet_diffs=sections["unet"],
        text_diffs=sections["text_encoder"],
        concepts=concepts,
        settings=_metadata_json(metadata, "settings", {}, dict, name),
        stage_reports=reports,
        drift=_metadata_json(metadata, "drift", {}, dict, name),
        stats=stats or None,
        base_fingerprint=metadata.get("base_fingerprint", ""),
        layer_methods=_metadata_json(metadata, "layer_methods", {}, dict, name),
        notes=_metadata_json(metadata, "notes", [], list, name),
        encoders=encoders,
    )


def _metadata_json(metadata: dict, key: str, default, kind: type, name: str):
    """A JSON metadata field of kind ``kind``; ``default`` None means the field is required."""
    text = metadata.get(key)
    if text is None:
        if default is None:
            raise FusedFileError(
                f"'{name}': metadata '{key}' is missing; the file was not written by MoS Save Fused or is damaged."
            )
        return default
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise FusedFileError(f"'{name}': metadata '{key}' is not valid JSON; the file is damaged.") from None
    if not isinstance(value, kind):
        raise FusedFileError(f"'{name}': metadata '{key}' must be a JSON {kind.__name__}, found {type(value).__name__}.")
    return value


def _checked(build):
    """Run ``build``; an ED-LoRA-level problem (bad word, embedding or clash) becomes a fused-file error."""
    try:
        return build()
    except EDLoRAError as exc:
        raise FusedFileError(str(exc)) from None


def _concept_set(meta: list, embeddings: dict[str, torch.Tensor], name: str, encoders: dict[str, int]) -> ConceptSet:
    concepts = ConceptSet()
    assigned = set()
    try:
        for entry in meta:
            if not isinstance(entry, dict) or not isinstance(entry.get("words"), list):
                raise FusedFileError(f"'{name}': metadata 'concepts' holds {entry!r}, not a concept with its words.")
            words = [w for w in entry["words"] if w in embeddings]
            assigned.update(words)
            edlora = EDLoRA({w: embeddings[w] for w in words}, {}, {}, name=str(entry.get("source", name)), encoders=encoders)
            try:
                strengths = float(entry.get("unet_strength", 1.0)), float(entry.get("text_encoder_strength", 1.0))
            except (TypeError, ValueError):
                raise FusedFileError(f"'{name}': metadata 'concepts' has a non-numeric strength for {words}.") from None
            prompts = entry.get("prompts", [])
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise FusedFileError(f"'{name}': metadata 'concepts' has prompts that are not a list of text.")
            concepts = concepts.add(ConceptEntry(edlora, *strengths, prompts=tuple(prompts)))
        for stem_words in _group_by_stem([w for w in embeddings if w not in assigned]):
            concepts = concepts.add(
                ConceptEntry(EDLoRA({w: embeddings[w] for w in stem_words}, {}, {}, name=name, encoders=encoders))
            )
    except EDLoRAError as exc:
        raise FusedFileError(str(exc)) from None
    return concepts


def _group_by_stem(words: list[str]) -> list[list[str]]:
    """Consecutive words that differ only in their last character form one concept (``<potter1> <potter2>``)."""
    groups: list[list[str]] = []
    for word in words:
        if groups and len(word) > 3 and groups[-1][-1][:-2] == word[:-2]:
            groups[-1].append(word)
        else:
            groups.append([word])
    return groups


def _full_to_diff(full: dict[str, torch.Tensor], base_weights_fn, name: str) -> dict[str, torch.Tensor]:
    if not full:
        return {}
    if base_weights_fn is None:
        raise FusedFileError(f"'{name}' stores full weights; connect the base MODEL and CLIP to load it.")
    base = base_weights_fn(sorted(full))
    out = {}
    for key, value in full.items():
        if not torch.is_tensor(value) or not value.is_floating_point() or not torch.isfinite(value).all():
            raise FusedFileError(f"'{name}': weight '{key}' is not finite floating-point data; the file is damaged.")
        if tuple(value.shape) != tuple(base[key].shape):
            raise FusedFileError(
                f"'{name}': weight '{key}' has shape {list(value.shape)} but the connected model's is "
                f"{list(base[key].shape)}; it was fused for a different architecture."
            )
        out[key] = value.float() - base[key].float()
    return out


# ------------------------------------------------------------------------------------------ the original's outputs

#: ``(diffusers weight key -> model key, text-encoder weight key -> clip key)`` for the connected base model.
KeyMaps = tuple[dict[str, str], dict[str, str]]

_ATTENTION_WEIGHT = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q_proj|k_proj|v_proj|out_proj))\.weight$")


def _load_research_combined(path: str, base_weights_fn) -> FusedModel:
    name = os.path.basename(path)
    state = read_torch(path, name, FusedFileError)
    if isinstance(state, dict) and set(state) == {"params"}:
        state = state["params"]
    if not isinstance(state, dict) or "new_concept_embedding" not in state or not ({"unet", "text_encoder"} & set(state)):
        raise FusedFileError(
            f"'{name}' is not a Mix-of-Show combined model (expected params with unet, text_encoder and new_concept_embedding)."
        )
    raw = state["new_concept_embedding"]
    if not isinstance(raw, dict):
        raise FusedFileError(f"'{name}': 'new_concept_embedding' must map concept words to tensors.")
    embeddings = _checked(lambda: validate_embeddings(raw, name))
    return _from_full_weights(
        state.get("unet", {}),
        state.get("text_encoder", {}),
        embeddings,
        base_weights_fn,
        name,
        "imported Mix-of-Show combined model",
    )


def _load_diffusers_folder(folder: str, base_weights_fn) -> FusedModel:
    name = os.path.basename(folder.rstrip(os.sep)) or folder
    try:
        with open(os.path.join(folder, "new_concept_cfg.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FusedFileError(f"'{name}/new_concept_cfg.json' is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FusedFileError(f"'{name}/new_concept_cfg.json' must map concept words to their token ids.")

    def read(sub: str, stems: tuple[str, ...]):
        for stem in stems:
            for ext in (".safetensors", ".bin"):
                path = os.path.join(folder, sub, stem + ext)
                if os.path.exists(path):
                    where = f"{name}/{sub}/{stem}{ext}"
                    return (
                        read_safetensors(path, where, FusedFileError)[0]
                        if ext == ".safetensors"
                        else read_torch(path, where, FusedFileError)
                    )
        raise FusedFileError(
            f"'{name}' has no {sub}/{stems[0]}.safetensors (or .bin); is it a Mix-of-Show fused diffusers folder?"
        )

    unet = read("unet", ("diffusion_pytorch_model",))
    text = read("text_encoder", ("model", "pytorch_model"))
    table = text.get("text_model.embeddings.token_embedding.weight")
    if table is None:
        raise FusedFileError(f"'{name}': text_encoder has no token embedding table.")
    embeddings = {}
    for word, entry in config.items():
        ids = entry.get("concept_token_ids", []) if isinstance(entry, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise FusedFileError(f"'{name}/new_concept_cfg.json': {word!r} needs a list of token ids in 'concept_token_ids'.")
        if not ids or max(ids) >= table.shape[0]:
            raise FusedFileError(
                f"'{name}': new_concept_cfg.json lists token ids for {word} that the text encoder does not have."
            )
        embeddings[word] = table[ids].float()
    embeddings = _checked(lambda: validate_embeddings(embeddings, name))
    unet = {k: v for k, v in unet.items() if _ATTENTION_WEIGHT.search(k)}
    text = {k: v for k, v in text.items() if _ATTENTION_WEIGHT.search(k)}
    return _from_full_weights(unet, text, embeddings, base_weights_fn, name, "imported Mix-of-Show fused diffusers model")


def _from_full_weights(unet: dict, text: dict, embeddings: dict, base_weights_fn, name: str, method: str) -> FusedModel:
    if base_weights_fn is None:
        raise FusedFileError(f"'{name}' stores full weights; connect the base MODEL and CLIP to load it.")
    unet_map, text_map = base_weights_fn.key_maps()
    mapped_unet, mapped_text = {}, {}
    for key, value in unet.items():
        model_key = unet_map.get(key)
        if model_key is None:
            raise FusedFileError(f"'{name}': UNet weight '{key}' does not exist in the connected model (another architecture?).")
        mapped_unet[model_key] = value
    for key, value in text.items():
        clip_key = text_map.get(key)
        if clip_key is None:
            raise FusedFileError(f"'{name}': text-encoder weight '{key}' does not exist in the connected CLIP.")
        mapped_text[clip_key] = value
    concepts = ConceptSet()
    try:
        for words in _group_by_stem(list(embeddings)):
            concepts = concepts.add(ConceptEntry(EDLoRA({w: embeddings[w] for w in words}, {}, {}, name=name)))
    except EDLoRAError as exc:
        raise FusedFileError(str(exc)) from None
    return FusedModel(
        method=method,
        unet_diffs=_full_to_diff(mapped_unet, base_weights_fn, name),
        text_diffs=_full_to_diff(mapped_text, base_weights_fn, name),
        concepts=concepts,
        settings={"imported_from": name},
    )


def check_fits(fused: FusedModel, model, clip, name: str) -> None:
    """Refuse a fused model whose weights or concept embeddings do not fit the connected MODEL/CLIP, by name."""
    require_supported(model, clip, "MoS Load Fused")
    connected = architecture_name(text_encoder_widths(clip))
    if fused.architecture != connected:
        raise FusedFileError(
            f"'{name}' was fused on an {fused.architecture} model but the connected model is {connected}; load it onto "
            f"the {fused.architecture} base it was made on."
        )
    for table, diffs in ((model.model.state_dict(), fused.unet_diffs), (clip.cond_stage_model.state_dict(), fused.text_diffs)):
        for key, diff in diffs.items():
            if key not in table or tuple(table[key].shape) != tuple(diff.shape):
                have = list(table[key].shape) if key in table else "no such weight"
                raise FusedFileError(
                    f"'{name}': fused weight '{key}' {list(diff.shape)} does not fit the connected model ({have}); "
                    "it was fused for a different architecture."
                )
    for entry in fused.concepts.entries:
        _checked(lambda entry=entry: check_embeddings_fit(entry.edlora, model, clip))
