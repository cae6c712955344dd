"""The three stages of gradient fusion (reference section 2.2) around one shared :class:`FusionRun`.

1. Text-encoder layers: each concept's CLIP (base + its LoRA) encodes ``photo of a {concept}`` and ``{concept}`` in
   all layer variants; the inputs of every LoRA'd text-encoder layer stream into Gram statistics.
2. Cross-attention K/V: with the fused text encoder, the layer-*l* encodings of the same prompts are the inputs of
   attn2 to_k/to_v of layer *l*.
3. Every other LoRA'd UNet layer: one sample per concept (``photo of a {concept}``, no CFG, all steps recorded) with
   the fused text encoder and K/V plus that concept's remaining LoRA alone.

Which prompt positions count is a setting (``token_positions``): all positions of the padded prompt by default, or
the research code's (real tokens for the text encoder; concept tokens and the first end token for K/V). Each stage
returns one concept's statistics folded after another; :meth:`FusionRun.solve` adds statistics kept from an
earlier fusion and solves every layer with the chosen solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management
import comfy.sample
import comfy.utils
import torch

from ..edlora.apply import edlora_patches, fit_to_model
from ..edlora.arch import cross_attention_sites, layer_of_site, text_encoder_names
from ..edlora.concepts import ConceptEntry, ConceptSet
from ..edlora.encode import encode_layer_stack, encode_prompt, layerwise_tokens
from ..edlora.errors import derived_seed
from ..edlora.keys import is_cross_attention_kv
from ..edlora.routing import install_layer_routing
from .capture import GramCapture, input_group
from .results import STAGES, FusionError, FusionSettings, StageReport, fingerprint
from .solvers import SOLVERS
from .stats import FusionStats, GramGroup
from .weights import effective_weights

#: The sampler of the per-concept samples whose UNet features are recorded (the original uses DPM-Solver).
SPATIAL_SAMPLER = ("dpmpp_2m", "normal")


@dataclass
class ConceptLoRA:
    """One concept of a fusion: its entry and where its LoRA modules live in this model (module -> weight key)."""

    name: str
    entry: ConceptEntry
    unet_keys: dict[str, str]
    text_keys: dict[str, str]

    def delta(self, section: str, key: str) -> torch.Tensor | None:
        """Its strength-scaled weight delta for a model (``section = "unet"``) or CLIP key, or None."""
        keys = self.unet_keys if section == "unet" else self.text_keys
        pairs = self.entry.edlora.unet if section == "unet" else self.entry.edlora.text_encoder
        strength = self.entry.unet_strength if section == "unet" else self.entry.text_encoder_strength
        for module, k in keys.items():
            if k == key:
                return strength * pairs[module].delta()
        return None

    def targets(self, section: str, keys, w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per key, the weight this concept alone would have: the base plus its delta (the base where it has none)."""
        out = {}
        for key in keys:
            delta = self.delta(section, key)
            out[key] = w0[key] if delta is None else w0[key] + delta.reshape(w0[key].shape)
        return out


def concept_loras(concepts: ConceptSet, model, clip) -> list[ConceptLoRA]:
    if len(concepts) == 0:
        raise FusionError("CONCEPTS is empty: connect MoS ED-LoRA Stack (or Loader) nodes with at least one ED-LoRA.")
    out = []
    for entry in concepts.entries:
        unet_keys, text_keys = fit_to_model(entry.edlora, model, clip)
        out.append(ConceptLoRA(entry.edlora.concept_name, entry, unet_keys, text_keys))
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


