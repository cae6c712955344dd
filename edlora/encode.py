"""Layer-wise prompt encoding on a ComfyUI CLIP object.

A prompt without concept words is encoded exactly as core CLIPTextEncode does. A prompt with concept words
is tokenized once with one-token stand-ins, expanded into one token list per cross-attention layer
(:func:`.prompt.layer_variants`) and encoded in a single batched text-encoder call; the result is split into
a ``[1, layers, tokens, width]`` stack (:func:`.routing.layerwise_conditioning`).
"""

from __future__ import annotations

from .concepts import ConceptSet
from .format import EDLoRAError
from .prompt import PLACEHOLDER_CANDIDATES, check_known_words, layer_variants, substitute_words
from .routing import layer_stack_of, layerwise_conditioning


def _single_token(clip, word: str) -> int | None:
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
        token = _single_token(clip, candidate)
        if token is not None and token not in used and token not in chosen.values():
            chosen[candidate] = token
    if len(chosen) < count:
        raise EDLoRAError(
            f"Could not find {count} unused one-token stand-ins for the concept words of this prompt "
            "with this tokenizer; use fewer distinct concept words in one prompt."
        )
    return chosen


def encode_prompt(clip, concepts: ConceptSet | None, text: str) -> list:
    """CONDITIONING for ``text``: layer-wise when it names concepts, otherwise exactly CLIPTextEncode's."""
    known = concepts.words if concepts is not None else []
    words = check_known_words(text, known)
    if not words:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    table = concepts.embedding_table()
    layers = max(table[w].shape[0] for w in words)
    rest = substitute_words(text, {w: "" for w in words})
    stand_ins = choose_stand_ins(clip, rest, len(words))
    word_to_stand_in = dict(zip(words, stand_ins, strict=True))
    vectors_by_token = {stand_ins[s]: table[w] for w, s in word_to_stand_in.items()}

    tokens = clip.tokenize(substitute_words(text, word_to_stand_in))
    variants = {key: layer_variants(chunks, vectors_by_token, layers) for key, chunks in tokens.items()}
    out = clip.encode_from_tokens(variants, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    stack = cond.reshape(layers, cond.shape[1] // layers, cond.shape[2]).unsqueeze(0)
    pooled = out.pop("pooled_output")
    return [layerwise_conditioning(stack, {"pooled_output": pooled, **out})]


def encoded_layer_count(conditioning: list) -> int:
    """Layer count of the first layer-wise entry of a CONDITIONING, or 0."""
    for entry in conditioning:
        stack = layer_stack_of(entry)
        if stack is not None:
            return int(stack.shape[1])
    return 0
