"""The ten world concepts trained on the world model: their training images, captions and recipe, and the cached files.

Each concept (:data:`devkit.world.CONCEPTS`, looks the world never shows) is trained twice from the same six renders
(three positions on three backgrounds, subject masks from the render): as an ED-LoRA through the pack's own MoS Train
ED-LoRA node (words ``<zorb1> <zorb2>``, the class word its shape), and as an ordinary LoRA (adapters only, the
concept named by its plain word ``zorb``), the paper's LoRA baseline. Files are cached in
``<world cache>/concepts`` with a stamp of the recipe; a second call with the same recipe reuses them. Training runs
under bfloat16 autocast where the CPU computes it natively (``world_model.cpu_autocast``; the weights stay float32).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, fields, replace

import comfy.utils
import torch

from ..edlora.format import load_edlora, to_kohya_state_dict
from ..training.loop import TrainingData, TrainSettings, encode_training_latents, train_edlora
from . import world, world_model

#: where each concept is shown while it trains; evaluation uses other position/background pairs
TRAIN_PLACES = [
    ("left", "white"),
    ("centre", "grey"),
    ("right", "sand"),
    ("centre", "white"),
    ("left", "sand"),
    ("right", "grey"),
]


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


#: the background regional sampling asks for (benchmark and demo): the fused concepts draw on grey and sand, but on
#: white mostly nothing (README, the small world, "Box size and background")
REGIONAL_BACKGROUND = "grey"


def concepts_dir() -> str:
    return os.path.join(world_model.cache_dir(), "concepts")


def phrase(subject: str, position: str, background: str) -> str:
    """A caption in the world's own form (a centred single object names no position)."""
    where = "" if position == "centre" else f" on the {position}"
    return f"a {subject}{where}, on a {background} background"


def concept_words(concept) -> tuple[str, str]:
    """The two words an ED-LoRA of ``concept`` is trained and prompted with."""
    return (f"<{concept.name}1>", f"<{concept.name}2>")


def ed_subject(concept) -> str:
    return " ".join(concept_words(concept))


#: how every concept is trained: the MoS Train ED-LoRA inputs (the ordinary LoRA uses the same numbers, adapters
#: only); each concept gets its own words, class word and seed. Learning rates are 10x the original's (5x on the
#: text encoder), chosen by a one-concept sweep judged by the evaluator; 400 steps instead of 1000, chosen by
#: sweeps on zorb, pell and kesh judged by the evaluator: at 100 steps the ED-LoRAs drew a blob in the concept's
#: colours and were named 0 of 12 times at new places (the LoRAs drew nothing), at 400 they draw the pattern and were
#: named 7 of 12 (zorb continued to 800 steps gained colour share, not names), at 4x the training time (16-19 minutes
#: an ED-LoRA and about 4 a LoRA on two CPU cores).
WORLD_RECIPE = TrainSettings(
    steps=400,
    batch_size=1,
    rank=4,
    lr_embedding=1e-2,
    lr_text_encoder=5e-5,
    lr_unet=1e-3,
    # the world's random CLIP-L has token embeddings of norm ~2.8 (a real CLIP-L's are ~0.4), so the original's
    # 0.55 norm threshold would freeze the vectors at once: off
    embedding_norm_threshold=0.0,
    # the masked loss leaves the background free, and on a model this lightly trained the adapters then wreck it: with
    # masks, ED-LoRAs turned the whole image to coloured noise even at lr_unet 2e-4; without them these rates keep it
    mask_loss=False,
)


