"""The CONCEPTS value: which ED-LoRAs are in play, with what strengths, and their concept words.

A :class:`ConceptSet` is immutable; loaders chain by returning ``previous.add(entry)``. Concept words must be
unique across the set: two files that both define ``<potter1>`` are an error that names both files (the
original silently let the later one win).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .format import EDLoRA, EDLoRAError


@dataclass(frozen=True)
class ConceptEntry:
    """One loaded ED-LoRA and the strengths it was applied with."""

    edlora: EDLoRA
    unet_strength: float = 1.0
    text_encoder_strength: float = 1.0


@dataclass(frozen=True)
class ConceptSet:
    entries: tuple[ConceptEntry, ...] = ()

    def add(self, entry: ConceptEntry) -> ConceptSet:
        """A new set with ``entry`` appended; clashing concept words or layer counts are refused by name."""
        for what, value in (("UNet", entry.unet_strength), ("text-encoder", entry.text_encoder_strength)):
            if not math.isfinite(value):
                raise EDLoRAError(f"'{entry.edlora.name}': the {what} strength must be a finite number, got {value!r}.")
        owners = self.word_owners()
        for word in entry.edlora.words:
            if word in owners:
                raise EDLoRAError(
                    f"Concept word {word} is defined by both '{owners[word]}' and '{entry.edlora.name}'. "
                    "Concept words must be unique: load only one of the files, or retrain one concept under another word."
                )
        if self.entries:
            first = self.entries[0].edlora
            if entry.edlora.width != first.width:
                raise EDLoRAError(
                    f"'{entry.edlora.name}' has {entry.edlora.width}-wide embeddings but "
                    f"'{first.name}' has {first.width}: they were trained for different text encoders."
                )
        return ConceptSet(self.entries + (entry,))

    def word_owners(self) -> dict[str, str]:
        return {w: e.edlora.name for e in self.entries for w in e.edlora.words}

    @property
    def words(self) -> list[str]:
        return [w for e in self.entries for w in e.edlora.words]

    def embedding_table(self) -> dict[str, torch.Tensor]:
        """Every concept word's ``[layers, width]`` embedding."""
        return {w: t for e in self.entries for w, t in e.edlora.embeddings.items()}

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> str:
        if not self.entries:
            return "no concepts"
        return "; ".join(f"{e.edlora.concept_name} ({e.edlora.name})" for e in self.entries)
