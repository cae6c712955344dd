"""The CONCEPTS value: which concepts are in play, with what strengths, words and prompts.

A concept is an ED-LoRA (layer-wise vectors of its concept words plus LoRA adapters) or an ordinary LoRA file (its
adapters only; prompts name it by trigger words). A :class:`ConceptSet` is immutable; nodes chain by returning
``previous.add(entry)``. Concept words must be unique across the set: two files that both define ``<potter1>`` are an
error that names both files (the original silently let the later one win).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .format import EDLoRA, EDLoRAError
from .loras import LoRAFile


@dataclass(frozen=True)
class ConceptEntry:
    """One concept and the strengths it is applied (or fused) with.

    ``edlora`` holds the concept words, their vectors and ED-LoRA adapters; for an ordinary LoRA it holds none of
    them and ``lora`` holds the file. ``prompts`` show the concept (fusion records each concept's layers on them);
    empty means the original's ``photo of a {concept}`` and ``{concept}``.
    """

    edlora: EDLoRA
    unet_strength: float = 1.0
    text_encoder_strength: float = 1.0
    lora: LoRAFile | None = None
    prompts: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """How the concept is named in reports: its words (``<potter1> <potter2>``), or the LoRA's file name."""
        if self.edlora.words:
            return self.edlora.concept_name
        return self.lora.name if self.lora is not None else self.edlora.name

    @property
    def source(self) -> str:
        """The file the concept came from."""
        return self.lora.name if self.lora is not None else self.edlora.name

    @property
    def kind(self) -> str:
        return "lora" if self.lora is not None or not self.edlora.words else "edlora"

    def text_prompts(self) -> tuple[str, ...]:
        """The prompts whose encodings fit the text encoder and cross-attention K/V layers for this concept."""
        return self.prompts or (f"photo of a {self.name}", self.name)

    def sample_prompts(self) -> tuple[str, ...]:
        """The prompts of the per-concept samples whose UNet features are recorded (the original: one)."""
        return self.prompts or (f"photo of a {self.name}",)


@dataclass(frozen=True)
class ConceptSet:
    entries: tuple[ConceptEntry, ...] = ()

    def add(self, entry: ConceptEntry) -> ConceptSet:
        """A new set with ``entry`` appended; clashing concept words or widths, and bad strengths, are refused by name."""
        for what, value in (("UNet", entry.unet_strength), ("text-encoder", entry.text_encoder_strength)):
            if not math.isfinite(value):
                raise EDLoRAError(f"'{entry.source}': the {what} strength must be a finite number, got {value!r}.")
        owners = self.word_owners()
        for word in entry.edlora.words:
            if word in owners:
                raise EDLoRAError(
                    f"Concept word {word} is defined by both '{owners[word]}' and '{entry.edlora.name}'. "
                    "Concept words must be unique: load only one of the files, or retrain one concept under another word."
                )
        widths = {e.edlora.width for e in self.entries if e.edlora.words}
        if entry.edlora.words and widths and entry.edlora.width not in widths:
            first = next(e.edlora for e in self.entries if e.edlora.words)
            raise EDLoRAError(
                f"'{entry.edlora.name}' has {entry.edlora.width}-wide embeddings but "
                f"'{first.name}' has {first.width}: they were trained for different text encoders."
            )
        if entry.name in {e.name for e in self.entries}:
            raise EDLoRAError(f"'{entry.source}' is in the stack twice; each concept may appear once.")
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
        return "; ".join(e.name if e.kind == "lora" else f"{e.name} ({e.source})" for e in self.entries)
