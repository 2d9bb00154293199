"""The procedural "shapes" world: seeded scenes, their images, and their captions.

A scene holds 1–4 objects (a shape in a colour and a size) on distinct cells of a 3×3
grid, over a plain or two-colour background. Object colours come from a fixed,
well-separated ``PALETTE``; backgrounds use pale colours outside it, so ShapesBench can
segment an image back into objects by nearest palette colour. Each scene has two
captions: ``short_caption`` names only the main object or two (the "raw" alt-text the
PixArt-α data had) and ``long_caption`` describes every object, its size and place,
their relations and the background (the dense Share-Captioner analogue of PixArt-Σ).
Everything is a pure function of its seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pixsigma.io import atomic_write, atomic_write_text

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 130, 0),
    "yellow": (245, 215, 0),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 60, 180),
    "pink": (235, 100, 170),
    "brown": (120, 75, 35),
    "black": (30, 30, 30),
}
# Pale colours far from every palette colour, so background never reads as an object.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "grey": (212, 212, 212),
    "cream": (245, 236, 210),
    "mint": (214, 238, 222),
    "lilac": (230, 220, 242),
}
SPLITS = ("none", "vertical", "horizontal")  # vertical: left | right halves; horizontal: top / bottom
SIZES = ("small", "medium", "large")
SIZE_FRACTION = {"small": 0.45, "medium": 0.68, "large": 0.92}  # side of the object / short side of its cell
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("one", "two", "three", "four")
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 64, 512, 4.0
MAX_OBJECTS = 4
RING_INNER = 0.5  # inner / outer diameter of a ring
CROSS_ARM = 0.34  # arm width / side of a cross
STAR_INNER = 0.45  # inner / outer radius of a star
# Seed domains keep training, benchmark and held-out streams disjoint whatever the seed.
DOMAINS = {"train": 0, "bench": 1, "heldout": 2}


def _check(value: str, accepted: tuple[str, ...], what: str) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major: 0 = top left, 4 = centre, 8 = bottom right
    offset: tuple[float, float] = (0.0, 0.0)  # jitter in [-1, 1] × the slack the object has in its cell

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, tuple(PALETTE), "colour")
        _check(self.size, SIZES, "size")
        if not isinstance(self.cell, int) or not 0 <= self.cell <= 8:
            raise ValueError(f"cell must be an integer 0..8 (row-major 3×3 grid), got {self.cell!r}")
        if len(self.offset) != 2 or any(not -1.0 <= float(v) <= 1.0 for v in self.offset):
            raise ValueError(f"offset must be two numbers in [-1, 1], got {self.offset!r}")
        object.__setattr__(self, "offset", (float(self.offset[0]), float(self.offset[1])))

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    colours: tuple[str, ...] = ("white",)
    split: str = "none"

    def __post_init__(self) -> None:
        _check(self.split, SPLITS, "background split")
        object.__setattr__(self, "colours", tuple(self.colours))
        want = 1 if self.split == "none" else 2
        if len(self.colours) != want:
            raise ValueError(f"a background with split {self.split!r} takes {want} colour(s), got {self.colours}")
        for c in self.colours:
            _check(c, tuple(BACKGROUNDS), "background colour")


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background = field(default_factory=Background)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must sit on distinct cells, got cells {cells}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = tuple(SceneObject(**{**o, "offset": tuple(o.get("offset", (0.0, 0.0)))}) for o in d["objects"])
        return cls(objs, Background(**d.get("background", {})))


def scene_rng(domain: str, seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of stream ``seed`` in ``domain`` (train / bench / heldout)."""
    _check(domain, tuple(DOMAINS), "seed domain")
    return np.random.default_rng([DOMAINS[domain], int(seed), int(index)])


