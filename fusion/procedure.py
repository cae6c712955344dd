"""Gradient fusion on ComfyUI's MODEL and CLIP, in the original's order (reference section 2.2).

1. Text-encoder layers: each concept's CLIP (base + its LoRA) encodes ``photo of a {concept}`` and ``{concept}`` in
   all layer variants; the inputs of every LoRA'd text-encoder layer at the real token positions (start to first
   end token) stream into Gram statistics; each layer is solved.
2. Cross-attention K/V: with the fused text encoder, the layer-*l* encodings of the same prompts at the concept
   and end-token positions are the inputs of attn2 to_k/to_v of layer *l*; solved likewise.
3. Every other LoRA'd UNet layer: one sample per concept (``photo of a {concept}``, no CFG, all steps recorded) with
   the fused text encoder and K/V plus that concept's remaining LoRA alone; solved with ``unet_iters``.

Results are diff patches on clones; base weights are read through ``get_key_patches`` (true originals, whatever
clone is loaded) and never modified.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..edlora.apply import edlora_patches, module_keys
from ..edlora.concepts import ConceptEntry, ConceptSet
from ..edlora.encode import encode_layer_stack, encode_prompt, layerwise_tokens
from ..edlora.keys import is_cross_attention_kv
from ..edlora.routing import install_layer_routing
from .capture import GramCapture, input_group
from .solvers import Solution, solve_exact, solve_lbfgs
from .stats import GramGroup, LayerStats, fold_concept, merge_stats

log = logging.getLogger("mixofshow")

STAGES = ("text_encoder", "cross_attention_kv", "unet_spatial")
SPATIAL_SAMPLER = ("dpmpp_2m", "normal")


class FusionError(ValueError):
    pass


@dataclass
class FusionSettings:
    text_encoder_iters: int = 500
    unet_iters: int = 50
    sample_steps: int = 20
    sample_resolution: int = 512
    seed: int = 0
    solver: str = "lbfgs"
    device: str = "auto"
    ridge: float = 1e-6
    #: which token positions of the fusion prompts feed the text-encoder and K/V statistics: "padded" = all of
    #: them, as ComfyUI encodes prompts (padded to 77 tokens); "original" = start..first end token for the text
    #: encoder and concept words + first end token for K/V, as the research code did with unpadded prompts.
    token_positions: str = "padded"

    def as_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


@dataclass
class StageReport:
    layers: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0

    def add(self, solution: Solution) -> None:
        self.layers += 1
        self.loss_before += solution.loss_before
        self.loss_after += solution.loss_after


@dataclass
class FusedModel:
    """The outcome of a fusion: weight diffs against the base, the concepts, and how it was made."""

    method: str
    unet_diffs: dict[str, torch.Tensor]
    text_diffs: dict[str, torch.Tensor]
    concepts: ConceptSet
    settings: dict[str, str] = field(default_factory=dict)
    stage_reports: dict[str, StageReport] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict] | None = None
    base_fingerprint: str = ""

    def apply(self, model, clip):
        """Clones of ``model``/``clip`` with the fused weights as diff patches and layer routing installed."""
        new_model = model.clone()
        new_model.add_patches({k: ("diff", (d,)) for k, d in self.unet_diffs.items()}, 1.0)
        install_layer_routing(new_model)
        new_clip = clip.clone()
        new_clip.add_patches({k: ("diff", (d,)) for k, d in self.text_diffs.items()}, 1.0)
        return new_model, new_clip

    def report(self) -> str:
        lines = [f"Mix-of-Show {self.method}: {len(self.concepts)} concepts ({self.concepts.describe()})"]
        for stage in STAGES:
            r = self.stage_reports.get(stage)
            if r is None or r.layers == 0:
                continue
            change = 100.0 * (r.loss_after - r.loss_before) / r.loss_before if r.loss_before > 0 else 0.0
            lines.append(f"  {stage}: {r.layers} layers, objective {r.loss_before:.4g} -> {r.loss_after:.4g} ({change:+.1f}%)")
        if self.drift:
            lines.append("  identity drift (relative error of the noise prediction against each concept's own ED-LoRA model):")
            for name, value in self.drift.items():
                lines.append(f"    {name}: {value:.4f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return comfy.model_management.get_torch_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise FusionError("device 'cuda' was chosen but no CUDA GPU is available; use 'auto' or 'cpu'.")
    return torch.device(name)


def effective_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """Weights of ``keys`` as ``patcher`` would compute them (original + its patches), float32 on the CPU."""
    key_patches = patcher.get_key_patches()
    out = {}
    for key in keys:
        original, convert = key_patches[key][0]
        weight = convert(original.to(device="cpu", dtype=torch.float32, copy=True), inplace=True)
        patches = key_patches[key][1:]
        if patches:
            weight = comfy.lora.calculate_weight(patches, weight, key)
        out[key] = weight.detach().float()
    return out


class BaseWeights:
    """The effective weights of a base MODEL and CLIP by key, and the maps from the original's key names."""

    def __init__(self, model, clip):
        self.model = model
        self.clip = clip

    def __call__(self, keys) -> dict[str, torch.Tensor]:
        unet = [k for k in keys if k.startswith("diffusion_model.")]
        text = [k for k in keys if not k.startswith("diffusion_model.")]
        out = effective_weights(self.model, unet) if unet else {}
        if text:
            out.update(effective_weights(self.clip.patcher, text))
        return out

    def key_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """``({diffusers UNet weight key: model key}, {text_model... weight key: clip key})``."""
        unet = {
            k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(self.model.model.model_config.unet_config).items()
        }
        text = {}
        for lora_key, clip_key in comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, {}).items():
            if lora_key.startswith("text_encoder.text_model."):
                text[lora_key[len("text_encoder.") :] + ".weight"] = clip_key
        return unet, text


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().to(torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class _ConceptLoRA:
    name: str
    entry: ConceptEntry
    unet_keys: dict[str, str]
    text_keys: dict[str, str]

    def delta(self, section: str, key: str) -> torch.Tensor | None:
        keys = self.unet_keys if section == "unet" else self.text_keys
        pairs = self.entry.edlora.unet if section == "unet" else self.entry.edlora.text_encoder
        strength = self.entry.unet_strength if section == "unet" else self.entry.text_encoder_strength
        for module, k in keys.items():
            if k == key:
                return strength * pairs[module].delta()
        return None


class _Progress:
    def __init__(self, total: int, check_interrupt: Callable[[], None]):
        self.bar = comfy.utils.ProgressBar(total)
        self.check = check_interrupt

    def step(self, n: int = 1) -> None:
        self.check()
        self.bar.update(n)


def _first_end(chunk, end_token: int) -> int:
    """Index of the first end-of-text token after the start token (the last position the original keeps)."""
    for index, item in enumerate(chunk[1:], start=1):
        if item[0] == end_token:
            return index
    return len(chunk) - 1


def _targets(concept: _ConceptLoRA, section: str, keys, w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        delta = concept.delta(section, key)
        out[key] = w0[key] if delta is None else w0[key] + delta.reshape(w0[key].shape)
    return out


def _fold(stats: dict, concept_groups: dict[str, GramGroup], targets: dict[str, torch.Tensor], name: str, device) -> None:
    for key, target in targets.items():
        group = input_group(key)
        if group not in concept_groups:
            raise FusionError(f"layer '{key}' received no input while sampling concept {name}")
        if key not in stats["layers"]:
            stats["layers"][key] = LayerStats.empty(group, target.shape[0], target.flatten(1).shape[1], device=device)
        fold_concept(stats["layers"][key], concept_groups[group], target, name)
    for group, gram in concept_groups.items():
        if group in stats["groups"]:
            stats["groups"][group].gram += gram.gram
            stats["groups"][group].rows += gram.rows
        else:
            stats["groups"][group] = gram


def _solve_stage(
    stats: dict, w0: dict[str, torch.Tensor], iters: int, settings: FusionSettings, progress: _Progress, report: StageReport
) -> dict[str, torch.Tensor]:
    diffs = {}
    for key in sorted(stats["layers"]):
        layer = stats["layers"][key]
        gram = stats["groups"][layer.group].gram
        weight0 = w0[key].to(gram.device)
        if settings.solver == "exact":
            solution = solve_exact(weight0, gram, layer.cross, layer.const, layer.rows, ridge=settings.ridge)
        else:
            solution = solve_lbfgs(
                weight0,
                gram,
                layer.cross,
                layer.const,
                layer.rows,
                iters,
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
            )
        report.add(solution)
        diffs[key] = (solution.weight.float() - weight0.float()).cpu()
        progress.step()
    return diffs


# ------------------------------------------------------------------------------------------ stages


def _text_stage(
    clip, concepts: list[_ConceptLoRA], all_concepts: ConceptSet, keys, w0, device, progress, skip: set, original_positions: bool
) -> dict:
    stats = {"groups": {}, "layers": {}}
    root = clip.cond_stage_model
    for concept in concepts:
        if concept.name in skip:
            progress.step()
            continue
        clip_i = clip.clone()
        _, text_patches = edlora_patches(concept.entry.edlora, None, clip)
        if text_patches:
            clip_i.add_patches(text_patches, concept.entry.text_encoder_strength)
        with GramCapture(root, keys, device) as capture:
            for prompt in (f"photo of a {concept.name}", concept.name):
                tokens = layerwise_tokens(clip_i, all_concepts, prompt)
                if set(tokens.variants) != {"l"}:
                    raise FusionError(
                        f"Gradient fusion supports SD1.x text encoders (one CLIP-L); this CLIP has {', '.join(tokens.variants)}."
                    )
                mask = torch.zeros(len(tokens.variants["l"]), len(tokens.variants["l"][0]), dtype=torch.bool)
                for row in range(mask.shape[0]):
                    chunk = tokens.base["l"][row % tokens.chunks]
                    last = _first_end(chunk, tokens.end_tokens["l"]) if original_positions else len(chunk) - 1
                    mask[row, : last + 1] = True
                capture.row_mask = mask
                encode_layer_stack(clip_i, tokens)
            groups = capture.reset()
        _fold(stats, groups, _targets(concept, "text", keys, w0), concept.name, device)
        progress.step()
    return stats


def _kv_stage(
    clip_fused,
    model,
    concepts: list[_ConceptLoRA],
    all_concepts: ConceptSet,
    keys,
    w0,
    device,
    progress,
    skip: set,
    original_positions: bool,
) -> dict:
    from ..edlora.routing import cross_attention_modules

    diffusion_model = model.get_model_object("diffusion_model")
    names = {id(m): n for n, m in diffusion_model.named_modules()}
    layer_of_key = {}
    for layer, attn in enumerate(cross_attention_modules(diffusion_model)):
        for proj in ("to_k", "to_v"):
            layer_of_key[f"diffusion_model.{names[id(attn)]}.{proj}.weight"] = layer
    stats = {"groups": {}, "layers": {}}
    for concept in concepts:
        if concept.name in skip:
            progress.step()
            continue
        rows_by_layer: dict[int, list[torch.Tensor]] = {}
        for prompt in (f"photo of a {concept.name}", concept.name):
            tokens = layerwise_tokens(clip_fused, all_concepts, prompt)
            stack, _ = encode_layer_stack(clip_fused, tokens)
            chunk = tokens.base["l"][0]
            if original_positions:
                positions = [i for i, t in enumerate(chunk) if t[0] in tokens.stand_in_tokens]
                positions.append(_first_end(chunk, tokens.end_tokens["l"]))
            else:
                positions = list(range(len(chunk)))
            for layer in range(stack.shape[1]):
                rows_by_layer.setdefault(layer, []).append(stack[0, layer, positions])
        concept_groups = {}
        for key in keys:
            layer = layer_of_key.get(key)
            if layer is None:
                raise FusionError(f"'{key}' is not a cross-attention key/value projection of this model")
            group = input_group(key)
            if group not in concept_groups:
                rows = torch.cat(rows_by_layer[layer if len(rows_by_layer) > 1 else 0]).to(device=device, dtype=torch.float32)
                concept_groups[group] = GramGroup.empty(rows.shape[-1], device=device)
                concept_groups[group].add_rows(rows)
        _fold(stats, concept_groups, _targets(concept, "unet", keys, w0), concept.name, device)
        progress.step()
    return stats


def _spatial_stage(
    model,
    clip_fused,
    kv_diffs,
    concepts: list[_ConceptLoRA],
    all_concepts: ConceptSet,
    keys,
    w0,
    settings: FusionSettings,
    device,
    progress,
    skip: set,
) -> dict:
    stats = {"groups": {}, "layers": {}}
    latent_side = max(settings.sample_resolution // 8, 1)
    for index, concept in enumerate(concepts):
        if concept.name in skip:
            progress.step(settings.sample_steps)
            continue
        model_i = model.clone()
        model_i.add_patches({k: ("diff", (d,)) for k, d in kv_diffs.items()}, 1.0)
        unet_patches, _ = edlora_patches(concept.entry.edlora, model, None)
        spatial = {k: p for k, p in unet_patches.items() if not is_cross_attention_kv(k)}
        if spatial:
            model_i.add_patches(spatial, concept.entry.unet_strength)
        install_layer_routing(model_i)
        positive = encode_prompt(clip_fused, all_concepts, f"photo of a {concept.name}")
        latent = torch.zeros(1, 4, latent_side, latent_side)
        seed = settings.seed + index
        noise = comfy.sample.prepare_noise(latent, seed)
        steps_done = [0]

        def callback(step, x0, x, total, steps_done=steps_done):
            progress.step()
            steps_done[0] += 1

        with GramCapture(model_i.model, keys, device) as capture:
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
            progress.step(settings.sample_steps - steps_done[0])
        _fold(stats, groups, _targets(concept, "unet", keys, w0), concept.name, device)
    return stats


# ------------------------------------------------------------------------------------------ entry points


def _concept_loras(concepts: ConceptSet, model, clip) -> list[_ConceptLoRA]:
    if len(concepts) == 0:
        raise FusionError("CONCEPTS is empty: connect MoS ED-LoRA Stack (or Loader) nodes with at least one ED-LoRA.")
    out = []
    for entry in concepts.entries:
        unet_keys, text_keys = module_keys(entry.edlora, model, clip)
        out.append(_ConceptLoRA(entry.edlora.concept_name, entry, unet_keys, text_keys))
    return out


def gradient_fusion(
    model, clip, concepts: ConceptSet, settings: FusionSettings, previous: FusedModel | None = None, measure_drift: bool = True
) -> FusedModel:
    """Fuse ``concepts`` into ``model``/``clip`` (never modified) with the paper's gradient fusion.

    With ``previous`` (a fusion that kept its statistics), concepts already in it are not re-sampled: their
    statistics are reused and the new concepts' statistics are added before solving again.
    """
    if settings.solver not in ("lbfgs", "exact"):
        raise FusionError(f"unknown solver {settings.solver!r}; choose 'lbfgs' or 'exact'.")
    if settings.token_positions not in ("padded", "original"):
        raise FusionError(f"unknown token_positions {settings.token_positions!r}; choose 'padded' or 'original'.")
    original = settings.token_positions == "original"
    device = resolve_device(settings.device)
    check = comfy.model_management.throw_exception_if_processing_interrupted
    loras = _concept_loras(concepts, model, clip)
    text_keys = sorted({k for c in loras for k in c.text_keys.values()})
    unet_keys = sorted({k for c in loras for k in c.unet_keys.values()})
    kv_keys = [k for k in unet_keys if is_cross_attention_kv(k)]
    spatial_keys = [k for k in unet_keys if not is_cross_attention_kv(k)]
    w0_text = effective_weights(clip.patcher, text_keys)
    w0_unet = effective_weights(model, unet_keys)
    base_print = fingerprint({**w0_text, **w0_unet})

    skip: set[str] = set()
    previous_stats = None
    if previous is not None:
        if previous.stats is None:
            raise FusionError("the previous fusion kept no statistics; save it with include_statistics on to extend it.")
        if previous.base_fingerprint and previous.base_fingerprint != base_print:
            raise FusionError(
                "the previous fusion was made on a different base model (weights differ); it cannot be extended here."
            )
        skip = {e.edlora.concept_name for e in previous.concepts.entries}
        for entry in previous.concepts.entries:
            if entry.edlora.concept_name not in {c.name for c in loras}:
                raise FusionError(
                    f"CONCEPTS must include every concept of the previous fusion; {entry.edlora.concept_name} is missing."
                )
        previous_stats = previous.stats

    n = len(loras)
    total = n + len(text_keys) + n + len(kv_keys) + n * settings.sample_steps + len(spatial_keys)
    progress = _Progress(total, check)
    reports = {stage: StageReport() for stage in STAGES}
    all_stats = {}

    def combine(stage, stats):
        if previous_stats is not None and stage in previous_stats:
            stats = merge_stats(_to_device(previous_stats[stage], device), stats)
        all_stats[stage] = stats
        return stats

    with torch.inference_mode(False), torch.no_grad():
        stats = combine("text_encoder", _text_stage(clip, loras, concepts, text_keys, w0_text, device, progress, skip, original))
        text_diffs = _solve_stage(stats, w0_text, settings.text_encoder_iters, settings, progress, reports["text_encoder"])
        clip_fused = clip.clone()
        clip_fused.add_patches({k: ("diff", (d,)) for k, d in text_diffs.items()}, 1.0)

        stats = combine(
            "cross_attention_kv",
            _kv_stage(clip_fused, model, loras, concepts, kv_keys, w0_unet, device, progress, skip, original),
        )
        kv_diffs = _solve_stage(stats, w0_unet, settings.text_encoder_iters, settings, progress, reports["cross_attention_kv"])

        stats = combine(
            "unet_spatial",
            _spatial_stage(model, clip_fused, kv_diffs, loras, concepts, spatial_keys, w0_unet, settings, device, progress, skip),
        )
        spatial_diffs = _solve_stage(stats, w0_unet, settings.unet_iters, settings, progress, reports["unet_spatial"])

    fused = FusedModel(
        method=f"gradient fusion ({settings.solver})",
        unet_diffs={**kv_diffs, **spatial_diffs},
        text_diffs=text_diffs,
        concepts=concepts,
        settings=settings.as_metadata(),
        stage_reports=reports,
        stats={k: _to_device(v, "cpu") for k, v in all_stats.items()},
        base_fingerprint=base_print,
    )
    if measure_drift:
        fused.drift = identity_drift(model, clip, fused)
    log.info("%s", fused.report())
    return fused


def weight_fusion(
    model,
    clip,
    concepts: ConceptSet,
    weights: list[float] | None = None,
    measure_drift: bool = True,
    settings: FusionSettings | None = None,
) -> FusedModel:
    """The paper's baseline (Eq. 2): ``W0 + sum_i w_i a_i dW_i`` with ``sum_i w_i = 1`` (equal weights by default)."""
    loras = _concept_loras(concepts, model, clip)
    weights = list(weights) if weights else [1.0] * len(loras)
    if len(weights) != len(loras):
        raise FusionError(f"weights has {len(weights)} values but CONCEPTS holds {len(loras)} ED-LoRAs.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError("weights must be non-negative and not all zero.")
    weights = [w / sum(weights) for w in weights]
    unet_diffs: dict[str, torch.Tensor] = {}
    text_diffs: dict[str, torch.Tensor] = {}
    for concept, w in zip(loras, weights, strict=True):
        for section, keys, out in (("unet", concept.unet_keys, unet_diffs), ("text", concept.text_keys, text_diffs)):
            for key in keys.values():
                delta = concept.delta(section, key)
                out[key] = out.get(key, 0) + w * delta
    shapes = model.model.state_dict()
    unet_diffs = {k: v.reshape(shapes[k].shape).float() for k, v in unet_diffs.items()}
    clip_shapes = clip.cond_stage_model.state_dict()
    text_diffs = {k: v.reshape(clip_shapes[k].shape).float() for k, v in text_diffs.items()}
    w0 = {**effective_weights(clip.patcher, sorted(text_diffs)), **effective_weights(model, sorted(unet_diffs))}
    settings = settings or FusionSettings()
    fused = FusedModel(
        method="weight fusion",
        unet_diffs=unet_diffs,
        text_diffs=text_diffs,
        concepts=concepts,
        settings={"weights": ",".join(f"{w:.6g}" for w in weights)},
        base_fingerprint=fingerprint(w0),
    )
    if measure_drift:
        fused.drift = identity_drift(model, clip, fused)
    log.info("%s", fused.report())
    return fused


def _to_device(stats: dict, device) -> dict:
    return {
        "groups": {k: GramGroup(v.gram.to(device), v.rows) for k, v in stats["groups"].items()},
        "layers": {
            k: LayerStats(v.group, v.cross.to(device), v.const.to(device), v.rows, list(v.concepts))
            for k, v in stats["layers"].items()
        },
    }


# ------------------------------------------------------------------------------------------ identity drift

#: The identity-drift protocol, the same for every fusion method so their reports compare: a 512x512 latent,
#: three noise levels, a fixed noise seed per concept.
DRIFT_SIGMAS = (8.0, 1.0, 0.2)
DRIFT_RESOLUTION = 512
DRIFT_SEED = 1000


def denoiser_outputs(model, positive, latent: torch.Tensor, sigmas: list[float], seed: int) -> list[torch.Tensor]:
    """The model's noise predictions (no CFG) at ``latent + noise * sigma`` for each sigma, through ComfyUI's sampler stack."""
    outputs: list[torch.Tensor] = []
    sigma_list = list(sigmas)

    def evaluate(model_k, x, sigma_schedule, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        base_noise = x / sigma_schedule[0]
        for sigma in sigma_list:
            s = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
            x_s = base_noise * sigma
            denoised = model_k(x_s, s, **extra_args)
            outputs.append(((x_s - denoised) / sigma).float().cpu())
        return x

    sampler = comfy.samplers.KSAMPLER(evaluate)
    noise = comfy.sample.prepare_noise(latent, seed)
    schedule = torch.tensor(sigma_list + [0.0])
    with torch.no_grad():
        comfy.sample.sample_custom(model, noise, 1.0, sampler, schedule, positive, positive, latent, disable_pbar=True, seed=seed)
    return outputs


def identity_drift(model, clip, fused: FusedModel) -> dict[str, float]:
    """Per concept: ``||eps_fused - eps_single|| / ||eps_single||`` on the concept's prompt at a few noise levels.

    ``eps_single`` comes from the base model with only that concept's ED-LoRA (at its fusion strengths), the reference
    the fusion tries to preserve; ``eps_fused`` from the fused model with the same prompt, latent and noise.
    """
    fused_model, fused_clip = fused.apply(model, clip)
    sampling = model.get_model_object("model_sampling")
    sigmas = [min(max(s, float(sampling.sigma_min)), float(sampling.sigma_max)) for s in DRIFT_SIGMAS]
    side = DRIFT_RESOLUTION // 8
    latent = torch.zeros(1, 4, side, side)
    out = {}
    for index, entry in enumerate(fused.concepts.entries):
        comfy.model_management.throw_exception_if_processing_interrupted()
        name = entry.edlora.concept_name
        single = ConceptSet((entry,))
        unet_patches, text_patches = edlora_patches(entry.edlora, model, clip)
        single_model = model.clone()
        if unet_patches:
            single_model.add_patches(unet_patches, entry.unet_strength)
        install_layer_routing(single_model)
        single_clip = clip.clone()
        if text_patches:
            single_clip.add_patches(text_patches, entry.text_encoder_strength)
        prompt = f"photo of a {name}"
        seed = DRIFT_SEED + index
        reference = denoiser_outputs(single_model, encode_prompt(single_clip, single, prompt), latent, sigmas, seed)
        fused_out = denoiser_outputs(fused_model, encode_prompt(fused_clip, fused.concepts, prompt), latent, sigmas, seed)
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(fused_out, reference, strict=True))
        den = sum(float((b**2).sum()) for b in reference)
        out[name] = (num / max(den, 1e-30)) ** 0.5
    return out