@dataclass
class FusionRun:
    """What every stage shares: the inputs, the concepts' keys, base weights, device, progress and reuse."""

    model: object
    clip: object
    concepts: ConceptSet
    settings: FusionSettings
    loras: list[ConceptLoRA]
    device: torch.device
    w0_text: dict[str, torch.Tensor]
    w0_unet: dict[str, torch.Tensor]
    skip: set[str] = field(default_factory=set)  # concepts whose statistics come from ``previous``
    previous: dict[str, FusionStats] | None = None
    stats: dict[str, FusionStats] = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=lambda: {stage: StageReport() for stage in STAGES})
    progress: comfy.utils.ProgressBar | None = None
    check_interrupt: Callable[[], None] = comfy.model_management.throw_exception_if_processing_interrupted

    @property
    def text_keys(self) -> list[str]:
        return sorted(self.w0_text)

    @property
    def kv_keys(self) -> list[str]:
        return [k for k in sorted(self.w0_unet) if is_cross_attention_kv(k)]

    @property
    def spatial_keys(self) -> list[str]:
        return [k for k in sorted(self.w0_unet) if not is_cross_attention_kv(k)]

    @property
    def original_positions(self) -> bool:
        return self.settings.token_positions == "original"

    def total_steps(self) -> int:
        n = len(self.loras)
        return n + len(self.text_keys) + n + len(self.kv_keys) + n * self.settings.sample_steps + len(self.spatial_keys)

    def step(self, n: int = 1) -> None:
        self.check_interrupt()
        if self.progress is not None:
            self.progress.update(n)

    def fold(self, stats: FusionStats, concept: ConceptLoRA, groups: dict[str, GramGroup], targets: dict) -> None:
        for key in targets:
            if input_group(key) not in groups:
                raise FusionError(f"layer '{key}' received no input while sampling concept {concept.name}")
        stats.fold_concept(concept.name, groups, targets, input_group)

    def solve(self, stage: str, stats: FusionStats, iters: int) -> dict[str, torch.Tensor]:
        """Solve every layer of ``stats`` (plus what ``previous`` kept of this stage); returns diffs on the CPU."""
        if self.previous is not None and stage in self.previous:
            stats = self.previous[stage].to(self.device).merged(stats)
        self.stats[stage] = stats
        solver = SOLVERS[self.settings.solver]
        w0 = self.w0_text if stage == "text_encoder" else self.w0_unet
        diffs = {}
        for key in sorted(stats.layers):
            gram = stats.gram_of(key)
            weight0 = w0[key].to(gram.device)
            solution = solver.solve(weight0, gram, stats.layers[key], iters, self.settings.ridge, self.check_interrupt)
            self.reports[stage].add(solution.loss_before, solution.loss_after)
            diffs[key] = (solution.weight.float() - weight0.float()).cpu()
            self.step()
        return diffs


def start_run(model, clip, concepts: ConceptSet, settings: FusionSettings, previous=None) -> FusionRun:
    """Check the settings and inputs and read the base weights; raises before any long work starts."""
    if settings.solver not in SOLVERS:
        raise FusionError(f"unknown solver {settings.solver!r}; choose one of {', '.join(SOLVERS)}.")
    if settings.token_positions not in ("padded", "original"):
        raise FusionError(f"unknown token_positions {settings.token_positions!r}; choose 'padded' or 'original'.")
    encoders = text_encoder_names(clip)
    if len(encoders) != 1:
        raise FusionError(
            f"Gradient fusion supports one text encoder (SD1.x CLIP-L); this CLIP has {len(encoders)} ({', '.join(encoders)})."
        )
    device = resolve_device(settings.device)
    loras = concept_loras(concepts, model, clip)
    text_keys = sorted({k for c in loras for k in c.text_keys.values()})
    unet_keys = sorted({k for c in loras for k in c.unet_keys.values()})
    run = FusionRun(
        model,
        clip,
        concepts,
        settings,
        loras,
        device,
        effective_weights(clip.patcher, text_keys),
        effective_weights(model, unet_keys),
    )
    if previous is not None:
        if previous.stats is None:
            raise FusionError("the previous fusion kept no statistics; save it with include_statistics on to extend it.")
        if previous.base_fingerprint and previous.base_fingerprint != run_fingerprint(run):
            raise FusionError(
                "the previous fusion was made on a different base model (weights differ); it cannot be extended here."
            )
        names = {c.name for c in loras}
        for entry in previous.concepts.entries:
            if entry.edlora.concept_name not in names:
                raise FusionError(
                    f"CONCEPTS must include every concept of the previous fusion; {entry.edlora.concept_name} is missing."
                )
        run.skip = {e.edlora.concept_name for e in previous.concepts.entries}
        run.previous = previous.stats
    return run


def run_fingerprint(run: FusionRun) -> str:
    """The fingerprint of the base weights this run fuses into."""
    return fingerprint({**run.w0_text, **run.w0_unet})


# ------------------------------------------------------------------------------------------------ stages


