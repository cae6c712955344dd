"""Single-client tuning: train one concept's ED-LoRA on a ComfyUI MODEL/CLIP (paper 3.3.1, reference 1.3-1.7).

What is trained, as in the original main branch:

* one ``[layers, width]`` embedding per concept word (16 layer-wise vectors for SD1.x). The first words start
  from N(0, 0.013^2), the last word from the class word's token embedding; each start vector is copied to
  every layer. The token table itself is never touched: the vectors enter prompts as tensors, so every other
  row stays frozen by construction;
* a rank-r LoRA (``y = W x + up(down(x))``, no rank scaling; down Kaiming-uniform, up zero) on q/k/v/out of
  every CLIP self-attention and every UNet attention (self and cross), see :mod:`.targets`.

One step: draw a batch, a DDPM timestep per image and noise with a small per-channel offset; encode the
captions layer-wise with the live vectors (one batched text-encoder call) and predict the noise (or v) through
the routed UNet; the loss is the MSE to the target, averaged over the subject mask when masks are used, plus
the attention regulariser when there are subject masks. AdamW with one learning rate per group, linear decay to
zero, no warm-up. When the mean norm of the concept vectors reaches the threshold, they stop learning.

ComfyUI loads model weights under ``torch.inference_mode``; such tensors cannot take part in autograd. While a
run lasts, :func:`.hooks.autograd_usable` swaps them for ordinary copies with the same values and puts the
originals back afterwards, so the shared model objects end exactly as they were. The losses are in
:mod:`.losses`, the hooks in :mod:`.hooks`, images and captions in :mod:`.data`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import torch

from ..edlora.apply import fit_to_model, text_embedding_width, token_embedding
from ..edlora.arch import cross_attention_sites, layer_count, require_supported, text_encoder_widths
from ..edlora.concepts import ConceptEntry, ConceptSet
from ..edlora.encode import LayerwiseTokens, encoder_slices, layerwise_tokens, plain_tokens, single_token
from ..edlora.errors import derived_seed
from ..edlora.format import EDLoRA, EDLoRAError, LoRAPair
from ..edlora.prompt import layer_variants
from ..edlora.routing import LAYER_CONTEXT_KEY, install_layer_routing, layerwise_conditioning
from ..edlora.targets import Target, text_attention_targets, unet_attention_targets
from .hooks import AttentionProbe, LoRAHooks, autograd_usable, checkpointed_blocks, layer_norm_inputs_kept
from .losses import attention_regularisation, diffusion_target, latent_masks, masked_mse, mean_embedding_norm

log = logging.getLogger("mixofshow")
RANDOM_INIT_STD = 0.013
LATENT_SCALE = 8  # pixels per latent cell (SD1.x and SDXL VAEs)
RANDOM_INIT_STD_WITHOUT_CLASS = 0.017


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one run; the defaults are the original's (``8101_EDLoRA_potter_Cmix_B4``) and the single
    source of MoS Train ED-LoRA's widget defaults."""

    words: tuple[str, ...] = ("<name1>", "<name2>")
    class_word: str = "person"
    rank: int = 4
    steps: int = 1000
    batch_size: int = 2
    seed: int = 0
    lr_embedding: float = 1e-3
    lr_text_encoder: float = 1e-5
    lr_unet: float = 1e-4
    weight_decay: float = 0.01
    noise_offset: float = 0.01
    embedding_norm_threshold: float = 0.55
    mask_loss: bool = True
    attention_reg_weight: float = 0.01
    gradient_checkpointing: bool = False


@dataclass
class TrainingData:
    """What a run learns from: model-space latents, one prompt per image, and the masks."""

    latents: torch.Tensor  # [N, C, h, w], already scaled into the model's latent space
    prompts: list[str]  # captions with the concept words written out
    subject_masks: torch.Tensor | None = None  # [N, 1, H, W] in 0..1, image resolution

    def __post_init__(self):
        if len(self.prompts) != self.latents.shape[0]:
            raise EDLoRAError(f"{len(self.prompts)} prompts for {self.latents.shape[0]} images.")
        if self.subject_masks is not None and self.subject_masks.shape[0] != self.latents.shape[0]:
            raise EDLoRAError(f"{self.subject_masks.shape[0]} masks for {self.latents.shape[0]} images.")


