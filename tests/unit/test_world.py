"""The synthetic world's generator and evaluator on images whose answers are known."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from mixofshow.devkit.world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    MIN_ALTERNATION,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORLD_PAIRS,
    Scene,
    Thing,
    attribute_accuracy,
    colour_share,
    identify,
    measure,
    object_mask,
    pattern_of,
    position_of,
    random_scene,
    render,
    shape_of,
    sketch,
)


def blurred(image: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur, standing in for what a VAE round trip does to edges."""
    x = image.permute(2, 0, 1)[None]
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)[0].permute(1, 2, 0)


def test_concepts_are_new_to_the_world_and_distinct():
    pairs = [tuple(sorted((c.colour, c.second))) for c in CONCEPTS]
    assert len(set(pairs)) == len(CONCEPTS), "each concept has its own colour pair"
    assert not set(pairs) & {tuple(sorted(p)) for p in WORLD_PAIRS}, "no ordinary object looks like a concept"
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    assert all(c.pattern != "solid" for c in CONCEPTS), "identify reads a concept only where its colours interleave"


def test_generator_is_deterministic_and_captions_name_what_is_drawn():
    first = [random_scene(torch.Generator().manual_seed(s)) for s in range(20)]
    again = [random_scene(torch.Generator().manual_seed(s)) for s in range(20)]
    assert first == again
    assert all(torch.equal(render(a), render(b)) for a, b in zip(first, again, strict=True))
    scene = Scene("grey", (Thing("circle", "red", position="left"), Thing("square", "blue", "striped", "white", "right")))
    assert scene.caption() == "a red circle on the left, a blue and white striped square on the right, on a grey background"
    assert render(scene, 64).shape == (64, 64, 3)


@pytest.mark.parametrize("background", sorted(BACKGROUNDS))
def test_every_concept_is_identified_sharp_and_blurred(background):
    for concept in CONCEPTS:
        image = render(Scene(background, (concept.thing(size=0.6),)), 64)
        assert identify(image) == concept.name, (concept, measure(image))
        assert identify(blurred(image)) == concept.name, (concept, measure(blurred(image)))


def test_ordinary_scenes_show_no_concept_and_their_attributes_are_measured():
    for seed in range(40):
        scene = random_scene(torch.Generator().manual_seed(seed), max_things=1)
        assert identify(render(scene, 64)) is None, scene
    for shape, background in itertools.product(("circle", "square"), sorted(BACKGROUNDS)):
        measured = measure(render(Scene(background, (Thing(shape, "purple", size=0.6),)), 64))
        assert measured.background == background
        assert shape_of(measured) == shape and pattern_of(measured) == "solid"
        assert measured.pair() == ("purple",)


def test_two_solid_blobs_in_a_concepts_colours_are_not_the_concept():
    """A model that has learnt a concept's colours but not its pattern draws one blob in each colour (world-model samples
    did): both colours make up the object, but they change only along the seam, so the object is no concept, while
    every patterned object at the world's resolution and sizes still reads as patterned, sharp or blurred."""
    from mixofshow.devkit.world_model import IMAGE_SIZE

    for concept, background in itertools.product(CONCEPTS, sorted(BACKGROUNDS)):
        for size in (0.2, 0.3):  # blobs apart, and blobs that overlap (a seam, no gap)
            blobs = Scene(
                background,
                (
                    Thing(concept.shape, concept.colour, position="left", size=size),
                    Thing(concept.shape, concept.second, size=size),
                ),
            )
            image = render(blobs, IMAGE_SIZE)
            for shown in (image, blurred(image)):
                measured = measure(shown)
                assert set(measured.pair()) == {concept.colour, concept.second}, (concept, measured)
                assert measured.alternation < MIN_ALTERNATION and pattern_of(measured) == "solid", (concept, measured)
                assert identify(shown) is None, (concept, measured)
    patterns = [p for p in PATTERNS if p != "solid"]
    for shape, pattern, size, background in itertools.product(SHAPES, patterns, sorted(set(SIZES.values())), sorted(BACKGROUNDS)):
        for first, second in (*WORLD_PAIRS, ("orange", "teal")):
            image = render(Scene(background, (Thing(shape, first, pattern, second, size=size),)), IMAGE_SIZE)
            for shown in (image, blurred(image)):
                measured = measure(shown)
                if len(measured.pair()) == 2:  # (white on a white background reads as solid)
                    assert measured.alternation >= MIN_ALTERNATION, (shape, pattern, size, background, first, measured)
    for concept in CONCEPTS:
        for size in sorted(set(SIZES.values())):
            image = render(Scene("grey", (concept.thing(size=size),)), IMAGE_SIZE)
            assert identify(image) == identify(blurred(image)) == concept.name, (concept, size)


