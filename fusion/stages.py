"""The three stages of gradient fusion (reference section 2.2) around one shared :class:`FusionRun`.

1. Text-encoder layers: each concept's CLIP (base + its LoRA) encodes the concept's prompts (ED-LoRAs: ``photo of a
   {concept}`` and ``{concept}`` in all layer variants); the inputs of every fused text-encoder layer stream into Gram
   statistics.
2. Cross-attention K/V: with the fused text encoder, the layer-*l* encodings of the same prompts are the inputs of
   attn2 to_k/to_v of layer *l*.
3. Every other fused UNet layer: one sample per concept prompt (no CFG, all steps recorded) with the fused text
   encoder and K/V plus that concept's remaining LoRA alone.

A concept's target for a layer is whatever ComfyUI computes for its file at its strength (``calculate_weight`` on
its own patches), so every adapter type ComfyUI reads fuses the same way. Which layers are solved from statistics
and which are weight-fused is planned up front (:mod:`.plan`). Which prompt positions count is a setting
(``token_positions``): all positions of the padded prompt by default, or the research code's (real tokens for the
text encoder; concept tokens and the first end token for K/V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.utils
import torch

from ..edlora.apply import concept_patches
from ..edlora.arch import cross_attention_sites, layer_of_site, native_resolution, require_supported, text_encoder_names
from ..edlora.concepts import ConceptEntry, ConceptSet
from ..edlora.encode import LayerwiseTokens, encode_layer_stack, encode_prompt, layerwise_tokens, plain_tokens
from ..edlora.errors import ModelFileError, derived_seed
from ..edlora.loras import comfy_warnings
from ..edlora.routing import install_layer_routing
from .capture import GramCapture, input_group, model_pass
from .plan import LayerPlan, plan_layers, stage_of
from .results import STAGES, Fingerprint, FusionError, FusionSettings, StageReport
from .solvers import SOLVERS
from .stats import FusionStats, GramGroup
from .weights import effective_weights

#: The sampler of the per-concept samples whose UNet features are recorded (the original uses DPM-Solver).
SPATIAL_SAMPLER = ("dpmpp_2m", "normal")


@dataclass
class FusionConcept:
    """One concept of a fusion: its entry and its ComfyUI patches on this model (strength 1), by weight key."""

    entry: ConceptEntry
    unet_patches: dict
    clip_patches: dict
    unused: list[str]

    @property
    def name(self) -> str:
        return self.entry.name

    def patched_keys(self) -> set[str]:
        return set(self.unet_patches) | set(self.clip_patches)

    def target(self, key: str, w0: torch.Tensor) -> torch.Tensor:
        """The weight this concept alone gives ``key`` (ComfyUI's own computation at its strength); the base where
        it does not touch the key. Float32, on ``w0``'s device."""
        if key in self.unet_patches:
            patch, strength = self.unet_patches[key], self.entry.unet_strength
        elif key in self.clip_patches:
            patch, strength = self.clip_patches[key], self.entry.text_encoder_strength
        else:
            return w0
        with comfy_warnings() as messages:
            out = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], w0.clone(), key)
        problem = next((m for m in messages if key in m or "ERROR" in m), None)
        if problem is not None or tuple(out.shape) != tuple(w0.shape) or not bool(torch.isfinite(out).all()):
            why = problem or f"it gives a weight of shape {list(out.shape)} with non-finite values or another shape"
            raise ModelFileError(
                f"'{self.entry.source}': its patch for '{key}' does not fit the model's weight {list(w0.shape)} ({why}). "
                "The file is damaged or was made for another architecture."
            )
        return out.float()

    def model_for(self, model, clip, stage_patches: bool = True):
        """Clones of ``model``/``clip`` with this concept's own patches at its strengths."""
        new_model, new_clip = (model.clone() if model is not None else None), (clip.clone() if clip is not None else None)
        if new_model is not None and stage_patches and self.unet_patches:
            new_model.add_patches(self.unet_patches, self.entry.unet_strength)
        if new_clip is not None and self.clip_patches:
            new_clip.add_patches(self.clip_patches, self.entry.text_encoder_strength)
        return new_model, new_clip