def sample_scene(rng_or_seed: np.random.Generator | int, n_objects: int | None = None) -> Scene:
    """A random scene; objects have distinct cells and distinct (colour, shape), in reading order."""
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n}")
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    pairs = rng.choice(len(PALETTE) * len(SHAPES), size=n, replace=False)
    colours = tuple(PALETTE)
    objects = []
    for cell, pair in zip(cells, pairs):
        colour, shape = colours[int(pair) // len(SHAPES)], SHAPES[int(pair) % len(SHAPES)]
        size = SIZES[int(rng.integers(len(SIZES)))]
        offset = tuple(float(v) for v in np.round(rng.uniform(-0.8, 0.8, size=2), 3))
        objects.append(SceneObject(shape, colour, size, cell, offset))
    names = tuple(BACKGROUNDS)
    split = SPLITS[int(rng.integers(len(SPLITS)))]
    k = 1 if split == "none" else 2
    bg = tuple(names[int(i)] for i in rng.choice(len(names), size=k, replace=False))
    return Scene(tuple(objects), Background(bg, split))


# ---------------------------------------------------------------- rendering


def check_image_size(width: int, height: int) -> None:
    """Refuse sizes outside 64–512 px per side or beyond a 1:4 / 4:1 aspect ratio."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or not MIN_SIDE <= v <= MAX_SIDE:
            raise ValueError(f"{name} {v!r} is outside the shapes world: sides must be integers in "
                             f"[{MIN_SIDE}, {MAX_SIDE}] px with aspect ratio between 1:4 and 4:1")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {width}x{height} is outside the shapes world: sides must be in "
                         f"[{MIN_SIDE}, {MAX_SIDE}] px with aspect ratio between 1:4 and 4:1")


def object_box(obj: SceneObject, width: int, height: int) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the object's square bounding box, in pixels."""
    cw, ch = width / 3, height / 3
    side = SIZE_FRACTION[obj.size] * min(cw, ch)
    cx = (obj.col + 0.5) * cw + obj.offset[0] * (cw - side) / 2  # jitter never leaves the cell
    cy = (obj.row + 0.5) * ch + obj.offset[1] * (ch - side) / 2
    return cx, cy, side


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cx: float, cy: float, s: float) -> None:
    fill = PALETTE[obj.colour]
    x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(1, round(s * (1 - RING_INNER) / 2)))
    elif obj.shape == "cross":
        a = s * CROSS_ARM / 2
        draw.rectangle((cx - a, y0, cx + a, y1), fill=fill)
        draw.rectangle((x0, cy - a, x1, cy + a), fill=fill)
    else:  # star: scaled so its bounding box is s wide, centred vertically on the box
        r_out = s / (2 * np.sin(np.radians(72)))
        top = cy - r_out * (1 + np.cos(np.radians(36))) / 2
        sy = top + r_out
        pts = []
        for i in range(10):
            r = r_out if i % 2 == 0 else r_out * STAR_INNER
            a = np.radians(-90 + 36 * i)
            pts.append((cx + r * np.cos(a), sy + r * np.sin(a)))
        draw.polygon(pts, fill=fill)


