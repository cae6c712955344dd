"""A deterministic synthetic image world where concept identity can be measured without any downloaded model.

A scene is a plain background with one to three objects. Every object has a shape, a pattern and two colours from
small palettes, a position and a size, and the scene has a caption that names them ("a red striped circle on the left,
on a grey background"). The ordinary world uses single-colour objects (pattern ``solid``) and two-colour patterns only
with the colour pairs of :data:`WORLD_PAIRS`; a *concept* is an object the world never shows: a shape with its own
two-colour pair and pattern (:data:`CONCEPTS`), so a model trained on the world has never seen it and has to learn it.

The evaluator measures instead of classifying: it finds the object pixels (those far from the background colour),
reads which palette colours they hold, which way their colours alternate and in what proportion (the pattern), and
how much of their bounding box they fill and where (the shape). A concept is recognised by its colour pair, pattern and shape together; a region of an image can be
measured the same way, which is how regional sampling is scored. Pure tensor functions, float images in ``[0, 1]``,
``[height, width, 3]`` like ComfyUI's IMAGE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: name -> RGB in [0, 1]; far apart so blurred renders still snap to the right name
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.70, 0.20),
    "blue": (0.14, 0.26, 0.86),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.70),
    "orange": (0.98, 0.50, 0.05),
    "teal": (0.05, 0.60, 0.60),
    "black": (0.05, 0.05, 0.05),
}
BACKGROUNDS = {"white": (0.96, 0.96, 0.96), "grey": (0.55, 0.55, 0.55), "sand": (0.86, 0.78, 0.60)}
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("solid", "striped", "checkered", "dotted")
POSITIONS = {"left": 0.25, "centre": 0.5, "right": 0.75}
#: object size (fraction of the image side) by number of objects: three side by side must not overlap
SIZES = {1: 0.45, 2: 0.4, 3: 0.26}
#: the least share of the image an object must cover to be read at all (less is specks, not an object)
MIN_COVERAGE = 0.02
#: width of a :func:`sketch` line, as a share of the image side (2-3 pixels at 128)
SKETCH_LINE = 0.02
#: the least rate at which neighbouring object pixels change colour for two colours to read as one patterned object:
#: two solid blobs side by side change colour only along their seam (0.005-0.017 in world-model samples), while
#: every patterned render of the world (128 px, any of its sizes, sharp or 5x5-blurred) changes at least 0.034. A
#: pattern's rate falls as its object grows (a striped object about 65 px wide reaches the floor), so it holds for
#: the world's sizes, not for any image
MIN_ALTERNATION = 0.03
#: the two-colour pairs the ordinary world uses for patterned objects (concepts use others)
WORLD_PAIRS = (("red", "yellow"), ("blue", "white"), ("green", "black"), ("purple", "yellow"))


@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    shape: str
    colour: str
    pattern: str = "solid"
    second: str = ""  # the pattern's other colour ("" for solid)
    position: str = "centre"
    size: float = 0.4  # side of the object's box, as a fraction of the image side

    def words(self) -> str:
        colours = self.colour if self.pattern == "solid" else f"{self.colour} and {self.second}"
        pattern = "" if self.pattern == "solid" else f" {self.pattern}"
        return f"{colours}{pattern} {self.shape}"


@dataclass(frozen=True)
class Concept:
    """An object the ordinary world never shows: its look, and the name people would give it."""

    name: str
    shape: str
    colour: str
    second: str
    pattern: str

    def thing(self, position: str = "centre", size: float = 0.4) -> Thing:
        return Thing(self.shape, self.colour, self.pattern, self.second, position, size)


#: ten concepts with colour pairs no ordinary object uses
CONCEPTS = (
    Concept("zorb", "circle", "orange", "teal", "checkered"),
    Concept("quill", "square", "teal", "red", "striped"),
    Concept("brim", "triangle", "yellow", "blue", "dotted"),
    Concept("mox", "diamond", "orange", "purple", "striped"),
    Concept("pell", "circle", "green", "orange", "striped"),
    Concept("vant", "square", "purple", "teal", "checkered"),
    Concept("drue", "diamond", "teal", "yellow", "dotted"),
    Concept("kesh", "triangle", "red", "green", "checkered"),
    Concept("lorn", "square", "black", "orange", "dotted"),
    Concept("tiff", "circle", "blue", "red", "checkered"),
)


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]

    def caption(self) -> str:
        parts = [f"a {t.words()}" + ("" if len(self.things) == 1 and t.position == "centre" else f" on the {t.position}")
                 for t in self.things]  # fmt: skip
        return ", ".join(parts) + f", on a {self.background} background"


def random_scene(generator: torch.Generator, max_things: int = 2) -> Scene:
    """A scene of the ordinary world (no concept), deterministic for the generator's state."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    # fewer objects more often (each extra object half as likely), a single one at any position: a model trained in
    # minutes learns one object's shape and place before crowded scenes of small ones
    weights = torch.tensor([0.5**k for k in range(max_things)])
    count = 1 + int(torch.multinomial(weights, 1, generator=generator))
    positions = [pick(tuple(POSITIONS))] if count == 1 else ["left", "right", "centre"][:count]
    size = SIZES[count]
    things = []
    for position in positions:
        shape = pick(SHAPES)
        if float(torch.rand(1, generator=generator)) < 0.5:
            things.append(Thing(shape, pick(tuple(c for c in COLOURS if c != "black")), position=position, size=size))
        else:
            first, second = pick(WORLD_PAIRS)
            things.append(Thing(shape, first, pick(PATTERNS[1:]), second, position, size))
    return Scene(pick(tuple(BACKGROUNDS)), tuple(things))


