"""Concept words in prompts and the layer-wise token variants built from them.

A prompt names concepts by their words, e.g. ``a <potter1> <potter2> on the beach``. Encoding replaces each
concept word by a placeholder that the tokenizer turns into exactly one token, then swaps that token for the
word's embedding vector of layer *i* in variant *i* (reference section 1.6; the original does the same with
``<new{k}>`` tokens added to the tokenizer). Whole-word matching avoids the original's substring pitfall
(``<cat1>`` inside ``<cat10>``).
"""

from __future__ import annotations

import torch

from .format import CONCEPT_WORD_RE, EDLoRAError

#: Words the SD1.x/SDXL CLIP tokenizers encode as one token each; used as stand-ins for concept words while
#: tokenizing. Any that also occur in the user's own text are skipped, so a stand-in is never ambiguous. Their
#: number is the limit of distinct concept words in one prompt (:data:`MAX_CONCEPT_WORDS`).
PLACEHOLDER_CANDIDATES = (
    "zebra",
    "otter",
    "badger",
    "falcon",
    "pelican",
    "gecko",
    "lobster",
    "oyster",
    "beetle",
    "hornet",
    "salmon",
    "trout",
    "cobra",
    "python",
    "bison",
    "moose",
    "camel",
    "llama",
    "panda",
    "koala",
    "hippo",
    "rhino",
    "jaguar",
    "puma",
    "raven",
    "parrot",
    "penguin",
    "squid",
    "shrimp",
    "turtle",
    "donkey",
    "goose",
    "swan",
    "owl",
    "crab",
    "frog",
    "toad",
    "wolf",
    "fox",
    "bear",
    "deer",
    "goat",
    "sheep",
    "horse",
    "mouse",
    "rabbit",
    "tiger",
    "lion",
    "eagle",
    "shark",
    "whale",
    "snail",
    "spider",
    "monkey",
    "duck",
    "pig",
    "cow",
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "melon",
    "peach",
    "pear",
    "plum",
    "onion",
    "carrot",
    "potato",
    "tomato",
    "pepper",
    "garlic",
    "ginger",
    "walnut",
    "almond",
    "peanut",
    "coconut",
    "kiwi",
    "lime",
    "olive",
    "pumpkin",
    "radish",
    "celery",
    "cabbage",
    "spinach",
    "lettuce",
    "hammer",
    "wrench",
    "shovel",
    "ladder",
    "bucket",
    "kettle",
    "candle",
    "anchor",
    "barrel",
    "basket",
    "blanket",
    "bottle",
    "button",
    "cable",
    "carpet",
    "chain",
    "compass",
    "crayon",
    "cushion",
    "helmet",
    "magnet",
    "needle",
    "pillow",
    "ribbon",
    "saddle",
    "scissors",
    "spoon",
    "tent",
    "trumpet",
    "violin",
    "whistle",
    "wallet",
    "zipper",
)


#: Distinct concept words one prompt may name with the CLIP tokenizer (the stand-ins above that are one token; fewer
#: when the prompt itself uses some of those words). Checked by a test; stated in MoS Text Encode's help page.
MAX_CONCEPT_WORDS = 120


def concept_words_in(prompt: str) -> list[str]:
    """Distinct ``<word>`` tokens of ``prompt`` in order of first appearance."""
    seen: dict[str, None] = {}
    for match in CONCEPT_WORD_RE.finditer(prompt):
        seen.setdefault(match.group(0))
    return list(seen)


def check_known_words(prompt: str, known: list[str], where: str = "prompt") -> list[str]:
    """The concept words of ``prompt``; an unknown ``<word>`` is an error that names it and lists the known ones."""
    words = concept_words_in(prompt)
    unknown = [w for w in words if w not in known]
    if unknown:
        listing = ", ".join(known) if known else "none (connect an MoS ED-LoRA Loader's CONCEPTS output)"
        raise EDLoRAError(
            f"Unknown concept word {', '.join(unknown)} in the {where} {prompt!r}. Loaded concept words: {listing}."
        )
    return words


def substitute_words(prompt: str, stand_ins: dict[str, str]) -> str:
    """Replace each concept word by its stand-in, padded with spaces so it never fuses with a neighbour."""
    return CONCEPT_WORD_RE.sub(lambda m: f" {stand_ins[m.group(0)]} " if m.group(0) in stand_ins else m.group(0), prompt)


def layer_variants(token_chunks: list[list[tuple]], vectors_by_token: dict[int, torch.Tensor], layers: int) -> list[list[tuple]]:
    """``layers`` copies of ``token_chunks`` (a tokenizer's list of 77-token chunks of ``(token, weight)``).

    In copy *i* every placeholder token id found in ``vectors_by_token`` becomes that word's vector of layer *i*
    (a ``[layers, width]`` tensor, or ``[1, width]`` for single-vector concepts), keeping its prompt weight.
    Copies are concatenated chunk-wise: copy 0's chunks, then copy 1's, and so on.
    """
    out: list[list[tuple]] = []
    for layer in range(layers):
        for chunk in token_chunks:
            new_chunk = []
            for item in chunk:
                token = item[0]
                if isinstance(token, int) and token in vectors_by_token:
                    table = vectors_by_token[token]
                    vector = table[layer if table.shape[0] > 1 else 0]
                    new_chunk.append((vector, *item[1:]))
                else:
                    new_chunk.append(item)
            out.append(new_chunk)
    return out
