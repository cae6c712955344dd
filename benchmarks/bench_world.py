"""The paper's claims measured in the small world (issue 13): identity after fusion, regional sampling, a picture grid.

Needs the world model (``make world``: a miniature SD1.x model trained from scratch on devkit/world.py, cached).
The ten concepts the world never shows are trained on it first (cached next to it, reused while their settings
hold): each an ED-LoRA through the pack's own MoS Train ED-LoRA node, and an ordinary LoRA (adapters only, the
concept named by a plain word) for the LoRA rows. Then, one run, side by side:

* Table 2's analogue: every concept alone, and after fusing 2, 5 and 10 of them, with LoRA + weight fusion,
  ED-LoRA + weight fusion and ED-LoRA + gradient fusion (lbfgs and exact): identity accuracy (the evaluator names
  the prompted concept), text alignment (the background and position the prompt asks for), and the pack's identity
  drift (noise-prediction error against each concept's own model, at the world's resolution);
* regional sampling with 2 and 3 concepts in boxes on the 10-concept gradient-fused model (LBFGS): how often each box
  shows its own concept (and how much of it is in that concept's colours), against the same prompt without regions,
  with each concept in a strip of one square image and in a square panel of its own (``regional``'s layouts), on
  ``--regional-background``; then the same layouts asked of the base model in words, the control that separates
  what regions place from what the adapters draw; with ``--sketch``, each of these again with the world's sketch
  ControlNet placing each concept where its box is (the paper's layout condition; ``make world`` trains it);
* a picture grid (``--grid``, default ``docs/images/world_grid.png``).

Evaluation prompts put each concept at a position on a background it was never trained with there. Training and
sampling run on the CPU under bfloat16 autocast where the CPU computes bfloat16 natively (a 2x speed-up there; in
float32 elsewhere, where emulated bfloat16 is 2-3x slower; the weights stay float32).

Usage: ``$PYTHON benchmarks/bench_world.py [--concepts 10] [--seeds 1] [--steps N] [--lbfgs-iters 50]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, replace

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)

EVAL_PLACES = [("left", "grey"), ("right", "white"), ("centre", "sand")]  # each pair new to every concept
COUNTS = (2, 5, 10)
METHODS = ("LoRA + WF", "ED-LoRA + WF", "ED-LoRA + GF lbfgs", "ED-LoRA + GF exact")
LAYOUTS = ("strips", "panels")  # see regional()


def regional_part(layout: str, words: bool = False, sketch: bool = False) -> str:
    """The results key of one regional measurement ("regional" and "regional, base in words" are the strips')."""
    where = ("" if layout == "strips" else f", {layout}") + (", sketch" if sketch else "")
    return "regional" + (", base in words" if words else "") + where


def entries(concepts, trained, kind: str):
    from mixofshow.devkit.world_concepts import TRAIN_PLACES, ed_subject, phrase
    from mixofshow.edlora.concepts import ConceptEntry, ConceptSet
    from mixofshow.edlora.format import EDLoRA
    from mixofshow.edlora.loras import load_lora_file

    fusion_places = TRAIN_PLACES[:2]
    stack = ConceptSet()
    for concept in concepts:
        edlora, lora_path = trained[concept.name]
        if kind == "edlora":
            entry = ConceptEntry(edlora, prompts=tuple(phrase(ed_subject(concept), p, bg) for p, bg in fusion_places))
        else:
            lora = load_lora_file(lora_path)
            entry = ConceptEntry(
                EDLoRA({}, {}, {}, name=lora.name),
                lora=lora,
                prompts=tuple(phrase(concept.name, p, bg) for p, bg in fusion_places),
            )
        stack = stack.add(entry)
    return stack


def judge(image, concept, position: str, background: str) -> dict:
    from mixofshow.devkit import world

    measured = world.measure(image)
    return {
        "identity": world.identify(image) == concept.name,
        "colours": world.colour_share(image, concept),
        "alignment": measured.background == background and measured.coverage > 0.01 and world.position_of(measured) == position,
    }


def evaluate(model, clip, vae, stack, concepts, kind: str, seeds: int, places, keep: dict | None = None) -> list[dict]:
    from mixofshow.devkit import world_model
    from mixofshow.devkit.world_concepts import ed_subject, phrase
    from mixofshow.edlora.encode import encode_prompt

    records = []
    for concept in concepts:
        subject = {"edlora": ed_subject(concept), "lora": concept.name, "words": concept.thing("centre").words()}[kind]
        for place_index, (position, background) in enumerate(places):
            with world_model.cpu_autocast():
                positive = encode_prompt(clip, stack, phrase(subject, position, background))
            for seed in range(seeds):
                with world_model.cpu_autocast():
                    image = world_model.sample(model, clip, vae, positive, seed=seed)
                records.append({"concept": concept.name, **judge(image, concept, position, background)})
                if keep is not None and place_index == 0 and seed == 0:
                    keep[concept.name] = image
    return records


def summary(records: list[dict]) -> dict:
    count = len(records)
    return {
        "identity": sum(r["identity"] for r in records) / count,
        "colours": sum(r["colours"] for r in records) / count,
        "alignment": sum(r["alignment"] for r in records) / count,
        "images": count,
    }


def fuse(model, clip, stack, method: str, drift: bool = True, lbfgs_iters: int = 500):
    from mixofshow.devkit import world_model
    from mixofshow.fusion.drift import identity_drift
    from mixofshow.fusion.procedure import gradient_fusion, weight_fusion
    from mixofshow.fusion.results import FusionSettings

    if method.endswith("WF"):
        fused = weight_fusion(model, clip, stack, measure_drift=False)
    else:
        solver = method.rsplit(" ", 1)[-1]
        settings = FusionSettings(
            solver=solver, text_encoder_iters=lbfgs_iters, sample_resolution=world_model.IMAGE_SIZE, device="cpu"
        )
        fused = gradient_fusion(model, clip, stack, settings, measure_drift=False)
    if not drift:
        return fused, 0.0
    values = identity_drift(model, clip, fused, resolution=world_model.IMAGE_SIZE)
    return fused, sum(values.values()) / len(values)


def regional(
    model,
    clip,
    vae,
    stack,
    groups,
    seeds: int,
    keep: list,
    kind: str = "edlora",
    layout: str = "strips",
    background: str | None = None,
    control=None,
) -> dict:
    """Per group size and mode (with regions, and the same prompt alone): boxes showing their own concept (in all and
    per concept, ``"by concept": name -> (named, boxes)``), images with every box right, and the summed share of each
    box's object in its own concept's two colours (graded: it moves before a box's identity does). ``kind`` "words"
    asks the base model for each concept by its written description (``stack`` empty): how well regions place what
    the world model can draw, whatever the adapters add. ``layout`` "strips" cuts one square image into a vertical
    strip per concept, each region prompt placing its concept on its side; "panels" gives each concept a square box
    of the model's own image size on a canvas as wide as all of them, each region prompt the centred caption the
    concepts were trained with (the global prompt is the same in both). ``background`` defaults to
    ``world_concepts.REGIONAL_BACKGROUND``. ``control``, the world's sketch ControlNet (loaded), adds the layout as the
    paper does, to both modes alike: each concept's shape drawn where its box asks for it
    (:func:`devkit.world_control.layout_drawing` of the strips' scene; ``panels_sketch``), through core
    ControlNetApplyAdvanced."""
    from mixofshow.devkit import world, world_control, world_model
    from mixofshow.devkit.world_concepts import REGIONAL_BACKGROUND, ed_subject, phrase
    from mixofshow.edlora.encode import encode_prompt
    from mixofshow.regional.conditioning import regional_conditioning
    from mixofshow.regional.layout import sketch_map
    from mixofshow.regional.spec import Box, Region

    size = world_model.IMAGE_SIZE
    out = {}
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    background = background or REGIONAL_BACKGROUND

    def subject(concept) -> str:
        return concept.thing("centre").words() if kind == "words" else ed_subject(concept)

    for group in groups:
        positions = ["left", "right"] if len(group) == 2 else ["left", "right", "centre"]
        order = ["left", "centre", "right"]  # strips from left to right
        caption = (
            ", ".join(f"a {subject(c)} on the {p}" for c, p in zip(group, positions, strict=True))
            + f", on a {background} background"
        )
        strips = {p: i for i, p in enumerate(o for o in order if o in positions)}
        width = 1.0 / len(group)
        regions = tuple(
            Region(
                phrase(subject(c), p if layout == "strips" else "centre", background),
                box=Box(0.0, strips[p] * width, 1.0, (strips[p] + 1) * width),
            )
            for c, p in zip(group, positions, strict=True)
        )
        canvas_width = size if layout == "strips" else size * len(group)
        with world_model.cpu_autocast():
            regional_model, positive, _ = regional_conditioning(model, clip, caption, "", regions, stack)
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))  # what sample() asks with a text
            plain = (encode_prompt(clip, stack, caption), negative)
        if control is not None:
            if layout == "strips":
                things = (c.thing(p, world.SIZES[len(group)]) for c, p in zip(group, positions, strict=True))
                drawing = world_control.layout_drawing(world.Scene(background, tuple(things)), size)
            else:
                by_place = dict(zip(positions, group, strict=True))
                drawing = world_control.panels_sketch([by_place[p] for p in sorted(strips, key=strips.get)], size)
            hint = sketch_map(drawing)[None]
            positive, negative = world_control.apply_control(positive, negative, control, hint)
            plain = world_control.apply_control(*plain, control, hint)
        for seed in range(seeds):
            for mode, m, cond in (("regions", regional_model, (positive, negative)), ("prompt only", model, plain)):
                with world_model.cpu_autocast():
                    image = world_model.sample(m, clip, vae, cond[0], negative=cond[1], seed=seed, width=canvas_width)
                cut = [round(i * canvas_width / len(group)) for i in range(len(group) + 1)]
                boxes = [(c, image[:, cut[strips[p]] : cut[strips[p] + 1]]) for c, p in zip(group, positions, strict=True)]
                hits = [world.identify(box) == c.name for c, box in boxes]
                entry = out.setdefault(len(group), {}).setdefault(
                    mode, {"boxes": 0, "hits": 0, "all": 0, "images": 0, "colours": 0.0, "by concept": {}}
                )
                entry["boxes"] += len(hits)
                entry["hits"] += sum(hits)
                for c, hit in zip(group, hits, strict=True):  # which concepts regions can place, and which they cannot
                    named, boxes_of = entry["by concept"].get(c.name, (0, 0))
                    entry["by concept"][c.name] = (named + int(hit), boxes_of + 1)
                entry["colours"] += sum(world.colour_share(box, c) for c, box in boxes)
                entry["all"] += int(all(hits))
                entry["images"] += 1
                if seed == 0 and len(keep) < 4 * 2 and kind != "words" and layout == "strips":
                    keep.append((f"{len(group)} concepts, {mode}", image))
    return out