def broader_scene(generator: torch.Generator, max_things: int = 2) -> Scene:
    """A scene beyond the ordinary world, for training a VAE that has seen more than the captions describe (as a real
    VAE has): patterned objects take any two colours, except the pairs of the :data:`CONCEPTS`."""
    scene = random_scene(generator, max_things)
    reserved = {frozenset((c.colour, c.second)) for c in CONCEPTS}
    names = list(COLOURS)
    pairs = [(a, b) for a in names for b in names if a != b and frozenset((a, b)) not in reserved]
    things = []
    for thing in scene.things:
        if thing.pattern != "solid":
            first, second = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
            thing = Thing(thing.shape, first, thing.pattern, second, thing.position, thing.size)
        things.append(thing)
    return Scene(scene.background, tuple(things))


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS.get(name) or BACKGROUNDS[name])


def _shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of ``shape`` over box coordinates ``u``, ``v`` in [-1, 1]."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (u.abs() <= 0.9) & (v.abs() <= 0.9)
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.0
    if shape == "triangle":  # apex up
        return (v <= 0.9) & (v >= -1.0 + 2.0 * u.abs() * 0.95)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where the pattern's second colour shows."""
    if pattern == "solid":
        return torch.zeros_like(u, dtype=torch.bool)
    if pattern == "striped":  # vertical bands
        return torch.floor((u + 1.0) * 2.5).remainder(2) == 1
    if pattern == "checkered":
        return (torch.floor((u + 1.0) * 2.0) + torch.floor((v + 1.0) * 2.0)).remainder(2) == 1
    if pattern == "dotted":
        cu, cv = torch.remainder((u + 1.0) * 2.0, 1.0) - 0.5, torch.remainder((v + 1.0) * 2.0, 1.0) - 0.5
        return cu**2 + cv**2 <= 0.09
    raise ValueError(f"unknown pattern {pattern!r}")


