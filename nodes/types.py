"""Custom ComfyUI socket types of this pack."""

from comfy_api.latest import io

#: A :class:`edlora.concepts.ConceptSet`: loaded ED-LoRAs, their strengths and concept words.
Concepts = io.Custom("MOS_CONCEPTS")

#: A :class:`fusion.procedure.FusedModel`: fused weight diffs, concepts, settings, report, optional statistics.
Fused = io.Custom("MOS_FUSED")

#: A tuple of :class:`regional.spec.Region`: prompts, negatives and where they apply.
Regions = io.Custom("MOS_REGIONS")