def fusion_concepts(concepts: ConceptSet, model, clip) -> list[FusionConcept]:
    """Every concept's patches on ``model``/``clip``; any concept that does not fit is an error naming its file."""
    if len(concepts) == 0:
        raise FusionError("CONCEPTS is empty: connect MoS ED-LoRA Stack or MoS LoRA Concept nodes with at least one concept.")
    out = []
    for entry in concepts.entries:
        unet, text, unused = concept_patches(entry, model, clip)
        out.append(FusionConcept(entry, unet, text, unused))
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return comfy.model_management.get_torch_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise FusionError("device 'cuda' was chosen but no CUDA GPU is available; use 'auto' or 'cpu'.")
    return torch.device(name)


def _first_end(chunk, end_token: int) -> int:
    """Index of the first end-of-text token after the start token (the last position the original keeps)."""
    for index, item in enumerate(chunk[1:], start=1):
        if item[0] == end_token:
            return index
    return len(chunk) - 1


class BaseReader:
    """The base MODEL/CLIP's effective weights, one key at a time (a whole model in float32 would double its size)."""

    def __init__(self, model, clip):
        self.patchers = {"unet": model, "clip": clip.patcher if clip is not None else None}
        self._key_patches: dict[str, dict] = {}

    def __call__(self, key: str) -> torch.Tensor:
        which = "unet" if key.startswith("diffusion_model.") else "clip"
        if which not in self._key_patches:
            self._key_patches[which] = self.patchers[which].get_key_patches()
        return effective_weights(self.patchers[which], [key], self._key_patches[which])[key]


@dataclass
class FusionRun:
    """What every stage shares: the inputs, the concepts' patches, the plan, device, progress and reuse."""

    model: object
    clip: object
    concepts: ConceptSet
    settings: FusionSettings
    members: list[FusionConcept]
    device: torch.device
    plans: dict[str, LayerPlan]
    base: BaseReader
    base_fingerprint: str = ""
    skip: set[str] = field(default_factory=set)  # concepts whose statistics come from ``previous``
    previous: dict[str, FusionStats] | None = None
    stats: dict[str, FusionStats] = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=lambda: {stage: StageReport() for stage in STAGES})
    progress: comfy.utils.ProgressBar | None = None
    check_interrupt: Callable[[], None] = comfy.model_management.throw_exception_if_processing_interrupted

    def keys(self, stage: str, gram: bool = True) -> list[str]:
        return sorted(k for k, p in self.plans.items() if p.stage == stage and p.gram == gram)

    @property
    def original_positions(self) -> bool:
        return self.settings.token_positions == "original"

    def total_steps(self) -> int:
        n = len(self.members)
        samples = sum(len(c.entry.sample_prompts()) for c in self.members)
        return 2 * n + samples * self.settings.sample_steps + len(self.plans)

    def step(self, n: int = 1) -> None:
        self.check_interrupt()
        if self.progress is not None:
            self.progress.update(n)

    def fold(self, stats: FusionStats, concept: FusionConcept, groups: dict[str, GramGroup], keys: list[str]) -> None:
        """Fold one concept's captured groups and its per-key targets (computed one key at a time) into ``stats``."""
        for key in keys:
            if input_group(key) not in groups:
                raise FusionError(f"layer '{key}' received no input while sampling concept {concept.name}")
        for key in keys:
            stats.fold_layer(key, input_group(key), groups[input_group(key)], concept.target(key, self.base(key)), concept.name)
        stats.add_groups(groups)

    def mean_change(self, key: str, w0: torch.Tensor) -> torch.Tensor:
        """Weight fusion's change of ``key``: the mean of the concepts' changes (the paper's Eq. 2, equal weights)."""
        total = torch.zeros_like(w0)
        for concept in self.members:
            total += concept.target(key, w0) - w0
        return total / len(self.members)

    def solve(self, stage: str, stats: FusionStats, iters: int) -> dict[str, torch.Tensor]:
        """Solve every layer of ``stats`` (plus what ``previous`` kept of this stage); returns diffs on the CPU.

        Each solver starts from, and stays near, weight fusion's weights: directions of the input no concept's
        samples excited (a time-embedding layer sees one row per step) keep the mean of the concepts' changes instead
        of falling back to the base, while every excited direction gets the least-squares fit. The report's
        "before" is therefore weight fusion's objective."""
        if self.previous is not None and stage in self.previous:
            stats = self.previous[stage].to(self.device).merged(stats)
        self.stats[stage] = stats
        solver = SOLVERS[self.settings.solver]
        diffs = {}
        for key in sorted(stats.layers):
            gram = stats.gram_of(key)
            w0 = self.base(key)
            anchor = (w0 + self.mean_change(key, w0)).to(gram.device)
            solution = solver.solve(anchor, gram, stats.layers[key], iters, self.settings.ridge, self.check_interrupt)
            self.reports[stage].add(solution.loss_before, solution.loss_after)
            diffs[key] = solution.weight.float().cpu() - w0
            self.step()
        return diffs

    def weight_fuse(self, stage: str) -> dict[str, torch.Tensor]:
        """The planned weight-fused layers of ``stage``: the base plus the mean of the concepts' changes."""
        diffs = {}
        for key in self.keys(stage, gram=False):
            diffs[key] = self.mean_change(key, self.base(key))
            self.step()
        return diffs