@dataclass
class Preview:
    """Sample the concept every ``every`` steps while it trains and hand the latent to ``show(step, latent)``."""

    every: int
    prompt: str  # with the concept's words written out
    show: Callable[[int, torch.Tensor], None]
    size: int = 512  # pixels, square
    steps: int = 12
    seed: int = 0
    cfg: float = 5.0


@dataclass
class TrainResult:
    edlora: EDLoRA
    losses: list[float] = field(default_factory=list)
    embedding_norms: list[float] = field(default_factory=list)  # mean concept-vector norm after each step
    frozen_at: int | None = None  # number of steps after which the embeddings stopped learning


def init_lora_pair(out_features: int, in_features: int, rank: int, generator: torch.Generator) -> LoRAPair:
    """The original's init: ``down`` Kaiming-uniform (a = sqrt 5, i.e. U(+-1/sqrt(in))), ``up`` zero."""
    bound = 1.0 / math.sqrt(in_features)
    down = (torch.rand(rank, in_features, generator=generator) * 2.0 - 1.0) * bound
    return LoRAPair(down=down, up=torch.zeros(out_features, rank))


def init_embeddings(
    words: list[str], class_vector: torch.Tensor | None, layers: int, width: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``word -> [layers, width]``: the last word copies ``class_vector``, the others N(0, 0.013^2).

    Without a class word every word is N(0, 0.017^2), as the original does for a missing initializer. One
    start vector per word is repeated over the layers (main branch).
    """
    out = {}
    for i, word in enumerate(words):
        if class_vector is not None and i == len(words) - 1:
            vector = class_vector.float().reshape(1, width)
        else:
            std = RANDOM_INIT_STD if class_vector is not None else RANDOM_INIT_STD_WITHOUT_CLASS
            vector = torch.randn(1, width, generator=generator) * std
        out[word] = vector.repeat(layers, 1)
    return out


@dataclass
class _Caption:
    tokens: LayerwiseTokens
    positions: list[int]  # first position of each concept word in the (single) token chunk


def class_word_vector(clip, class_word: str) -> torch.Tensor | None:
    """The token embedding the last concept word starts from; a class word of more than one token is refused."""
    word = class_word.strip()
    if not word:
        return None
    token = single_token(clip, word)
    if token is None:
        pieces = [t[0] for chunks in clip.tokenize(word, return_word_ids=True).values() for c in chunks for t in c if t[2] != 0]
        raise EDLoRAError(
            f"class_word {word!r} is {len(pieces)} tokens for this text encoder; the original copies a single token's "
            "embedding, so use one word that is one token (e.g. 'man', 'dog', 'car')."
        )
    return token_embedding(clip, token)


def _caption_tokens(clip, concepts: ConceptSet, prompt: str, words: list[str]) -> _Caption:
    tokens = layerwise_tokens(clip, concepts, prompt)
    if tokens is None:
        raise EDLoRAError(f"The training prompt {prompt!r} does not contain the concept words {' '.join(words)}.")
    truncated = False
    for key, chunks in tokens.base.items():
        if len(chunks) > 1:
            truncated = True
            tokens.base[key] = chunks[:1]
    if truncated:
        log.warning("MoS Train ED-LoRA: the caption %r is longer than 75 tokens and is cut, as the original does.", prompt)
    chunk = next(iter(tokens.base.values()))[0]
    first: dict[str, int] = {}
    for position, item in enumerate(chunk):
        word = tokens.word_of_token.get(item[0]) if isinstance(item[0], int) else None
        if word is not None and word not in first:
            first[word] = position
    missing = [w for w in words if w not in first]
    if missing:
        raise EDLoRAError(f"The concept word {missing[0]} falls beyond the 75-token limit in the training prompt {prompt!r}.")
    return _Caption(tokens, [first[w] for w in words])


def _encode(
    clip, captions: list[_Caption], embeddings: dict[str, torch.Tensor], layers: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([B, layers, 77, width], pooled [B, ...] or None)`` for the captions with the live vectors.

    Each caption is encoded as at sampling time (:mod:`..edlora.encode`): every text encoder gets its part of each
    vector, and the first copy, with every word's mean vector, gives the pooled output. One call per caption, since
    ComfyUI returns the pooled output of a call's first sequence only."""
    slices = encoder_slices(clip)
    stacks, pooled = [], []
    for caption in captions:
        variants = {}
        for key, chunks in caption.tokens.base.items():
            part = slices.get(key, slice(None))
            vectors = {token: embeddings[word][:, part] for token, word in caption.tokens.word_of_token.items()}
            means = {token: vector.mean(dim=0, keepdim=True) for token, vector in vectors.items()}
            variants[key] = layer_variants(chunks, means, 1) + layer_variants(chunks, vectors, layers)
        cond, pool = clip.cond_stage_model.encode_token_weights(variants)[:2]
        per_copy = cond.shape[1] // (layers + 1)
        stacks.append(cond[0, per_copy:].reshape(layers, per_copy, cond.shape[2]))
        pooled.append(pool)
    return torch.stack(stacks), (torch.cat(pooled) if pooled[0] is not None else None)


def check_trainable(model, clip, settings: TrainSettings) -> None:
    """Refuse settings and models a run cannot use, before any work is done."""
    if settings.steps < 1 or settings.batch_size < 1 or settings.rank < 1:
        raise EDLoRAError("steps, batch_size and rank must all be at least 1.")
    for name in (
        "lr_embedding",
        "lr_text_encoder",
        "lr_unet",
        "weight_decay",
        "noise_offset",
        "embedding_norm_threshold",
        "attention_reg_weight",
    ):
        value = getattr(settings, name)
        if not math.isfinite(value) or value < 0:
            raise EDLoRAError(f"MoS Train ED-LoRA: {name} must be a finite number of at least 0, got {value!r}.")
    require_supported(model, clip, "MoS Train ED-LoRA")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(
        sampling, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)
    ):
        raise EDLoRAError(
            f"ED-LoRA training needs a discrete-time epsilon or v-prediction model (SD1.x, SDXL); this MODEL samples with "
            f"{type(sampling).__name__}."
        )
    unet_attention_targets(model)
    text_attention_targets(clip)