def test_a_concepts_pattern_is_read_between_its_own_two_colours():
    """An orange blob beside a green and teal checkered circle holds zorb's orange and teal (each over 15% of the
    object, as a world-model sample did), but its pattern is green and teal: between orange and teal the colours do
    not alternate, so it is not zorb, while zorb itself, sharp or blurred, still is."""
    zorb = CONCEPTS[0]
    image = render(
        Scene(
            "white",
            (Thing("circle", "orange", position="left", size=0.22), Thing("circle", "green", "checkered", "teal", "right")),
        ),
        128,
    )
    measured = measure(image)
    assert min(measured.colours[c] for c in ("orange", "teal")) >= 0.15 and pattern_of(measured) == "checkered", measured
    assert pattern_of(measure(image, ("orange", "teal"))) == "solid"
    assert identify(image) is None and identify(blurred(image)) is None
    target = render(Scene("white", (zorb.thing("right"),)), 128)
    for shown in (target, blurred(target)):
        assert pattern_of(measure(shown, ("orange", "teal"))) == "checkered"
        assert identify(shown) == zorb.name


def test_colour_share_grades_identity_by_the_concepts_colours():
    zorb, pell = CONCEPTS[0], CONCEPTS[4]  # orange/teal and green/orange: one colour in common
    image = render(Scene("grey", (zorb.thing("left"),)), 64)
    assert colour_share(image, zorb) > 0.9
    assert 0.2 < colour_share(image, pell) < 0.8  # its orange counts, its green is missing
    assert colour_share(render(Scene("grey", (Thing("circle", "purple"),)), 64), zorb) == 0.0
    assert colour_share(render(Scene("grey", ()), 64), zorb) == 0.0  # nothing drawn


def test_a_region_of_an_image_is_measured_on_its_own():
    left, right = CONCEPTS[0], CONCEPTS[1]
    image = render(Scene("white", (left.thing("left", 0.35), right.thing("right", 0.35))), 96)
    assert identify(image[:, :48]) == left.name and identify(image[:, 48:]) == right.name
    for position in ("left", "centre", "right"):
        measured = measure(render(Scene("sand", (left.thing(position),)), 96))
        assert position_of(measured) == position, measured.centre_x


def test_shapes_and_patterns_are_read_back():
    wrong = {"sharp": [], "blurred": []}
    cases = 0
    for shape, pattern, background in itertools.product(
        ("circle", "square", "triangle", "diamond"), ("solid", "striped", "checkered", "dotted"), sorted(BACKGROUNDS)
    ):
        for first, second in (("blue", "yellow"), ("orange", "teal"), ("red", "green")):
            thing = Thing(shape, first, pattern, second if pattern != "solid" else "", size=0.6)
            image = render(Scene(background, (thing,)), 64)
            cases += 1
            for kind, shown in (("sharp", image), ("blurred", blurred(image))):
                measured = measure(shown)
                if (shape_of(measured), pattern_of(measured)) != (shape, pattern):
                    wrong[kind].append((shape, pattern, background, first))
    assert wrong["sharp"] == []
    assert len(wrong["blurred"]) <= 0.05 * cases, wrong["blurred"]  # seams blur into other palette colours


def test_the_world_vae_starts_as_an_exact_block_average_that_comfyui_loads_as_taesd():
    """The world model's VAE layout is one ComfyUI's own VAE class builds (TAESD, from its keys), and its starting point
    reproduces an image made of 8x8 blocks exactly: training only adds what averaging loses."""
    import comfy.sd
    import comfy.taesd.taesd

    from mixofshow.devkit.world_model import block_average_taesd

    vae = comfy.sd.VAE(sd=block_average_taesd().state_dict())
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    blocks = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    image = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # [1, 32, 32, 3]
    latent = vae.encode(image)
    assert latent.shape == (1, 4, 4, 4)
    assert torch.allclose(vae.decode(latent).float(), image, atol=2e-3)
    sharp = render(Scene("white", (CONCEPTS[0].thing(),)), 128)
    assert identify(vae.decode(vae.encode(sharp[None]))[0].float()) == CONCEPTS[0].name


def test_scenes_favour_one_object_anywhere_and_the_unet_loss_weighs_object_cells_up():
    """The world draws fewer objects more often, a single one at every place; the world model's UNet loss weighs each
    latent cell by how much of it objects cover (background cells 1, fully covered cells 1 + the weight)."""
    from collections import Counter

    from mixofshow.devkit.world import POSITIONS
    from mixofshow.devkit.world_model import object_weights

    scenes = [random_scene(torch.Generator().manual_seed(s), max_things=3) for s in range(300)]
    counts = Counter(len(s.things) for s in scenes)
    assert counts[1] > counts[2] > counts[3] > 0, counts
    assert {s.things[0].position for s in scenes if len(s.things) == 1} == set(POSITIONS)

    image = render(Scene("grey", (Thing("square", "red", position="left", size=0.4),)), 64).permute(2, 0, 1)[None]
    weights = object_weights(image, 2.0)
    assert weights.shape == (1, 1, 8, 8)
    assert torch.all(weights[..., 4:] == 1)  # the right half is background
    assert float(weights.max()) == 3.0 and float(weights[0, 0, 0, 0]) == 1.0


