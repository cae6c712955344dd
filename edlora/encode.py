"""Layer-wise prompt encoding on a ComfyUI CLIP object.

A prompt without concept words is encoded exactly as core CLIPTextEncode does. A prompt with concept words
is tokenized once with one-token stand-ins, expanded into one token list per cross-attention layer
(:func:`.prompt.layer_variants`) and encoded in a single batched text-encoder call; the result is split into
a ``[1, layers, tokens, width]`` stack (:func:`.routing.layerwise_conditioning`). Each text encoder gets its own
part of a concept vector (SDXL: CLIP-L's 768, then CLIP-G's 1280).

The pooled output (SDXL conditions the whole image on it, through ADM) cannot be routed per layer. It is the
pooled output of one more copy of the prompt, first in the batch, in which each concept word is the mean of its
layer vectors: one layer-free vector per word, as the mean of the layer encodings is what unrouted consumers see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import text_encoder_widths
from .concepts import ConceptSet
from .format import EDLoRAError
from .prompt import MAX_CONCEPT_WORDS, PLACEHOLDER_CANDIDATES, check_known_words, layer_variants, substitute_words
from .routing import layerwise_conditioning


def single_token(clip, word: str) -> int | None:
    """The token id ``word`` becomes on its own, or None unless it is exactly one token for every tokenizer."""
    ids = set()
    for chunks in clip.tokenize(f" {word} ", return_word_ids=True).values():
        body = [t[0] for chunk in chunks for t in chunk if t[2] != 0]
        if len(body) != 1:
            return None
        ids.add(body[0])
    return ids.pop() if len(ids) == 1 else None


def choose_stand_ins(clip, prompt_without_words: str, count: int) -> dict[str, int]:
    """``count`` one-token stand-in words whose tokens do not occur in the rest of the prompt: word -> token id."""
    used = {
        t[0]
        for chunks in clip.tokenize(prompt_without_words).values()
        for chunk in chunks
        for t in chunk
        if isinstance(t[0], int)
    }
    chosen: dict[str, int] = {}
    for candidate in PLACEHOLDER_CANDIDATES:
        if len(chosen) == count:
            break
        token = single_token(clip, candidate)
        if token is not None and token not in used and token not in chosen.values():
            chosen[candidate] = token
    if len(chosen) < count:
        raise EDLoRAError(
            f"This prompt names {count} distinct concept words, but one prompt can name at most {len(chosen)} with this "
            f"text encoder (at most {MAX_CONCEPT_WORDS}; fewer when the prompt itself uses some of the stand-in words "
            "such as 'zebra' or 'apple'). Split the concepts over regions (MoS Regional Conditioning) or prompts."
        )
    return chosen


@dataclass
class LayerwiseTokens:
    """A prompt's token lists with concept words expanded into one copy per cross-attention layer."""

    base: dict[str, list[list[tuple]]]  # tokenizer key -> chunks, concept words as their stand-in token ids
    variants: dict[str, list[list[tuple]]]  # tokenizer key -> (pooled copy +) layers x chunks, copy-major
    layers: int
    chunks: int
    word_of_token: dict[int, str]  # stand-in token id -> the concept word it stands for
    end_tokens: dict[str, int]
    pooled_copy: bool = False  # variants start with the copy whose pooled output is the prompt's

    @property
    def stand_in_tokens(self) -> set[int]:
        return set(self.word_of_token)


def end_token(clip, key: str) -> int:
    """The end-of-text token id of tokenizer ``key`` (the first special token after the start token)."""
    chunk = clip.tokenize("", return_word_ids=True)[key][0]
    return next(t[0] for t in chunk[1:] if t[2] == 0)


def layerwise_tokens(clip, concepts: ConceptSet | None, text: str) -> LayerwiseTokens | None:
    """Token variants of ``text`` per cross-attention layer, or None when it names no concept words."""
    known = concepts.words if concepts is not None else []
    words = check_known_words(text, known)
    if not words:
        return None
    table = concepts.embedding_table()
    layers = max(table[w].shape[0] for w in words)
    rest = substitute_words(text, {w: "" for w in words})
    stand_ins = choose_stand_ins(clip, rest, len(words))
    word_to_stand_in = dict(zip(words, stand_ins, strict=True))
    tokens = clip.tokenize(substitute_words(text, word_to_stand_in))
    slices = encoder_slices(clip)
    variants = {}
    for key, chunks in tokens.items():
        part = slices.get(key, slice(None))
        vectors = {stand_ins[s]: table[w][:, part] for w, s in word_to_stand_in.items()}
        means = {token: vector.mean(dim=0, keepdim=True) for token, vector in vectors.items()}
        variants[key] = layer_variants(chunks, means, 1) + layer_variants(chunks, vectors, layers)
    chunks = len(next(iter(tokens.values())))
    word_of_token = {stand_ins[s]: w for w, s in word_to_stand_in.items()}
    end_tokens = {key: end_token(clip, key) for key in tokens}
    return LayerwiseTokens(tokens, variants, layers, chunks, word_of_token, end_tokens, pooled_copy=True)


def encoder_slices(clip) -> dict[str, slice]:
    """Which columns of a concept vector belong to each text encoder (tokenizer key) of ``clip``."""
    out, start = {}, 0
    for name, width in text_encoder_widths(clip).items():
        out[name] = slice(start, start + width)
        start += width
    return out


def plain_tokens(clip, text: str) -> LayerwiseTokens:
    """A prompt without concept words in the same form: one copy of its tokens, serving every layer."""
    tokens = clip.tokenize(text)
    chunks = len(next(iter(tokens.values())))
    return LayerwiseTokens(tokens, tokens, 1, chunks, {}, {key: end_token(clip, key) for key in tokens})


def encode_layer_stack(clip, tokens: LayerwiseTokens) -> tuple[torch.Tensor, dict]:
    """Encode all layer variants in one text-encoder call: ``([1, layers, tokens, width], extra outputs)``; the
    extra outputs' ``pooled_output`` is the pooled copy's (see the module doc)."""
    out = clip.encode_from_tokens(tokens.variants, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    copies = tokens.layers + int(tokens.pooled_copy)
    per_copy = cond.shape[1] // copies
    cond = cond[:, per_copy * int(tokens.pooled_copy) :]
    stack = cond.reshape(tokens.layers, per_copy, cond.shape[2]).unsqueeze(0)
    return stack, out


def encode_prompt(clip, concepts: ConceptSet | None, text: str) -> list:
    """CONDITIONING for ``text``: layer-wise when it names concepts, otherwise exactly CLIPTextEncode's."""
    tokens = layerwise_tokens(clip, concepts, text)
    if tokens is None:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))
    stack, extra = encode_layer_stack(clip, tokens)
    pooled = extra.pop("pooled_output")
    return [layerwise_conditioning(stack, {"pooled_output": pooled, **extra})]