def start_run(model, clip, concepts: ConceptSet, settings: FusionSettings, previous=None) -> FusionRun:
    """Check the settings and inputs, plan every layer, and check every concept's target on it; raises before any
    long work starts."""
    if settings.solver not in SOLVERS:
        raise FusionError(f"unknown solver {settings.solver!r}; choose one of {', '.join(SOLVERS)}.")
    if settings.token_positions not in ("padded", "original"):
        raise FusionError(f"unknown token_positions {settings.token_positions!r}; choose 'padded' or 'original'.")
    if 0 < settings.sample_resolution < 64:
        raise FusionError(f"sample_resolution {settings.sample_resolution}: use 0 (the model's own) or at least 64 pixels.")
    require_supported(model, clip, "MoS Gradient Fusion")
    device = resolve_device(settings.device)
    members = fusion_concepts(concepts, model, clip)
    keys = sorted(set().union(*(c.patched_keys() for c in members)))

    def module_of(key: str):
        root = model.model if key.startswith("diffusion_model.") else clip.cond_stage_model
        try:
            return root.get_submodule(key.rsplit(".", 1)[0])
        except AttributeError:
            return None

    plans = plan_layers(keys, module_of, settings.statistics_budget_gb * 2**30, settings.conv_layers == "statistics")
    base = BaseReader(model, clip)
    digest = Fingerprint()
    for key in keys:  # every concept's target computed once now: a patch that does not fit fails before any work
        w0 = base(key)
        for concept in members:
            concept.target(key, w0)
        digest.add(key, w0)
    run = FusionRun(model, clip, concepts, settings, members, device, plans, base, digest.hexdigest())
    if previous is not None:
        if previous.stats is None:
            raise FusionError("the previous fusion kept no statistics; save it with include_statistics on to extend it.")
        if previous.base_fingerprint and previous.base_fingerprint != run.base_fingerprint:
            raise FusionError(
                "the previous fusion was made on a different base model (weights differ); it cannot be extended here."
            )
        names = {c.name for c in members}
        for entry in previous.concepts.entries:
            if entry.name not in names:
                raise FusionError(f"CONCEPTS must include every concept of the previous fusion; {entry.name} is missing.")
        run.skip = {e.name for e in previous.concepts.entries}
        run.previous = previous.stats
    return run


# ------------------------------------------------------------------------------------------------ stages


def concept_tokens(clip, concepts: ConceptSet, prompt: str) -> LayerwiseTokens:
    """A prompt's tokens per layer: layer-wise when it names concept words, otherwise one copy for every layer."""
    return layerwise_tokens(clip, concepts, prompt) or plain_tokens(clip, prompt)


def text_encoder_stage(run: FusionRun) -> FusionStats:
    """Statistics of every fused text-encoder layer from each concept's own CLIP on its prompts."""
    stats = FusionStats()
    keys = run.keys("text_encoder")
    for concept in run.members:
        if concept.name in run.skip or not keys:
            run.step()
            continue
        _, clip_i = concept.model_for(None, run.clip)
        with GramCapture(run.clip.cond_stage_model, keys, run.device) as capture:
            for prompt in concept.entry.text_prompts():
                tokens = concept_tokens(clip_i, run.concepts, prompt)
                masks = {}
                for encoder, variants in tokens.variants.items():  # each text encoder sees its own token lists
                    mask = torch.zeros(len(variants), len(variants[0]), dtype=torch.bool)
                    for row in range(mask.shape[0]):
                        chunk = tokens.base[encoder][row % tokens.chunks]
                        last = _first_end(chunk, tokens.end_tokens[encoder]) if run.original_positions else len(chunk) - 1
                        mask[row, : last + 1] = True
                    masks[f"clip_{encoder}."] = mask
                capture.row_mask = masks
                with model_pass():
                    encode_layer_stack(clip_i, tokens)
            groups = capture.reset()
        run.fold(stats, concept, groups, keys)
        run.step()
    return stats