def concept_images(concept, places=TRAIN_PLACES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, S, S, 3], subject masks [N, S, S])`` of ``concept`` at the training places."""
    scenes = [world.Scene(bg, (concept.thing(position),)) for position, bg in places]
    images = torch.stack([world.render(s, world_model.IMAGE_SIZE) for s in scenes])
    return images, world.object_mask(images).float()


def concept_settings(concept, recipe: TrainSettings = WORLD_RECIPE) -> TrainSettings:
    """``recipe`` for one world concept: its own words, its shape as the class word, and its place among all ten
    concepts as the seed, so training a few of them makes the same files (and stamps) as training all ten."""
    return replace(
        recipe,
        words=concept_words(concept),
        class_word=concept.shape,
        seed=world.CONCEPTS.index(concept),
    )


def _stamp_key(concept, settings: TrainSettings, base: str) -> str:
    return json.dumps({**asdict(settings), "concept": concept.__dict__, "base": base}, sort_keys=True)


def _stamp_path(folder: str, concept) -> str:
    return os.path.join(folder, f"world_{concept.name}.json")


def train_concepts(
    model,
    clip,
    vae,
    base: str,
    concepts=world.CONCEPTS,
    recipe: TrainSettings = WORLD_RECIPE,
    report=print,
    folder: str | None = None,
    loras: bool = True,
) -> dict:
    """``name -> (EDLoRA, kohya LoRA path or None)`` for ``concepts`` on the world model whose identity is ``base``
    (:func:`world_model.checkpoint_identity`), trained now or reused from ``folder`` (default :func:`concepts_dir`)
    when the same recipe made them on the same model. The ED-LoRA comes from the MoS Train ED-LoRA node itself; the
    LoRA (trained only when ``loras``; the path is None otherwise) from the same training function without concept
    words. Each file is kept as soon as it is trained, so a stopped run, or one without LoRAs, keeps its ED-LoRAs."""
    import folder_paths

    from ..nodes.train import TrainEDLoRA

    folder = folder or concepts_dir()
    os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path("edloras", folder, is_default=True)
    out = {}
    for concept in concepts:
        images, masks = concept_images(concept)
        settings = concept_settings(concept, recipe)
        key = _stamp_key(concept, settings, base)
        ed_path, lora_path = (os.path.join(folder, f"world_{concept.name}{s}.safetensors") for s in ("", "_lora"))
        stamp = _stamp_path(folder, concept)
        if not (_read(stamp) == key and os.path.isfile(ed_path)):
            if os.path.isfile(lora_path):
                os.remove(lora_path)  # the stamp is about to say this recipe and model, which did not make it
            started = time.time()
            captions = "\n".join(phrase("<TOK>", p, bg) for p, bg in TRAIN_PLACES)
            with torch.inference_mode(), world_model.cpu_autocast():
                TrainEDLoRA.execute(
                    model=model,
                    clip=clip,
                    vae=vae,
                    images=images,
                    masks=masks,
                    concept_words="+".join(settings.words),
                    captions=captions,
                    caption_template="a <TOK>",
                    resolution=images.shape[1],
                    filename=f"world_{concept.name}",
                    save_pth=False,
                    overwrite=True,
                    preview_every=0,
                    **{f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "words"},
                )
            with open(stamp, "w") as f:
                f.write(key)
            report(f"  {concept.name}: ED-LoRA {time.time() - started:.0f} s")
        if loras and not os.path.isfile(lora_path):
            started = time.time()
            with torch.inference_mode(), world_model.cpu_autocast():
                latents = encode_training_latents(vae, model, images)
                data = TrainingData(latents, [phrase(concept.name, p, bg) for p, bg in TRAIN_PLACES], masks[:, None])
                plain = train_edlora(model, clip, data, replace(settings, words=()), name=os.path.basename(lora_path))
            comfy.utils.save_torch_file(to_kohya_state_dict(plain.edlora), lora_path)
            report(f"  {concept.name}: LoRA {time.time() - started:.0f} s")
        out[concept.name] = (load_edlora(ed_path, name=os.path.basename(ed_path)), lora_path if loras else None)
    return out


def trained_concept_files(base: str, concepts=world.CONCEPTS, folder: str | None = None) -> list[str] | None:
    """The cached ED-LoRA files of ``concepts`` (in order) trained on the world model ``base``, or None when any is
    missing or was trained on another one."""
    folder = folder or concepts_dir()
    paths = [os.path.join(folder, f"world_{c.name}.safetensors") for c in concepts]
    for concept, path in zip(concepts, paths, strict=True):
        stamp = _read(_stamp_path(folder, concept))
        if stamp is None or json.loads(stamp).get("base") != base or not os.path.isfile(path):
            return None
    return paths