def initial_edlora(model, clip, settings: TrainSettings, name: str = "<trained>") -> EDLoRA:
    """Where a run starts (seeded by ``settings.seed``): initial vectors and LoRA pairs with ``up = 0``."""
    check_trainable(model, clip, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    layers = layer_count(model.get_model_object("diffusion_model"))
    class_vector = class_word_vector(clip, settings.class_word)
    embeddings = init_embeddings(list(settings.words), class_vector, layers, text_embedding_width(clip), generator)

    def pairs(targets: list[Target]) -> dict[str, LoRAPair]:
        return {t.name: init_lora_pair(t.shape[0], t.shape[1], settings.rank, generator) for t in targets}

    units = list(dict.fromkeys(s.unit for s in cross_attention_sites(model.get_model_object("diffusion_model"))))
    return EDLoRA(
        embeddings,
        pairs(unet_attention_targets(model)),
        pairs(text_attention_targets(clip)),
        name=name,
        encoders=text_encoder_widths(clip),
        layer_map=units,
    )


def check_resumable(start: EDLoRA, model, clip, words: tuple[str, ...]) -> None:
    """Refuse an ED-LoRA a run cannot continue: another model, other words, or adapters missing on some module."""
    fit_to_model(start, model, clip)
    if tuple(start.words) != tuple(words):
        raise EDLoRAError(
            f"The ED-LoRA to resume, '{start.name}', holds the words {' '.join(start.words)}, not "
            f"{' '.join(words)}; set concept_words to {'+'.join(start.words)}."
        )
    for what, pairs, targets in (
        ("UNet", start.unet, unet_attention_targets(model)),
        ("text-encoder", start.text_encoder, text_attention_targets(clip)),
    ):
        missing = [t.name for t in targets if t.name not in pairs]
        if missing:
            raise EDLoRAError(
                f"The ED-LoRA to resume, '{start.name}', has no LoRA on {len(missing)} of the {len(targets)} {what} "
                f"attention projections training adapts (e.g. {missing[0]}); only ED-LoRAs trained on every attention "
                "can be resumed."
            )


class _Session:
    """One run's device state: routed clones, live vectors and adapters, and the loss of a batch.

    Create it inside ``torch.inference_mode(False)`` with an ExitStack that undoes every hook on exit.
    """

    def __init__(self, model, clip, start: EDLoRA, data: TrainingData, settings: TrainSettings, stack: ExitStack):
        self.settings = settings
        self.words = start.words
        sites = cross_attention_sites(model.get_model_object("diffusion_model"))
        self.layers = layer_count(model.get_model_object("diffusion_model"))
        self.encoders = text_encoder_widths(clip)
        self.layer_map = list(dict.fromkeys(site.unit for site in sites))
        self.concepts = ConceptSet().add(ConceptEntry(start))
        # no concept words: an ordinary LoRA (the paper's LoRA baseline), its captions encoded as they are
        self.plain = not self.words

        self.model = model.clone()
        install_layer_routing(self.model)
        use_masks = data.subject_masks is not None
        self.probe = AttentionProbe() if use_masks and settings.attention_reg_weight > 0 and self.words else None
        if self.probe is not None:
            for site in sites:
                self.model.set_model_attn2_replace(self.probe, *site.key)
        self.clip = clip.clone()
        self.captions = [self.caption(prompt) for prompt in data.prompts]

        with torch.inference_mode():  # ComfyUI loads (and on CUDA casts) weights in inference mode, as its nodes run
            comfy.model_management.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
        self.device = self.model.load_device
        self.diffusion_model = self.model.model.diffusion_model
        stack.enter_context(autograd_usable(self.diffusion_model, self.clip.cond_stage_model))
        stack.enter_context(layer_norm_inputs_kept(self.clip.cond_stage_model))
        self.clip.cond_stage_model.reset_clip_options()
        if self.clip.layer_idx is not None:
            self.clip.cond_stage_model.set_clip_options({"layer": self.clip.layer_idx})

        # a one-vector (textual-inversion style) start serves every layer and learns one vector per layer from here
        self.embeddings = {
            w: torch.nn.Parameter(t.float().to(self.device).expand(self.layers, -1).clone()) for w, t in start.embeddings.items()
        }
        self.unet_lora = LoRAHooks(self.model.model, unet_attention_targets(model), start.unet, self.device)
        self.text_lora = LoRAHooks(self.clip.cond_stage_model, text_attention_targets(clip), start.text_encoder, self.device)
        stack.enter_context(self.unet_lora.attached())
        stack.enter_context(self.text_lora.attached())
        if settings.gradient_checkpointing:
            stack.enter_context(checkpointed_blocks(self.diffusion_model))

        self.sampling = self.model.get_model_object("model_sampling")
        self.dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()
        self.latents = data.latents.detach().clone().float()
        self.subject_masks = data.subject_masks.detach().clone().float() if use_masks else None
        self.loss_masks = (
            latent_masks(self.subject_masks, tuple(self.latents.shape[-2:])) if use_masks and settings.mask_loss else None
        )

    def caption(self, prompt: str) -> _Caption:
        if self.plain:
            return _Caption(plain_tokens(self.clip, prompt), [])
        return _caption_tokens(self.clip, self.concepts, prompt, self.words)

    def encode(self, captions: list[_Caption]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([B, layers, tokens, width], pooled or None)``: layer-wise with the live vectors, or (no concept words) one
        plain encoding that serves every layer."""
        if not self.plain:
            return _encode(self.clip, captions, self.embeddings, self.layers)
        out = [self.clip.cond_stage_model.encode_token_weights(c.tokens.base)[:2] for c in captions]
        context = torch.cat([cond for cond, _ in out])[:, None].expand(-1, self.layers, -1, -1)
        pooled = torch.cat([pool for _, pool in out]) if out[0][1] is not None else None
        return context, pooled

    def losses(self, index: list[int], timesteps: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(denoising MSE, attention regulariser)`` of images ``index`` at DDPM ``timesteps`` with ``noise``."""
        x0, noise = self.latents[index].to(self.device), noise.to(self.device)
        sigma = self.sampling.sigma(timesteps.to(self.device).float())
        x_in = self.sampling.calculate_input(sigma, self.sampling.noise_scaling(sigma, noise, x0))
        captions = [self.captions[i] for i in index]
        context, pooled = self.encode(captions)
        context = context.to(device=self.device, dtype=self.dtype)
        # what ComfyUI's sampler hands the UNet: the patcher's patches, its wrappers (our layer routing among
        # them) and the batch description
        options = dict(self.model.model_options.get("transformer_options", {}))
        options.update(
            wrappers=comfy.patcher_extension.copy_nested_dicts(self.model.wrappers), cond_or_uncond=[0] * len(index), sigmas=sigma
        )
        if self.probe is not None:
            self.probe.maps = []
            self.probe.positions = torch.tensor([c.positions for c in captions], dtype=torch.long)
        output = self.diffusion_model(
            x_in.to(self.dtype),
            self.sampling.timestep(sigma).float(),
            context=context[:, 0],
            y=self.adm(pooled, x0.shape[-2:]),
            transformer_options=options,
            **{LAYER_CONTEXT_KEY: context},
        ).float()
        target = diffusion_target(self.sampling, x0, noise, sigma)
        mse = masked_mse(output, target, None if self.loss_masks is None else self.loss_masks[index].to(self.device))
        attention = torch.zeros((), device=self.device)
        if self.probe is not None:
            attention = attention_regularisation(self.probe.maps, self.subject_masks[index].to(self.device))
            self.probe.maps = []
        return mse, attention

    def sample(self, preview: Preview) -> torch.Tensor:
        """A latent of the concept with the vectors and adapters of this moment, sampled the way samplers run."""
        with torch.no_grad():
            context, pooled = self.encode([self.caption(preview.prompt)])
            extra = {"pooled_output": pooled.detach().cpu()} if pooled is not None else {}
            positive = [layerwise_conditioning(context.detach().cpu().float(), extra)]
            negative = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(""))
            latent = torch.zeros(1, 4, preview.size // LATENT_SCALE, preview.size // LATENT_SCALE)
            noise = comfy.sample.prepare_noise(latent, preview.seed)
            if self.probe is not None:
                self.probe.positions = None  # no maps to keep while sampling
            samples = comfy.sample.sample(
                self.model,
                noise,
                preview.steps,
                preview.cfg,
                "euler",
                "normal",
                positive,
                negative,
                latent,
                denoise=1.0,
                disable_pbar=True,
                seed=preview.seed,
            )
            if self.probe is not None:
                self.probe.maps = []
        return samples

    def adm(self, pooled: torch.Tensor | None, latent_size) -> torch.Tensor | None:
        """SDXL's vector conditioning for a batch: the pooled output and the image size (uncropped, at the training
        resolution), as ComfyUI's SDXL model builds it; None for models without one (SD1.x)."""
        if not getattr(self.model.model, "adm_channels", 0) or pooled is None:
            return None
        height, width = (int(s) * LATENT_SCALE for s in latent_size)
        rows = [
            self.model.model.encode_adm(
                pooled_output=p[None], width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height
            )
            for p in pooled
        ]
        return torch.cat(rows).to(device=self.device, dtype=self.dtype)

    def result(self, name: str, metadata: dict[str, str]) -> EDLoRA:
        return EDLoRA(
            embeddings={w: e.detach().float().cpu().clone() for w, e in self.embeddings.items()},
            unet=self.unet_lora.pairs(),
            text_encoder=self.text_lora.pairs(),
            name=name,
            metadata=metadata,
            encoders=self.encoders,
            layer_map=self.layer_map,
        )


def train_edlora(
    model,
    clip,
    data: TrainingData,
    settings: TrainSettings,
    on_step: Callable[[int, int, float], None] | None = None,
    name: str = "<trained>",
    start: EDLoRA | None = None,
    preview: Preview | None = None,
) -> TrainResult:
    """Train an ED-LoRA for ``settings.words`` on ``data``; ``model``/``clip`` are never modified.

    With no concept words (``settings.words == ()``) it trains the adapters alone on captions as written: an
    ordinary LoRA, the paper's LoRA baseline (MoS Train ED-LoRA itself always has words). ``start`` continues from an existing ED-LoRA instead of :func:`initial_edlora` (its words, rank and vectors; if
    its vectors already reached the freeze threshold they stay frozen). ``on_step(step, total, loss)`` runs after
    every optimiser step; an exception it raises (ComfyUI's interrupt) ends the run with every model object restored
    and nothing returned. ``preview`` samples the concept with the weights of the moment every few steps.
    """
    if start is None:
        start = initial_edlora(model, clip, settings, name)
    else:
        check_trainable(model, clip, settings)
        check_resumable(start, model, clip, settings.words)
        if start.rank != settings.rank:
            log.info(
                "MoS Train ED-LoRA: resuming '%s' keeps its rank %d (rank %d is for new runs).",
                start.name,
                start.rank,
                settings.rank,
            )
    generator = torch.Generator().manual_seed(derived_seed(settings.seed, 1))
    result = TrainResult(edlora=start)
    with torch.inference_mode(False), torch.enable_grad(), ExitStack() as stack:
        run = _Session(model, clip, start, data, settings, stack)
        groups = [
            {"params": list(run.embeddings.values()), "lr": settings.lr_embedding},
            {"params": run.text_lora.parameters(), "lr": settings.lr_text_encoder},
            {"params": run.unet_lora.parameters(), "lr": settings.lr_unet},
        ]
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / settings.steps))
        # half-precision activations underflow in the backward pass without loss scaling (the original runs fp16 AMP)
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
        count = run.latents.shape[0]
        batch = min(settings.batch_size, count)
        if batch < settings.batch_size:
            log.warning(
                "MoS Train ED-LoRA: batch_size %d is more than the %d images; using %d.", settings.batch_size, count, batch
            )
        order: list[int] = []
        threshold = settings.embedding_norm_threshold
        resumed_frozen = bool(run.embeddings) and 0 < threshold <= mean_embedding_norm(run.embeddings)
        if resumed_frozen:  # resumed from vectors that had already stopped
            result.frozen_at = 0
            for vector in run.embeddings.values():
                vector.requires_grad_(False)
        for step in range(settings.steps):
            if len(order) < batch:
                order += torch.randperm(count, generator=generator).tolist()
            index, order = order[:batch], order[batch:]
            timesteps = torch.randint(0, len(run.sampling.sigmas), (batch,), generator=generator)
            noise = torch.randn((batch, *run.latents.shape[1:]), generator=generator)
            if settings.noise_offset:
                noise = noise + settings.noise_offset * torch.randn(batch, noise.shape[1], 1, 1, generator=generator)
            mse, attention = run.losses(index, timesteps, noise)
            loss = mse + settings.attention_reg_weight * attention
            if not bool(torch.isfinite(loss.detach())):
                raise EDLoRAError(
                    f"MoS Train ED-LoRA: training diverged at step {step + 1} of {settings.steps}: the loss is "
                    f"{float(loss.detach())}. Nothing was saved; lower the learning rates (lr_embedding "
                    f"{settings.lr_embedding:g}, lr_text_encoder {settings.lr_text_encoder:g}, lr_unet {settings.lr_unet:g})."
                )
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            result.embedding_norms.append(mean_embedding_norm(run.embeddings) if run.embeddings else 0.0)
            if result.frozen_at is None and 0 < threshold <= result.embedding_norms[-1]:
                result.frozen_at = step + 1
                for vector in run.embeddings.values():
                    vector.requires_grad_(False)
                log.info(
                    "MoS Train ED-LoRA: concept vectors reached norm %.3f at step %d and stop learning.", threshold, step + 1
                )
            if on_step is not None:
                on_step(step + 1, settings.steps, result.losses[-1])
            if preview is not None and preview.every > 0 and ((step + 1) % preview.every == 0 or step + 1 == settings.steps):
                latent = run.sample(preview)
                with torch.no_grad():
                    preview.show(step + 1, latent)
        training = {**asdict(settings), "words": list(run.words), "images": count, "frozen_at": result.frozen_at}
        result.edlora = run.result(name, {"mixofshow.training": json.dumps(training)})
    return result


def evaluate_losses(
    model, clip, edlora: EDLoRA, data: TrainingData, settings: TrainSettings, timesteps: torch.Tensor, noise: torch.Tensor
) -> tuple[float, float]:
    """``(denoising MSE, attention regulariser)`` of ``edlora`` on all of ``data`` at fixed ``timesteps``/``noise``
    (one per image), computed exactly as a training step computes them. For tests and benchmarks."""
    with torch.inference_mode(False), torch.no_grad(), ExitStack() as stack:
        run = _Session(model, clip, edlora, data, settings, stack)
        mse, attention = run.losses(list(range(run.latents.shape[0])), timesteps, noise)
        return float(mse), float(attention)


def encode_training_latents(vae, model, images: torch.Tensor) -> torch.Tensor:
    """``[N, H, W, 3]`` images -> model-space latents (VAE encode, then the model's latent scaling)."""
    latents = vae.encode(images[..., :3])
    if not bool(torch.isfinite(latents).all()):
        raise EDLoRAError(
            "MoS Train ED-LoRA: the VAE turned the training images into non-finite latents (NaN or infinity); the VAE "
            "is damaged or does not belong to this model. Nothing was trained."
        )
    return model.get_model_object("process_latent_in")(latents)