def cross_attention_stage(run: FusionRun, clip_fused) -> FusionStats:
    """Statistics of every fused attn2 to_k/to_v: layer *l*'s encodings of the concept prompts by the fused CLIP."""
    keys = run.keys("cross_attention_kv")
    sites = cross_attention_sites(run.model.get_model_object("diffusion_model"))
    layer_of = layer_of_site(sites)
    layer_of_key = {f"diffusion_model.{s.path}.{proj}.weight": layer_of[s.key] for s in sites for proj in ("to_k", "to_v")}
    encoder = text_encoder_names(clip_fused)[-1]  # every encoder tokenizes alike: its positions serve all
    stats = FusionStats()
    for concept in run.members:
        if concept.name in run.skip or not keys:
            run.step()
            continue
        rows_by_layer: dict[int, list[torch.Tensor]] = {}
        for prompt in concept.entry.text_prompts():
            tokens = concept_tokens(clip_fused, run.concepts, prompt)
            with model_pass():
                stack, _ = encode_layer_stack(clip_fused, tokens)
            stack = stack.clone()
            chunk = tokens.base[encoder][0]
            if run.original_positions:
                positions = [i for i, t in enumerate(chunk) if t[0] in tokens.stand_in_tokens]
                positions.append(_first_end(chunk, tokens.end_tokens[encoder]))
            else:
                positions = list(range(len(chunk)))
            for layer in set(layer_of.values()):
                rows_by_layer.setdefault(layer, []).append(stack[0, layer if stack.shape[1] > 1 else 0, positions])
        groups: dict[str, GramGroup] = {}
        for key in keys:
            layer = layer_of_key.get(key)
            if layer is None:
                raise FusionError(f"'{key}' is not a cross-attention key/value projection of this model")
            group = input_group(key)
            if group not in groups:
                rows = torch.cat(rows_by_layer[layer]).to(device=run.device, dtype=torch.float32)
                groups[group] = GramGroup.empty(rows.shape[-1], device=run.device)
                groups[group].add_rows(rows)
        run.fold(stats, concept, groups, keys)
        run.step()
    return stats


def spatial_stage(run: FusionRun, clip_fused, kv_diffs: dict[str, torch.Tensor]) -> FusionStats:
    """Statistics of every other fused UNet layer, recorded while each concept samples its prompts alone."""
    settings = run.settings
    keys = run.keys("unet_spatial")
    latent_side = max((settings.sample_resolution or native_resolution(run.model)) // 8, 1)
    stats = FusionStats()
    for index, concept in enumerate(run.members):
        prompts = concept.entry.sample_prompts()
        if concept.name in run.skip or not keys:
            run.step(settings.sample_steps * len(prompts))
            continue
        model_i = run.model.clone()
        model_i.add_patches({k: ("diff", (d,)) for k, d in kv_diffs.items()}, 1.0)
        spatial = {k: p for k, p in concept.unet_patches.items() if stage_of(k) == "unet_spatial"}
        if spatial:
            model_i.add_patches(spatial, concept.entry.unet_strength)
        install_layer_routing(model_i)
        with GramCapture(model_i.model, keys, run.device) as capture:
            for number, prompt in enumerate(prompts):
                with model_pass():
                    positive = encode_prompt(clip_fused, run.concepts, prompt)
                latent = torch.zeros(1, 4, latent_side, latent_side)
                seed = derived_seed(settings.seed, index + number * len(run.members))
                noise = comfy.sample.prepare_noise(latent, seed)
                steps_done = [0]

                def callback(step, x0, x, total, steps_done=steps_done):
                    run.step()
                    steps_done[0] += 1

                with model_pass():
                    comfy.sample.sample(
                        model_i,
                        noise,
                        settings.sample_steps,
                        1.0,
                        SPATIAL_SAMPLER[0],
                        SPATIAL_SAMPLER[1],
                        positive,
                        positive,
                        latent,
                        denoise=1.0,
                        disable_pbar=True,
                        seed=seed,
                        callback=callback,
                    )
                if steps_done[0] < settings.sample_steps:
                    run.step(settings.sample_steps - steps_done[0])
            groups = capture.reset()
        run.fold(stats, concept, groups, keys)
    return stats