def _placed(scene: Scene, size: int):
    """Each thing of ``scene`` with its box coordinates ``u``, ``v`` and inside-mask on a ``size`` x ``size`` grid:
    the one rasteriser behind :func:`render` and :func:`sketch`."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for thing in scene.things:
        half = thing.size * size / 2
        cx, cy = POSITIONS[thing.position] * size, 0.5 * size
        u, v = (xs - cx) / half, (ys - cy) / half
        yield thing, u, v, _shape_mask(thing.shape, u, v)


def render(scene: Scene, size: int = 64) -> torch.Tensor:
    """``[size, size, 3]`` float image of ``scene``."""
    image = _rgb(scene.background).expand(size, size, 3).clone()
    for thing, u, v, inside in _placed(scene, size):
        second = _pattern_mask(thing.pattern, u, v) & inside
        image[inside] = _rgb(thing.colour)
        if thing.pattern != "solid":
            image[second] = _rgb(thing.second)
    return image


def sketch(scene: Scene, size: int = 64, line: float | None = SKETCH_LINE) -> torch.Tensor:
    """``[size, size, 3]`` drawing of where ``scene``'s objects are, as a person would sketch a layout: dark on white,
    each object outlined by a line the ``line`` share of the side wide (at least one pixel) just inside its edge, or
    filled in when ``line`` is None; no colour, pattern or background (those are the prompt's). The pack's sketch
    layout method turns it into the light-on-black hint a sketch ControlNet reads."""
    drawn = torch.zeros(size, size, dtype=torch.bool)
    for _, _, _, inside in _placed(scene, size):
        if line is None:
            drawn |= inside
            continue
        width = max(1, round(line * size))
        outside = (~inside).float()[None, None]
        near_outside = torch.nn.functional.max_pool2d(outside, 2 * width + 1, stride=1, padding=width)[0, 0] > 0
        drawn |= inside & near_outside
    return torch.where(drawn[..., None], 0.0, 1.0).expand(size, size, 3).contiguous()


def object_mask(images: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """Where the objects of renders ``images`` ``[..., H, W, 3]`` are: ``[..., H, W]`` bool, the pixels whose colour
    differs from ``background`` (``[..., 1, 1, 3]``; default each image's top-left pixel, which every scene leaves
    background) by more than 0.05 in some channel (so a pattern's white on a white background counts as background).
    For exact renders, not for samples (see :func:`measure`)."""
    if background is None:
        background = images[..., :1, :1, :]
    return (images - background).abs().amax(dim=-1) > 0.05


# ------------------------------------------------------------------------------------------------------- evaluator


@dataclass(frozen=True)
class Measured:
    """What the evaluator reads from an image (or a region of one)."""

    background: str
    colours: dict[str, float]  # palette colour -> fraction of the object pixels
    fill: float  # object pixels / their bounding box
    alternation: float  # how often neighbouring pixels of the two pattern colours change between them (0: solid)
    coverage: float  # object pixels / all pixels
    across: float = 0.0  # share of the colour changes met walking along rows (1: vertical stripes only)
    top: float = 0.5  # share of the object in the upper half of its box (a triangle, apex up, holds about 1/4)
    centre_x: float = 0.5  # the object pixels' mean column, as a fraction of the width
    pattern_colours: tuple[str, ...] = ()  # the two colours whose changes were counted (default: the object's pair)

    def pair(self) -> tuple[str, ...]:
        """The one or two colours that make up the object (each at least 15% of it)."""
        return _main_colours(self.colours)


def _main_colours(colours: dict[str, float]) -> tuple[str, ...]:
    """The one or two largest colours of an object, each at least 15% of it, sorted by name."""
    main = [c for c, f in sorted(colours.items(), key=lambda kv: -kv[1]) if f >= 0.15]
    return tuple(sorted(main[:2]))


def _nearest(pixels: torch.Tensor, palette: dict[str, tuple]) -> tuple[list[str], torch.Tensor]:
    names = list(palette)
    table = torch.tensor([palette[n] for n in names])
    return names, torch.cdist(pixels.reshape(-1, 3).float(), table).argmin(dim=1).reshape(pixels.shape[:-1])


def measure(image: torch.Tensor, pattern_colours: tuple[str, str] | None = None) -> Measured:
    """Measure the object(s) in ``image`` ``[h, w, 3]``: the background is the palette background nearest the
    border's median colour; object pixels are those nearer another palette colour than the background. The pattern
    (alternation, direction) is read between ``pattern_colours``, default the object's two main colours."""
    border = torch.cat([image[0], image[-1], image[:, 0], image[:, -1]])
    bg_names, bg_index = _nearest(border.median(dim=0).values[None], BACKGROUNDS)
    background = bg_names[int(bg_index.flatten()[0])]
    palette = {**COLOURS, "white": BACKGROUNDS["white"]} if background != "white" else dict(COLOURS)
    palette = {**palette, "__background__": BACKGROUNDS[background]}
    names, index = _nearest(image, palette)
    background_index = names.index("__background__")
    obj = index != background_index
    count = int(obj.sum())
    if count == 0:
        return Measured(background, {}, 0.0, 0.0, 0.0)
    colours: dict[str, float] = {}
    for i, name in enumerate(names):
        share = float(((index == i) & obj).sum()) / count
        if share > 0:
            colours[name] = share
    # blur turns the seam between two colours into a third colour, often the background's, and an edge into a
    # lighter or darker one: fill each row (and column) between its first and last object pixel (every shape here is
    # convex), and count only changes between the two pattern colours, skipping other pixels, so seams neither hollow
    # the shape nor hide the pattern and edges do not pass for one
    counted_colours = tuple(sorted(pattern_colours)) if pattern_colours else _main_colours(colours)
    main = [names.index(c) for c in counted_colours if c in colours]
    in_main = torch.isin(index, torch.tensor(main)) if len(main) == 2 else torch.zeros_like(obj)
    ys, xs = torch.nonzero(obj, as_tuple=True)
    box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
    filled, upper = 0, 0
    middle = (int(ys.min()) + int(ys.max()) + 1) / 2
    changes = {}
    for direction, lines, mask, counted in (("rows", index, obj, in_main), ("columns", index.T, obj.T, in_main.T)):
        changes[direction] = 0
        for number, (line, inside, main_here) in enumerate(zip(lines, mask, counted, strict=True)):
            if not inside.any():
                continue
            names_here = line[main_here]
            if direction == "rows":
                where = torch.nonzero(inside).flatten()
                width = int(where[-1] - where[0]) + 1
                filled += width
                upper += width if number + 0.5 < middle else 0
            changes[direction] += int((names_here[1:] != names_here[:-1]).sum())
    total_changes = changes["rows"] + changes["columns"]
    return Measured(
        background,
        colours,
        filled / box,
        total_changes / (2 * count),
        count / obj.numel(),
        changes["rows"] / total_changes if total_changes else 0.0,
        upper / filled,
        (float(xs.float().mean()) + 0.5) / image.shape[1],
        counted_colours,
    )


def shape_of(measured: Measured) -> str:
    """The shape by how much of its bounding box it fills (square 1, circle pi/4, triangle and diamond 1/2) and, for
    the last two, how much of it lies in the upper half (a triangle with its apex up about a quarter)."""
    fills = {"square": 1.0, "circle": math.pi / 4, "half": 0.5}
    nearest = min(fills, key=lambda s: abs(fills[s] - measured.fill))
    if nearest != "half":
        return nearest
    return "triangle" if measured.top < 0.4 else "diamond"


def pattern_of(measured: Measured) -> str:
    """``solid`` when one colour makes up the object, or two that hardly alternate (below :data:`MIN_ALTERNATION`:
    solid parts side by side, not a pattern); ``striped`` when its colour changes run one way (along rows: the stripes
    are vertical); else ``dotted`` when the second colour is the minor one (dots cover about 28%), ``checkered`` when
    the two are even."""
    pair = measured.pattern_colours or measured.pair()
    if len(pair) < 2 or min(measured.colours.get(c, 0.0) for c in pair) < 0.15 or measured.alternation < MIN_ALTERNATION:
        return "solid"
    if measured.across > 0.75:
        return "striped"
    first, second = (measured.colours[c] for c in pair)
    return "dotted" if min(first, second) / (first + second) < 0.38 else "checkered"


def position_of(measured: Measured) -> str:
    """The caption position (left, centre, right) nearest the objects' mean column."""
    return min(POSITIONS, key=lambda p: abs(POSITIONS[p] - measured.centre_x))


def identify(image: torch.Tensor, concepts=CONCEPTS, min_coverage: float = MIN_COVERAGE) -> str | None:
    """The concept ``image`` shows, or None: the concept with the same colour pair, scored by pattern and shape. Every
    concept is two colours interleaved, and its pattern is read between its own two colours (other colours skipped),
    so neither two solid blobs in its colours nor one of its colours beside another pair's pattern (an orange blob
    beside a green and teal checker is not zorb's orange and teal) is the concept: :func:`pattern_of` reads ``solid``."""
    measured = measure(image)
    if measured.coverage < min_coverage:
        return None
    shares = measured.colours
    # the concept whose two colours make up most of the object (each at least 15% of it)
    candidates = [c for c in concepts if min(shares.get(c.colour, 0.0), shares.get(c.second, 0.0)) >= 0.15]
    if not candidates:
        return None
    best_share = max(shares[c.colour] + shares[c.second] for c in candidates)
    shape = shape_of(measured)
    best, best_score = None, 0
    for concept in (c for c in candidates if shares[c.colour] + shares[c.second] == best_share):
        own_colours = tuple(sorted((concept.colour, concept.second)))
        # the object's own reading already counted these two colours when they are its main ones (the usual case)
        read = measured if measured.pattern_colours == own_colours else measure(image, own_colours)
        pattern = pattern_of(read)
        if pattern == "solid":
            continue
        score = int(concept.shape == shape) + int(concept.pattern == pattern)
        if score > best_score:
            best, best_score = concept, score
    return best.name if best else None


def colour_share(image: torch.Tensor, concept: Concept, min_coverage: float = MIN_COVERAGE) -> float:
    """How much of the object ``image`` shows is in ``concept``'s two colours (0 when no object): a graded identity
    score, the analogue of the paper's image alignment, that moves before :func:`identify` flips (a blob in the
    right colours scores without the right shape or pattern) and drops when another concept's colours bleed in."""
    measured = measure(image)
    if measured.coverage < min_coverage:
        return 0.0
    return measured.colours.get(concept.colour, 0.0) + measured.colours.get(concept.second, 0.0)


def attribute_accuracy(draw, count: int = 20, seed: int = 99) -> dict[str, float]:
    """How well a model draws the ordinary world, attribute by attribute: ``draw(scene, index)`` makes an image
    ``[h, w, 3]`` of a scene (a sampler asks for its caption) for ``count`` single-object scenes; returns the share
    whose background, colours (the object's colour pair), pattern, shape and position read back as from the exact
    render. Where a model stands between "draws the world's look" and "draws what the caption says": what a model
    cannot draw in words, no concept trained on it can show."""
    generator = torch.Generator().manual_seed(seed)
    scenes = [random_scene(generator, 1) for _ in range(count)]
    hits = {"background": 0, "colours": 0, "pattern": 0, "shape": 0, "position": 0}
    for index, scene in enumerate(scenes):
        # against what the evaluator reads from the exact render (a white stripe on white reads as solid)
        image = draw(scene, index)
        got, want = measure(image), measure(render(scene, image.shape[0]))
        hits["background"] += got.background == want.background
        if got.coverage < MIN_COVERAGE:  # no object drawn: nothing of it can be right (an empty reading looks centred)
            continue
        hits["colours"] += got.pair() == want.pair()
        hits["pattern"] += pattern_of(got) == pattern_of(want)
        hits["shape"] += shape_of(got) == shape_of(want)
        hits["position"] += position_of(got) == position_of(want)
    return {name: n / count for name, n in hits.items()}
