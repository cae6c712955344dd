"""What every pillar shares about inputs: the pack's error classes and the seed convention.

Every problem a user can act on is a :class:`MixOfShowError` whose message names the file, input, region or concept
word at fault (and what is allowed); anything else escaping a node is a bug. Seeds are unsigned 64-bit like
ComfyUI's seed widgets, and seeds derived from them wrap around (:func:`derived_seed`)."""

from __future__ import annotations

SEED_RANGE = 2**64  # ComfyUI's seeds are unsigned 64-bit; derived seeds wrap around instead of overflowing


def derived_seed(seed: int, offset: int) -> int:
    """The seed ``offset`` places after ``seed``, wrapping at 2**64 like ComfyUI's seed widgets."""
    return (int(seed) + offset) % SEED_RANGE


class MixOfShowError(ValueError):
    """A problem with what the user gave the pack; the message says which input and what is allowed."""


class ModelFileError(MixOfShowError):
    """A model file that cannot be used; the message names the file and says what is wrong."""
