"""Concept words in prompts, layer variants of token lists, and the CONCEPTS set."""

from __future__ import annotations

import pytest
import torch

from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
from mixofshow.edlora.format import EDLoRA, EDLoRAError
from mixofshow.edlora.prompt import check_known_words, concept_words_in, layer_variants, substitute_words


def edlora(words, name, width=8, layers=16):
    return EDLoRA(embeddings={w: torch.randn(layers, width) for w in words}, unet={}, text_encoder={}, name=name)


def test_concept_words_found_in_order_once():
    prompt = "a <potter1> <potter2>, and (<cat1>:1.2) near <potter1>"
    assert concept_words_in(prompt) == ["<potter1>", "<potter2>", "<cat1>"]
    assert concept_words_in("no concepts here, x < y > z") == []


def test_unknown_word_names_it_and_lists_known():
    with pytest.raises(EDLoRAError, match=r"Unknown concept word <hermione1>.*Loaded concept words: <potter1>, <potter2>"):
        check_known_words("<potter1> <potter2> and <hermione1>", ["<potter1>", "<potter2>"])
    with pytest.raises(EDLoRAError, match="connect an MoS ED-LoRA Loader"):
        check_known_words("a <cat1>", [])


def test_substitution_is_whole_word():
    out = substitute_words("<cat1> <cat10>,<cat1>", {"<cat1>": "zebra", "<cat10>": "otter"})
    assert out.split() == ["zebra", "otter", ",", "zebra"]


def test_layer_variants_put_layer_i_vector_in_copy_i():
    table = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    single = torch.tensor([[7.0, 7.0, 7.0]])
    chunks = [[(49406, 1.0), (500, 1.2), (42, 1.0), (600, 1.0), (49407, 1.0)]]
    out = layer_variants(chunks, {500: table, 600: single}, 16)
    assert len(out) == 16
    for i, chunk in enumerate(out):
        assert torch.equal(chunk[1][0], table[i]) and chunk[1][1] == 1.2
        assert torch.equal(chunk[3][0], single[0])
        assert chunk[0] == (49406, 1.0) and chunk[2] == (42, 1.0)


def test_concept_set_chains_and_refuses_clashes():
    a = edlora(["<potter1>", "<potter2>"], "potter.pth")
    b = edlora(["<cat1>", "<cat2>"], "cat.pth")
    concepts = ConceptSet().add(ConceptEntry(a)).add(ConceptEntry(b, 0.5, 0.6))
    assert concepts.words == ["<potter1>", "<potter2>", "<cat1>", "<cat2>"]
    assert concepts.entries[1].unet_strength == 0.5
    clash = edlora(["<cat2>", "<cat3>"], "other_cat.pth")
    with pytest.raises(EDLoRAError, match=r"<cat2> is defined by both 'cat.pth' and 'other_cat.pth'"):
        concepts.add(ConceptEntry(clash))
    wide = edlora(["<dog1>"], "dog.pth", width=16)
    with pytest.raises(EDLoRAError, match="16-wide embeddings but 'potter.pth' has 8"):
        concepts.add(ConceptEntry(wide))
    assert len(concepts) == 2, "a refused add leaves the set unchanged"