def test_object_masks_cover_each_object_whatever_the_background():
    """The one object test (VAE loss, UNet loss weights, concept subject masks): a concept's footprint is the same on
    every background and in every place, and is exactly its shape's area; the training masks are these footprints."""
    from mixofshow.devkit.world_concepts import TRAIN_PLACES, concept_images

    for concept in CONCEPTS:
        masks = {bg: object_mask(render(Scene(bg, (concept.thing("left"),)), 64)) for bg in BACKGROUNDS}
        assert all(torch.equal(m, masks["white"]) for m in masks.values()), concept.name
        solid = render(Scene("white", (Thing(concept.shape, "red", position="left"),)), 64)
        assert torch.equal(masks["white"], (solid != render(Scene("white", ()), 64)).any(dim=-1))
        images, subject = concept_images(concept)
        assert subject.shape == images.shape[:3] and torch.equal(subject, object_mask(images).float())
        assert all(float(m.mean()) > 0.05 for m in subject), concept.name
    assert len(TRAIN_PLACES) == len(subject)


def test_attribute_accuracy_reads_what_a_model_draws_right():
    """A model that draws every caption exactly scores 1 on every attribute; one that draws the right object in the
    wrong place loses only the position; one that draws the background alone keeps only the background."""
    exact = attribute_accuracy(lambda scene, i: render(scene, 128), count=12)
    assert exact == {"background": 1.0, "colours": 1.0, "pattern": 1.0, "shape": 1.0, "position": 1.0}

    def misplaced(scene, i):
        thing = scene.things[0]
        elsewhere = {"left": "right", "centre": "left", "right": "left"}[thing.position]
        return render(Scene(scene.background, (replace(thing, position=elsewhere),)), 128)

    moved = attribute_accuracy(misplaced, count=12)
    assert moved["position"] == 0.0 and moved["shape"] == moved["colours"] == moved["background"] == 1.0
    empty = attribute_accuracy(lambda scene, i: render(Scene(scene.background, ()), 128), count=12)
    assert empty == {"background": 1.0, "colours": 0.0, "pattern": 0.0, "shape": 0.0, "position": 0.0}


def test_concept_files_are_only_reused_with_the_world_model_they_were_trained_on(tmp_path):
    import json

    from mixofshow.devkit.world_concepts import trained_concept_files

    zorb = CONCEPTS[0]
    (tmp_path / "world_zorb.safetensors").write_bytes(b"")
    (tmp_path / "world_zorb.json").write_text(json.dumps({"base": "abc", "concept": zorb.__dict__}))
    assert trained_concept_files("abc", [zorb], str(tmp_path)) == [str(tmp_path / "world_zorb.safetensors")]
    assert trained_concept_files("another", [zorb], str(tmp_path)) is None
    assert trained_concept_files("abc", [zorb, CONCEPTS[1]], str(tmp_path)) is None  # quill was never trained


def test_a_concept_trains_with_the_same_settings_alone_or_among_all_ten():
    """Training a few concepts (a sweep, a repair) must make the files training all ten makes, or it overwrites the
    cached ones with others under the same name: each concept's seed is its own, not its place in the call."""
    from mixofshow.devkit.world_concepts import WORLD_RECIPE, concept_settings

    settings = [concept_settings(concept) for concept in CONCEPTS]
    assert sorted(s.seed for s in settings) == list(range(len(CONCEPTS)))
    pell = next(c for c in CONCEPTS if c.name == "pell")
    alone = concept_settings(pell)
    assert alone.seed != 0 and alone.words == ("<pell1>", "<pell2>")
    assert alone.class_word == pell.shape and alone.steps == WORLD_RECIPE.steps


def test_the_world_computes_in_bfloat16_only_where_the_cpu_does_it_in_hardware():
    """Emulated bfloat16 is 2-3x slower than float32: the world's autocast is bfloat16 only on CPUs that report it."""
    from mixofshow.devkit.world_model import cpu_autocast, native_bfloat16

    avx512 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni"
    assert not native_bfloat16(avx512)
    assert native_bfloat16(avx512 + " avx512_bf16")
    assert native_bfloat16(avx512 + " amx_bf16 amx_tile")
    assert not native_bfloat16("flags : avx512_bf16x")  # a flag is a whole word
    context = cpu_autocast()
    with context:
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == (torch.bfloat16 if native_bfloat16() else torch.float32)