def render(scene: Scene, width: int, height: int) -> Image.Image:
    """The scene as an RGB image; supersampled then box-reduced, so object interiors keep exact colours."""
    check_image_size(width, height)
    ss = 4 if max(width, height) <= 256 else 2  # supersampling factor for antialiased edges
    big = Image.new("RGB", (width * ss, height * ss), BACKGROUNDS[scene.background.colours[0]])
    draw = ImageDraw.Draw(big)
    if scene.background.split == "vertical":
        draw.rectangle((width * ss // 2, 0, width * ss, height * ss), fill=BACKGROUNDS[scene.background.colours[1]])
    elif scene.background.split == "horizontal":
        draw.rectangle((0, height * ss // 2, width * ss, height * ss), fill=BACKGROUNDS[scene.background.colours[1]])
    for obj in scene.objects:
        cx, cy, s = object_box(obj, width, height)
        _draw_object(draw, obj, cx * ss, cy * ss, s * ss)
    return big.reduce(ss)  # exact block means: a block wholly inside an object keeps its palette colour


# ---------------------------------------------------------------- captions


def cell_name(cell: int) -> str:
    row, col = ROWS[cell // 3], COLS[cell % 3]
    return "centre" if cell == 4 else f"{row} {col}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def relation(a: SceneObject, b: SceneObject) -> str:
    """How ``a`` sits relative to ``b``: 'above', 'left of', 'above and left of', ..."""
    parts = []
    if a.row != b.row:
        parts.append("above" if a.row < b.row else "below")
    if a.col != b.col:
        parts.append("left of" if a.col < b.col else "right of")
    return " and ".join(parts)


def relation_holds(rel: str, cell_a: int, cell_b: int) -> bool:
    """Whether an object on ``cell_a`` is ``rel`` (one of ``RELATIONS``) the object on ``cell_b``."""
    ra, ca, rb, cb = cell_a // 3, cell_a % 3, cell_b // 3, cell_b % 3
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def background_phrase(bg: Background) -> str:
    if bg.split == "none":
        return f"a plain {bg.colours[0]} background"
    way = "left to right" if bg.split == "vertical" else "top to bottom"
    return f"a {bg.colours[0]} and {bg.colours[1]} background split {way}"


def main_objects(scene: Scene) -> tuple[SceneObject, ...]:
    """The one or two largest objects (ties: reading order), kept in reading order."""
    ranked = sorted(range(len(scene.objects)), key=lambda i: (-SIZE_FRACTION[scene.objects[i].size], i))
    return tuple(scene.objects[i] for i in sorted(ranked[:2]))


def short_caption(scene: Scene) -> str:
    """The raw, PixArt-α-style caption: only the main object or two, e.g. 'a red star'."""
    return " and ".join(f"{_article(o.colour)} {o.colour} {o.shape}" for o in main_objects(scene))


def long_caption(scene: Scene) -> str:
    """The dense caption: every object's size, colour and place, relations, and the background."""
    n = len(scene.objects)
    shapes = "shapes" if n > 1 else "shape"
    parts = [f"{NUMBER_WORDS[n - 1].capitalize()} {shapes} on {background_phrase(scene.background)}."]
    for o in scene.objects:
        parts.append(f"{_article(o.size).capitalize()} {o.size} {o.colour} {o.shape} in the {cell_name(o.cell)}.")
    for a, b in zip(scene.objects[:3], scene.objects[1:3]):  # two relations at most keep it under 80 tokens
        parts.append(f"The {a.name} is {relation(a, b)} the {b.name}.")
    return " ".join(parts)


EXTRA_WORDS = ("picture", "image", "photo", "of", "with", "and", "on", "the", "a", "an", "is", "in", "at", "to",
               "some", "shape", "shapes", "object", "objects", "background", "center", "next", "near", "big",
               "little", "tiny", "huge", "five", "six", "seven", "eight", "nine", "many", "two", "colourful",
               "color", "colour", "split", "plain", "left", "right", "top", "bottom", "middle", "above", "below")


def caption_vocabulary() -> tuple[str, ...]:
    """Every word a caption of this world can use (plus a few prompt words), in a fixed order."""
    words: list[str] = []
    groups = (NUMBER_WORDS, SHAPES, tuple(s + "s" for s in SHAPES), tuple(PALETTE), tuple(BACKGROUNDS), SIZES,
              ROWS, COLS, ("centre", "of", "above", "below", "and", "the", "a", "an", "is", "in", "on", "plain",
                           "background", "split", "to", "shape", "shapes"), EXTRA_WORDS, (".", ","))
    for g in groups:
        for w in g:
            if w not in words:
                words.append(w)
    return tuple(words)


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks of one object; None where the prompt does not say."""

    shape: str
    colour: str | None = None
    size: str | None = None
    cell: int | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    objects: tuple[ObjectSpec, ...]
    relations: tuple[tuple[int, str, int], ...]  # (subject index, one of RELATIONS, object index)


SHAPE_OF = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}  # a prompt's shape word -> the shape
_COUNT_OF = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
CELL_WORDS = {"top", "middle", "bottom", "left", "right", "centre", "center"}  # read after "in the" / "at the"


def _cell_from(words: list[str]) -> int | None:
    rows = [ROWS.index(w) for w in words if w in ("top", "bottom")]
    cols = [COLS.index(w) for w in words if w in ("left", "right")]
    if not words:
        return None
    return (rows[0] if rows else 1) * 3 + (cols[0] if cols else 1)


def tokenize(text: str) -> list[str]:
    """A prompt's lower-cased words and punctuation marks, as ``parse_prompt`` reads them; any other run of
    characters ("3", "&", "é") is a token of its own, so a check of the tokens sees what the parser passes over."""
    return re.findall(r"[a-z]+|[.,;!?]|[^a-z\s.,;!?]+", text.lower())


def parse_prompt(text: str) -> ParsedPrompt:
    """The objects (shape, colour, size, cell) and relations a prompt in the world's language asks for.

    Reads both caption styles and simple variants ('two blue rings', 'a star to the left of a circle').
    'the <colour> <shape>' refers back to an object already named rather than adding one.
    """
    toks = tokenize(text)
    objects: list[ObjectSpec] = []
    relations: list[tuple[int, str, int]] = []
    pending: tuple[int, list[str], int] | None = None  # (subject index, relation words, token index of 'is')
    last_index: int | None = None
    i = 0
    while i < len(toks):
        w = toks[i]
        if w in ".;!?":
            pending, last_index = None, None
        elif w == "is" and last_index is not None:
            pending = (last_index, [], i)
        elif w in ("above", "below", "left", "right") and (pending is not None or last_index is not None):
            pending = pending or (last_index, [], i)  # 'a star to the left of a circle' needs no 'is'
            pending[1].append(w if w in ("above", "below") else f"{w} of")
        elif w in SHAPE_OF:
            shape, colour, size, det = SHAPE_OF[w], None, None, None
            j = i - 1
            while j >= 0 and (toks[j] in PALETTE or toks[j] in SIZES):
                colour = toks[j] if toks[j] in PALETTE and colour is None else colour
                size = toks[j] if toks[j] in SIZES and size is None else size
                j -= 1
            det = toks[j] if j >= 0 else None
            cell_words: list[str] = []
            k = i + 1
            if k + 1 < len(toks) and toks[k] in ("in", "at") and toks[k + 1] == "the":
                k += 2
                while k < len(toks) and toks[k] in CELL_WORDS and len(cell_words) < 2:
                    cell_words.append(toks[k])
                    k += 1
                i = k - 1
            spec = ObjectSpec(shape, colour, size, _cell_from(cell_words))
            ref = None
            if det == "the":
                ref = next((n for n, o in enumerate(objects) if o.shape == shape
                            and (colour is None or o.colour == colour)), None)
            if ref is None:
                count = _COUNT_OF.get(det or "", 2 if w.endswith("s") else 1)
                ref = len(objects)
                objects.extend([spec] * count)
            if pending is not None and pending[1] and ref != pending[0]:
                relations.extend((pending[0], r, ref) for r in pending[1])
                pending = None
            last_index = ref
        i += 1
    return ParsedPrompt(tuple(objects), tuple(relations))


# ---------------------------------------------------------------- datasets


SHORT_STYLES = ("raw", "complete")


def dataset_caption(scene: Scene, short: str = "raw") -> str:
    """A record's (short) caption: the raw one, or with ``short="complete"`` the long one wherever the raw
    caption leaves objects out (3-4 object scenes), so that every caption a model trains on names every object.

    Raw alt-text that names two objects of a four-object scene teaches a model that "a red star and a blue
    ring" may hold more shapes; with complete captions, two named objects always mean exactly two."""
    _check(short, SHORT_STYLES, "short caption style")
    if short == "complete" and len(main_objects(scene)) < len(scene.objects):
        return long_caption(scene)
    return short_caption(scene)


def make_dataset(folder: str | Path, n: int, seed: int = 0,
                 sizes: Sequence[tuple[int, int]] = ((128, 128),), short: str = "raw",
                 progress: Callable[[int, int], None] | None = None,
                 recaption: Callable[[int, str], str] | None = None) -> Path:
    """Write ``n`` scenes as PNG + sidecar .txt (short caption) + ``metadata.jsonl``.

    Each metadata line is ``{"path", "caption", "long_caption", "width", "height", "scene"}`` with
    ``path`` relative to ``folder``. ``sizes`` lists (width, height) pairs, drawn per image. ``short``:
    the ``caption`` each record gets (``dataset_caption``: "raw", or "complete" where raw leaves objects out).
    ``progress(done, n)`` is called after each image. ``recaption(i, caption)`` rewrites record ``i``'s captions
    (a LoRA's new words: ``shapes/lora_demo.py``).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check(short, SHORT_STYLES, "short caption style")
    for w, h in sizes:
        check_image_size(w, h)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rng = scene_rng("train", seed, i)
        scene = sample_scene(rng)
        w, h = sizes[int(rng.integers(len(sizes)))]
        image = render(scene, w, h)
        name = f"{i:06d}.png"
        atomic_write(out / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
        caption, long = dataset_caption(scene, short), long_caption(scene)
        if recaption is not None:
            caption, long = recaption(i, caption), recaption(i, long)
        atomic_write_text(out / f"{i:06d}.txt", caption)
        lines.append(json.dumps({"path": name, "caption": caption, "long_caption": long,
                                 "width": w, "height": h, "scene": scene.to_dict()}))
        if progress is not None:
            progress(i + 1, n)
    atomic_write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out