def grid(path: str, columns: list[str], rows: list[tuple[str, dict]], extra: list[tuple[str, object]], scale: int = 1):
    """A labelled PNG: one row per method, one column per concept, then the regional examples."""
    from PIL import Image, ImageDraw

    cell = None
    for _, images in rows:
        for image in images.values():
            cell = image.shape[0] * scale
            break
    label_w, head_h = 150, 18
    height = head_h + cell * len(rows) + (cell + head_h) * (1 if extra else 0)
    width = label_w + cell * max(len(columns), len(extra))
    canvas = Image.new("RGB", (width, height), (30, 30, 30))
    draw = ImageDraw.Draw(canvas)

    def paste(image, x, y):
        array = (image.clamp(0, 1) * 255).byte().numpy()
        canvas.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST), (x, y))

    for j, name in enumerate(columns):
        draw.text((label_w + j * cell + 4, 3), name, fill=(230, 230, 230))
    for i, (label, images) in enumerate(rows):
        y = head_h + i * cell
        draw.text((4, y + cell // 2 - 6), label, fill=(230, 230, 230))
        for j, name in enumerate(columns):
            if name in images:
                paste(images[name], label_w + j * cell, y)
    if extra:
        y = head_h + len(rows) * cell
        draw.text((4, y + head_h + cell // 2 - 6), "regional", fill=(230, 230, 230))
        for j, (label, image) in enumerate(extra):
            draw.text((label_w + j * cell + 2, y + 3), label.replace("concepts, ", ""), fill=(200, 200, 200))
            paste(image, label_w + j * cell, y + head_h)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # 256 colours: samples of a lightly trained model are noisy and a full-colour PNG of ten columns is 1.6 MB
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=10, help="how many of the ten concepts (counts above it are skipped)")
    parser.add_argument("--seeds", type=int, default=1, help="images per evaluation prompt")
    parser.add_argument(
        "--places", type=int, default=len(EVAL_PLACES), help="evaluation prompts per concept (position/background pairs)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per concept (default: the world recipe's)")
    parser.add_argument(
        "--lbfgs-iters",
        type=int,
        default=50,
        help="LBFGS iterations per text-encoder and K/V layer for the lbfgs rows (the original's 500 take over 9 minutes "
        "for two concepts on two CPU cores; the exact rows give the solution LBFGS approaches)",
    )
    parser.add_argument("--train-only", action="store_true", help="train (or find) the concepts, measure nothing")
    parser.add_argument("--grid", default=os.path.join(REPO_ROOT, "docs", "images", "world_grid.png"))
    parser.add_argument("--skip-table", action="store_true", help="regional sampling only (needs, and trains, only the ED-LoRAs)")
    parser.add_argument(
        "--sketch",
        action="store_true",
        help="also measure each regional layout with the world's sketch ControlNet placing the concepts (make world trains it)",
    )
    parser.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help=f"the regional layouts to measure, comma-separated (default: {','.join(LAYOUTS)}; see regional())",
    )
    parser.add_argument(
        "--regional-background",
        default=None,
        choices=("white", "grey", "sand"),
        help="the background regional sampling asks for (default: world_concepts.REGIONAL_BACKGROUND, grey; fused "
        "world concepts draw little on white)",
    )
    args = parser.parse_args()
    layouts = [layout for layout in args.layouts.split(",") if layout]
    if not layouts or any(layout not in LAYOUTS for layout in layouts):
        parser.error(f"--layouts: {args.layouts!r} is not a comma-separated choice of {', '.join(LAYOUTS)}")

    from devkit.bootstrap import load_pack, setup_comfy

    setup_comfy()
    load_pack()
    import torch

    from mixofshow.devkit import world, world_control, world_model
    from mixofshow.devkit.world_concepts import REGIONAL_BACKGROUND, WORLD_RECIPE, train_concepts
    from mixofshow.edlora.concepts import ConceptSet

    path = world_model.cached_world_checkpoint()
    if path is None:
        print("The world model is not cached; train it first with 'make world' (32-49 minutes on two CPU cores).")
        return 1
    control = None
    if args.sketch:
        control_path = world_control.cached_world_controlnet(path)
        if control_path is None:
            print(
                "--sketch: no sketch ControlNet trained on this world model; 'make world' trains it (15 minutes with bfloat16)."
            )
            return 1
        control = world_control.load_world_controlnet(control_path)
    started = time.time()
    torch.manual_seed(0)
    with torch.inference_mode():
        model, clip, vae = world_model.load_world_model(path)
    concepts = list(world.CONCEPTS[: args.concepts])
    recipe = WORLD_RECIPE if args.steps is None else replace(WORLD_RECIPE, steps=args.steps)
    print(f"world model: {path}\ntraining {len(concepts)} concepts ({recipe})")
    trained = train_concepts(model, clip, vae, world_model.checkpoint_identity(path), concepts, recipe, loras=not args.skip_table)
    if args.train_only:
        return 0
    print(f"concepts ready ({time.time() - started:.0f} s)")

    results: dict = {
        "recipe": asdict(recipe),
        "seeds": args.seeds,
        "places": args.places,
        "lbfgs_iters": args.lbfgs_iters,
        "regional_background": args.regional_background or REGIONAL_BACKGROUND,
        "world": world_model.checkpoint_identity(path),
        "table": {},
        "regional": {},
    }
    out = os.path.join(world_model.cache_dir(), "bench_world.json")

    def save() -> None:  # after every row, so a long run that is stopped keeps what it measured
        with open(out, "w") as f:
            json.dump(results, f, indent=1)

    pictures: dict[str, dict] = {}
    places = EVAL_PLACES[: args.places]

    def draw(pictures: dict, regional_pictures: list) -> None:
        targets = {
            c.name: world.render(world.Scene(places[0][1], (c.thing(places[0][0]),)), world_model.IMAGE_SIZE) for c in concepts
        }
        rows = [("target (rendered)", targets)] + [(label, images) for label, images in pictures.items() if images]
        grid(args.grid, [c.name for c in concepts], rows, regional_pictures)

    # every concept gradient-fused with LBFGS, the regional part's model: at ten 400-step concepts the exact solution
    # loses the scene (the README's table), so regions would be measured on a model that cannot draw one
    all_fused = None
    counts = [n for n in COUNTS if n <= len(concepts)]  # the fused columns this run has concepts for
    names = [c.name for c in concepts]
    with torch.inference_mode():
        if not args.skip_table:
            # the base model asked for each concept by its written description: how well the world model itself
            # draws such objects, the ceiling the adapters start from
            for kind, label in (("words", "base, in words"), ("lora", "LoRA alone"), ("edlora", "ED-LoRA alone")):
                records = []
                keep = pictures.setdefault(label, {})
                for concept in concepts:
                    if kind == "words":
                        stack, m, c = ConceptSet(), model, clip
                    else:
                        stack = entries([concept], trained, kind)
                        fused, _ = fuse(model, clip, stack, "WF", drift=False)
                        m, c = fused.apply(model, clip)
                    records += evaluate(m, c, vae, stack, [concept], kind, args.seeds, places, keep)
                # also each fused column's concepts alone, so a fused cell is read against the same concepts unfused
                results["table"][label] = {"1": summary(records)} | {
                    str(n): summary([r for r in records if r["concept"] in names[:n]]) for n in counts
                }
                save()
                print(f"{label}: {summary(records)} ({time.time() - started:.0f} s)")
            for count in counts:
                subset = concepts[:count]
                for method in METHODS:
                    kind = "lora" if method.startswith("LoRA") else "edlora"
                    stack = entries(subset, trained, kind)
                    t0 = time.time()
                    fused, drift = fuse(model, clip, stack, method, lbfgs_iters=args.lbfgs_iters)
                    fuse_seconds = time.time() - t0
                    if method == "ED-LoRA + GF lbfgs" and count == len(concepts):
                        all_fused = fused
                    m, c = fused.apply(model, clip)
                    keep = pictures.setdefault(method, {}) if count == counts[-1] else None
                    row = {**summary(evaluate(m, c, vae, stack, subset, kind, args.seeds, places, keep)), "drift": drift}
                    row["fusion_seconds"] = round(fuse_seconds, 1)
                    results["table"].setdefault(method, {})[str(count)] = row
                    save()
                    print(f"{method} x{count}: {row} ({time.time() - started:.0f} s)")
        regional_pictures: list = []
        draw(pictures, regional_pictures)  # now, so a run stopped during the regional part keeps its grid
        stack = entries(concepts, trained, "edlora")
        if all_fused is None and len(concepts) > 1:
            all_fused, _ = fuse(model, clip, stack, "ED-LoRA + GF lbfgs", drift=False, lbfgs_iters=args.lbfgs_iters)
        if all_fused is not None:
            m, c = all_fused.apply(model, clip)
            pairs = [tuple(concepts[i : i + 2]) for i in range(0, len(concepts) - 1, 2)]
            triples = [tuple(concepts[(i + k) % len(concepts)] for k in range(3)) for i in range(0, len(concepts), 3)]
            groups = pairs + (triples if len(concepts) >= 3 else [])
            # each layout on the fused concepts, then asked of the base model in words: what regions do where the
            # model can draw the concept
            for layout in layouts:
                for sketched in (False, True) if control is not None else (False,):
                    for part, mm, cc, ss, kind in (
                        (regional_part(layout, sketch=sketched), m, c, stack, "edlora"),
                        (regional_part(layout, words=True, sketch=sketched), model, clip, ConceptSet(), "words"),
                    ):
                        results[part] = regional(
                            mm,
                            cc,
                            vae,
                            ss,
                            groups,
                            args.seeds + 1,
                            regional_pictures,
                            kind,
                            layout,
                            args.regional_background,
                            control if sketched else None,
                        )
                        save()
                        print(f"{part}: {results[part]} ({time.time() - started:.0f} s)")

    draw(pictures, regional_pictures)
    results["seconds"] = round(time.time() - started)
    print_tables(results)
    save()
    print(f"grid: {args.grid}\nresults: {out}")
    return 0


def print_tables(results: dict) -> None:
    table = results["table"]
    if table:
        counts = ["1"] + [str(n) for n in COUNTS]
        print(
            "\nidentity accuracy / concept colour share / text alignment / identity drift, by number of fused concepts"
            " (the rows without fusion: the same concepts, each alone)"
        )
        print(f"{'method':<22}" + "".join(f"{n + ' concept' + ('s' if n != '1' else ''):>28}" for n in counts))
        for method, row in table.items():
            cells = []
            for n in counts:
                r = row.get(n)
                cells.append(
                    f"{'-':>28}"
                    if r is None
                    else f"{r['identity']:>7.0%} {r['colours']:>5.0%} {r['alignment']:>5.0%} {r.get('drift', 0.0):>7.3f}"
                )
            print(f"{method:<22}" + "".join(cells))
    for part in [regional_part(*p) for p in itertools.product(LAYOUTS, (False, True), (False, True))]:
        for size, modes in results.get(part, {}).items():
            line = "  ".join(
                f"{mode}: {m['hits'] / m['boxes']:.0%} of boxes, {m['all'] / m['images']:.0%} of images all right, "
                f"own colour share {m.get('colours', 0.0) / m['boxes']:.0%}"
                for mode, m in modes.items()
            )
            print(f"{part}, {size} concepts in boxes: {line}")


if __name__ == "__main__":
    sys.exit(main())