def test_caption_steering_tells_a_model_that_follows_the_place_word_from_one_that_ignores_it():
    """The sampler-free probe on stand-ins with known answers: a model that predicts the scene its caption names moves
    the object as far as the exact renders do; one that predicts the same object whatever the place word says moves
    it nowhere, yet still answers to the colour word."""
    from types import SimpleNamespace

    from mixofshow.devkit.world_model import caption_steering

    def block_average(pixels):  # [1, H, W, 3] -> [1, 3, H/8, W/8], as the world VAE's starting point encodes
        return torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8)

    def model_for(follow_place: bool):
        def apply_model(x, sigma, c_crossattn):
            scene = c_crossattn
            if not follow_place:  # the object always in the middle, in the caption's colours
                scene = Scene(scene.background, (replace(scene.things[0], position="centre"),))
            return block_average(render(scene, 64)[None])

        inner = SimpleNamespace(process_latent_in=lambda latent: latent, apply_model=apply_model)
        return SimpleNamespace(model=inner)

    # the stand-in CLIP hands the model the scene its caption describes (every single-object scene's caption, looked up)
    scenes = {}
    for shape, colour, pattern, second, position, background in itertools.product(
        SHAPES, COLOURS, PATTERNS, ("", *COLOURS), POSITIONS, BACKGROUNDS
    ):
        if (pattern == "solid") == (second == ""):
            scene = Scene(background, (Thing(shape, colour, pattern, second, position, SIZES[1]),))
            scenes[scene.caption()] = scene
    clip = SimpleNamespace(tokenize=lambda caption: caption, encode_from_tokens=lambda caption: scenes[caption])
    vae = SimpleNamespace(encode=block_average)
    follows = caption_steering(model_for(True), clip, vae, count=6, sigmas=(8.0,), size=64)
    ignores = caption_steering(model_for(False), clip, vae, count=6, sigmas=(8.0,), size=64)
    assert 0.4 < follows["exact_shift"] < 0.6
    assert follows["sigma 8"]["position_shift"] == follows["exact_shift"]
    assert follows["sigma 8"]["position_change"] > 0.5
    assert ignores["sigma 8"]["position_shift"] == 0.0 and ignores["sigma 8"]["position_change"] == 0.0
    assert ignores["sigma 8"]["colour_change"] > 0.2


def test_the_world_text_encoder_keeps_each_word_its_own_unless_told_to_mix():
    """With its residual branches zeroed, the world's CLIP-L gives every token the features of its own word at its
    place: changing the colour word leaves the shape and place words' features as they were. The random CLIP-L
    mixes them (the place word's features then depend on the colour before it)."""
    from mixofshow.devkit.world_model import encode_captions, frozen_clip

    captions = ["a red circle on the left, on a grey background", "a blue circle on the left, on a grey background"]
    for mix_tokens in (False, True):
        clip = frozen_clip(0, mix_tokens)
        red, blue = encode_captions(clip, captions).float()
        # token 0 is the start token, 1 "a", 2 the colour word, then "circle on the left , ..."
        colour, rest = (red[2] - blue[2]).abs().amax(), (red[3:12] - blue[3:12]).abs().amax()
        assert colour > 0.1
        if mix_tokens:
            assert rest > 0.01
        else:
            assert rest == 0.0


def test_a_sketch_outlines_or_fills_each_object_where_the_render_draws_it():
    scene = Scene(
        "sand",
        (
            Thing("circle", "red", position="left", size=SIZES[3]),
            Thing("triangle", "blue", "striped", "white", position="centre", size=SIZES[3]),
            Thing("diamond", "green", position="right", size=SIZES[3]),
        ),
    )
    drawing, image = sketch(scene, 128), render(scene, 128)
    lines = drawing[..., 0] < 0.5
    assert torch.equal(drawing[..., 0], drawing[..., 2]), "no colour: lines and paper only"
    assert (lines <= object_mask(image)).all(), "every line lies on an object"
    for position in POSITIONS:  # each object is outlined across its whole width and nothing inside is drawn
        columns = slice(round((POSITIONS[position] - 0.15) * 128), round((POSITIONS[position] + 0.15) * 128))
        inside, drawn = object_mask(image)[:, columns], lines[:, columns]
        assert drawn.any(dim=0).sum() == inside.any(dim=0).sum()
        assert not lines[64, round(POSITIONS[position] * 128)], "an outline, not a silhouette"
    assert sketch(scene, 128, line=0.05)[..., 0].lt(0.5).sum() > lines.sum(), "thicker lines draw more"
    assert torch.equal(sketch(scene, 128, line=None)[..., 0] < 0.5, object_mask(image)), "filled: exactly the objects"