def text_encoder_stage(run: FusionRun) -> FusionStats:
    """Statistics of every fused text-encoder layer from each concept's own CLIP on its two prompts."""
    stats = FusionStats()
    (encoder,) = text_encoder_names(run.clip)
    for concept in run.loras:
        if concept.name in run.skip:
            run.step()
            continue
        clip_i = run.clip.clone()
        _, text_patches = edlora_patches(concept.entry.edlora, None, run.clip)
        if text_patches:
            clip_i.add_patches(text_patches, concept.entry.text_encoder_strength)
        with GramCapture(run.clip.cond_stage_model, run.text_keys, run.device) as capture:
            for prompt in (f"photo of a {concept.name}", concept.name):
                tokens = layerwise_tokens(clip_i, run.concepts, prompt)
                variants = tokens.variants[encoder]
                mask = torch.zeros(len(variants), len(variants[0]), dtype=torch.bool)
                for row in range(mask.shape[0]):
                    chunk = tokens.base[encoder][row % tokens.chunks]
                    last = _first_end(chunk, tokens.end_tokens[encoder]) if run.original_positions else len(chunk) - 1
                    mask[row, : last + 1] = True
                capture.row_mask = mask
                encode_layer_stack(clip_i, tokens)
            groups = capture.reset()
        run.fold(stats, concept, groups, concept.targets("text", run.text_keys, run.w0_text))
        run.step()
    return stats


def cross_attention_stage(run: FusionRun, clip_fused) -> FusionStats:
    """Statistics of every fused attn2 to_k/to_v: layer *l*'s encodings of the concept prompts by the fused CLIP."""
    diffusion_model = run.model.get_model_object("diffusion_model")
    sites = cross_attention_sites(diffusion_model)
    layer_of = layer_of_site(sites)
    layer_of_key = {
        f"diffusion_model.{site.path}.{proj}.weight": layer_of[site.key] for site in sites for proj in ("to_k", "to_v")
    }
    (encoder,) = text_encoder_names(clip_fused)
    stats = FusionStats()
    for concept in run.loras:
        if concept.name in run.skip:
            run.step()
            continue
        rows_by_layer: dict[int, list[torch.Tensor]] = {}
        for prompt in (f"photo of a {concept.name}", concept.name):
            tokens = layerwise_tokens(clip_fused, run.concepts, prompt)
            stack, _ = encode_layer_stack(clip_fused, tokens)
            chunk = tokens.base[encoder][0]
            if run.original_positions:
                positions = [i for i, t in enumerate(chunk) if t[0] in tokens.stand_in_tokens]
                positions.append(_first_end(chunk, tokens.end_tokens[encoder]))
            else:
                positions = list(range(len(chunk)))
            for layer in range(stack.shape[1]):
                rows_by_layer.setdefault(layer, []).append(stack[0, layer, positions])
        groups: dict[str, GramGroup] = {}
        for key in run.kv_keys:
            layer = layer_of_key.get(key)
            if layer is None:
                raise FusionError(f"'{key}' is not a cross-attention key/value projection of this model")
            group = input_group(key)
            if group not in groups:
                rows = torch.cat(rows_by_layer[layer if len(rows_by_layer) > 1 else 0]).to(device=run.device, dtype=torch.float32)
                groups[group] = GramGroup.empty(rows.shape[-1], device=run.device)
                groups[group].add_rows(rows)
        run.fold(stats, concept, groups, concept.targets("unet", run.kv_keys, run.w0_unet))
        run.step()
    return stats


def spatial_stage(run: FusionRun, clip_fused, kv_diffs: dict[str, torch.Tensor]) -> FusionStats:
    """Statistics of every other fused UNet layer, recorded while each concept samples its prompt alone."""
    settings = run.settings
    latent_side = max(settings.sample_resolution // 8, 1)
    stats = FusionStats()
    for index, concept in enumerate(run.loras):
        if concept.name in run.skip:
            run.step(settings.sample_steps)
            continue
        model_i = run.model.clone()
        model_i.add_patches({k: ("diff", (d,)) for k, d in kv_diffs.items()}, 1.0)
        unet_patches, _ = edlora_patches(concept.entry.edlora, run.model, None)
        spatial = {k: p for k, p in unet_patches.items() if not is_cross_attention_kv(k)}
        if spatial:
            model_i.add_patches(spatial, concept.entry.unet_strength)
        install_layer_routing(model_i)
        positive = encode_prompt(clip_fused, run.concepts, f"photo of a {concept.name}")
        latent = torch.zeros(1, 4, latent_side, latent_side)
        seed = derived_seed(settings.seed, index)
        noise = comfy.sample.prepare_noise(latent, seed)
        steps_done = [0]

        def callback(step, x0, x, total, steps_done=steps_done):
            run.step()
            steps_done[0] += 1

        with GramCapture(model_i.model, run.spatial_keys, run.device) as capture:
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
            groups = capture.reset()
        if steps_done[0] < settings.sample_steps:
            run.step(settings.sample_steps - steps_done[0])
        run.fold(stats, concept, groups, concept.targets("unet", run.spatial_keys, run.w0_unet))
    return stats
