"""ShapesBench: does a generated image show what its shapes-world prompt asks for?

An image is read back without any learned model: each pixel takes the nearest ``PALETTE``
colour within ``COLOUR_THRESHOLD`` (else none), a 3×3 mode filter drops the one-pixel
antialiasing seams, and each colour's connected components become objects. A component's
shape comes from simple geometry of its hole-filled mask (``classify_shape``), its size
from the bounding box's long side over the cell's short side, its cell from the box centre.

Per prompt (``parse_prompt`` says what it asks) the detections are matched to the asked
objects by the best assignment, then scored: count (exact number of objects), colour,
shape, position (asked cells, and relations), size; ``attribute`` is the mean of count,
colour, shape and position, over the parts a prompt asks for. The distribution distance
``fsd`` (Fréchet Shapes Distance) is the Fréchet distance between Gaussians fitted to
27 simple per-image features (palette pixel fractions, background and stray-pixel
fractions, object count, mean size/fill/solidity, shape and row/column histograms) of
the generated images and of the bench scenes rendered for real; lower is better.

The bench is a fixed list of ``BENCH_SIZE`` prompts from the world's "bench" seed domain
(disjoint from training): even items are long captions of 1–4 object scenes, odd items
are short captions of 1–2 object scenes (so a short prompt still names every object).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import (
    BACKGROUNDS,
    CROSS_ARM,
    PALETTE,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    STAR_INNER,
    ObjectSpec,
    ParsedPrompt,
    Scene,
    SceneObject,
    long_caption,
    parse_prompt,
    relation_holds,
    render,
    sample_scene,
    scene_rng,
    short_caption,
)

BENCH_SIZE = 256
BENCH_SEED = 0
COLOUR_THRESHOLD = 50.0  # max RGB distance from a palette colour for a pixel to count as that colour
MIN_AREA_FRACTION = 0.025  # components smaller than this share of a square cell are noise
MAX_DETECTIONS = 8  # largest components considered when matching (bounds the assignment search)
_PAL = np.array(list(PALETTE.values()), dtype=np.float32)  # (K, 3)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_COLOURS = tuple(PALETTE)
_SIZE_EDGES = (0.5 * (SIZE_FRACTION["small"] + SIZE_FRACTION["medium"]),
               0.5 * (SIZE_FRACTION["medium"] + SIZE_FRACTION["large"]))
# Hole-filled area / side² of each shape as the world draws it (side = the box side, SIZE_FRACTION).
AREA_FACTOR = {"circle": np.pi / 4, "ring": np.pi / 4, "square": 1.0, "triangle": 0.5,
               "star": 5 * STAR_INNER * np.sin(np.radians(36)) / (4 * np.sin(np.radians(72)) ** 2),
               "cross": 2 * CROSS_ARM - CROSS_ARM ** 2}
METRICS = ("attribute", "count", "colour", "shape", "position", "size")


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    cell: int
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    fill: float  # hole-filled area / bbox area
    solidity: float  # hole-filled area / convex hull area
    hole: float  # hole area / hole-filled area
    symmetry: float  # IoU of the hole-filled mask with its top-bottom mirror image
    extent: float  # estimated side / cell short side (SIZE_FRACTION scale)


@dataclass(frozen=True)
class BenchItem:
    prompt: str
    style: str  # "long" or "short"
    scene: Scene


def classify_shape(fill: float, solidity: float, hole: float, symmetry: float) -> str:
    """Shape from geometry of the hole-filled mask: rings have a hole; stars (concave) and triangles
    (convex) are top-bottom asymmetric; of the symmetric ones crosses are concave with a low bbox fill
    (~0.56), squares fill their box (1.0) and circles π/4."""
    if hole > 0.08:
        return "ring"
    if symmetry < 0.72:
        return "star" if solidity < 0.8 else "triangle"
    if solidity < 0.8 or fill < 0.63:
        return "cross"
    return "square" if fill > 0.89 else "circle"


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq: list) -> list:
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    x, y = np.array(hull, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _describe(comp: np.ndarray, x0: int, y0: int, colour: str, width: int, height: int) -> Detection:
    """Geometry of one component given as its bbox crop ``comp`` (h, w) bool at (x0, y0)."""
    h, w = comp.shape
    pad = Image.fromarray(np.pad(comp, 1).astype(np.uint8) * 255).copy()  # fromarray may share a read-only buffer
    ImageDraw.floodfill(pad, (0, 0), 128)  # everything reachable from outside; the 0s left are holes
    arr = np.asarray(pad)
    filled = arr[1:-1, 1:-1] != 128  # (h, w)
    area, hole = int(comp.sum()), int((arr == 0).sum())
    around = np.pad(filled, 1)
    edge = filled & ~(around[:-2, 1:-1] & around[2:, 1:-1] & around[1:-1, :-2] & around[1:-1, 2:])
    ys, xs = np.nonzero(edge)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = _hull_area(corners)
    filled_area = area + hole
    fill = filled_area / (w * h)
    solidity = filled_area / hull if hull > 0 else 1.0
    symmetry = (filled & filled[::-1]).sum() / max(1, (filled | filled[::-1]).sum())  # IoU with its top-bottom flip
    shape = classify_shape(fill, solidity, hole / filled_area, symmetry)
    # Size from area, not bbox: thin tips (stars, triangles) fade first. Half the edge pixels stand for the
    # antialiased rim the colour threshold dropped.
    side = np.sqrt((filled_area + 0.5 * len(xs)) / AREA_FACTOR[shape])
    extent = side / min(width / 3, height / 3)
    size = SIZES[int(np.searchsorted(_SIZE_EDGES, extent))]
    cx, cy = x0 + w / 2, y0 + h / 2
    cell = min(2, int(cy * 3 / height)) * 3 + min(2, int(cx * 3 / width))
    return Detection(colour, shape, size, cell, area, (x0, y0, x0 + w, y0 + h), fill, solidity,
                     hole / filled_area, symmetry, extent)


def segment(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 labels: palette index, or len(PALETTE) for 'no object colour'."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    d2 = ((arr[:, :, None, :] - _PAL[None, None]) ** 2).sum(-1)  # (H, W, K)
    lab = d2.argmin(-1).astype(np.uint8)
    lab[d2.min(-1) > COLOUR_THRESHOLD ** 2] = len(_PAL)
    return np.asarray(Image.fromarray(lab).filter(ImageFilter.ModeFilter(3)))  # drops 1-px seams


def detect(image: Image.Image) -> list[Detection]:
    """All objects found in ``image``, largest first."""
    width, height = image.size
    lab = segment(image)
    min_area = max(6, int(MIN_AREA_FRACTION * min(width, height) ** 2 / 9))
    found: list[Detection] = []
    for k, colour in enumerate(_COLOURS):
        mask = lab == k
        if mask.sum() < min_area:
            continue
        img = Image.fromarray(mask.astype(np.uint8) * 255).copy()  # fromarray may share a read-only buffer
        for value in range(1, 64):  # at most 63 components per colour: noise has more, and loses anyway
            arr = np.asarray(img)
            flat = int(np.argmax(arr == 255))
            if arr.flat[flat] != 255:
                break
            ImageDraw.floodfill(img, (flat % width, flat // width), value)
            comp = np.asarray(img) == value
            if comp.sum() < min_area:
                continue
            ys, xs = np.nonzero(comp)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            found.append(_describe(comp[y0:y1, x0:x1], int(x0), int(y0), colour, width, height))
    return sorted(found, key=lambda d: -d.area)


def score(detections: Sequence[Detection], parsed: ParsedPrompt) -> dict[str, float | None]:
    """Per-prompt scores in [0, 1] (None where the prompt does not ask for that part)."""
    specs = parsed.objects
    if not specs:
        raise ValueError("the prompt names no shape of the world; ShapesBench cannot score it")
    dets = list(detections[:MAX_DETECTIONS])

    def pair(s: ObjectSpec, d: Detection) -> float:
        return ((s.colour is None or s.colour == d.colour) + (s.shape == d.shape)
                + (s.cell is None or s.cell == d.cell) + 0.5 * (s.size is None or s.size == d.size))

    options = dets + [None] * len(specs)  # None: the object is missing
    gain = np.array([[pair(s, d) if d is not None else 0.0 for d in options] for s in specs])
    best = max(itertools.permutations(range(len(options)), len(specs)),
               key=lambda p: sum(gain[i, j] for i, j in enumerate(p)))
    match = [options[j] for j in best]

    def mean(values: list[bool]) -> float | None:
        return float(np.mean(values)) if values else None

    colour = mean([m is not None and m.colour == s.colour for s, m in zip(specs, match) if s.colour])
    shape = mean([m is not None and m.shape == s.shape for s, m in zip(specs, match)])
    size = mean([m is not None and m.size == s.size for s, m in zip(specs, match) if s.size])
    places = [m is not None and m.cell == s.cell for s, m in zip(specs, match) if s.cell is not None]
    places += [match[a] is not None and match[b] is not None and relation_holds(r, match[a].cell, match[b].cell)
               for a, r, b in parsed.relations]
    out: dict[str, float | None] = {"count": float(len(detections) == len(specs)), "colour": colour,
                                    "shape": shape, "position": mean(places), "size": size}
    parts = [out[k] for k in ("count", "colour", "shape", "position") if out[k] is not None]
    out["attribute"] = float(np.mean(parts))
    return out


def features(image: Image.Image, detections: Sequence[Detection] | None = None) -> np.ndarray:
    """The 27 per-image features the FSD compares (see the module docstring)."""
    dets = detect(image) if detections is None else detections
    lab = segment(image)
    frac = np.bincount(lab.ravel(), minlength=len(_PAL) + 1) / lab.size  # (K+1,)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    bg = (((arr[:, :, None, :] - _BG[None, None]) ** 2).sum(-1).min(-1) <= COLOUR_THRESHOLD ** 2).mean()
    shapes = np.array([sum(d.shape == s for d in dets) for s in SHAPES], dtype=np.float64)
    rows = np.bincount([d.cell // 3 for d in dets], minlength=3)
    cols = np.bincount([d.cell % 3 for d in dets], minlength=3)
    stats = [np.mean([getattr(d, a) for d in dets]) if dets else 0.0 for a in ("extent", "fill", "solidity")]
    return np.concatenate([frac[:-1], [bg, max(0.0, frac[-1] - bg), len(dets)], stats, shapes, rows, cols])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    eps = 1e-6 * np.eye(a.shape[1])
    sa, sb = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)  # tr sqrt(Sa Sb) = sum sqrt eig(Sa^½ Sb Sa^½)
    d = ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return max(0.0, float(d))  # rounding can leave -1e-10 for identical sets


@lru_cache(maxsize=1)
def _all_items() -> tuple[BenchItem, ...]:
    items = []
    for i in range(BENCH_SIZE):
        rng = scene_rng("bench", BENCH_SEED, i)
        if i % 2 == 0:
            scene = sample_scene(rng)
            items.append(BenchItem(long_caption(scene), "long", scene))
        else:
            scene = sample_scene(rng, n_objects=int(rng.integers(1, 3)))
            items.append(BenchItem(short_caption(scene), "short", scene))
    return tuple(items)


@lru_cache(maxsize=4 * BENCH_SIZE)
def _real_features(i: int, width: int, height: int) -> np.ndarray:
    """Bench item ``i``'s real scene's features (the FSD's reference: the same for every model scored)."""
    return features(render(_all_items()[i].scene, width, height))


def bench_items(n: int = BENCH_SIZE) -> tuple[BenchItem, ...]:
    """The first ``n`` fixed bench items (long and short styles alternate)."""
    if not 1 <= n <= BENCH_SIZE:
        raise ValueError(f"ShapesBench has {BENCH_SIZE} prompts; n must be in 1..{BENCH_SIZE}, got {n}")
    return _all_items()[:n]


def scene_for_prompt(text: str, rng: np.random.Generator) -> Scene:
    """A scene that satisfies ``text`` (unasked attributes drawn at random): the evaluator's oracle."""
    parsed = parse_prompt(text)
    if not 1 <= len(parsed.objects) <= 4:
        raise ValueError(f"the world draws 1..4 objects; {text!r} asks for {len(parsed.objects)}")
    free = [c for c in range(9) if c not in {s.cell for s in parsed.objects}]
    rng.shuffle(free)
    objs = []
    for s in parsed.objects:
        cell = s.cell if s.cell is not None else free.pop()
        objs.append(SceneObject(s.shape, s.colour or _COLOURS[int(rng.integers(len(_COLOURS)))],
                                s.size or SIZES[int(rng.integers(3))], cell))
    return Scene(tuple(objs), sample_scene(rng).background)


def oracle_generate_fn(width: int = 128, height: int = 128) -> Callable[[list[str], int], list[Image.Image]]:
    """A perfect 'model' (renders a scene satisfying each prompt): the bench's calibration ceiling."""
    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        rng = np.random.default_rng(seed)
        return [render(scene_for_prompt(p, rng), width, height) for p in prompts]
    return generate


def evaluate(generate_fn: Callable[[list[str], int], list[Image.Image]], n: int = 200, width: int = 128,
             height: int = 128, batch_size: int = 8, seed: int = 0) -> dict:
    """Run ``generate_fn`` on the first ``n`` bench prompts (batch ``b`` gets seed ``seed + b``) and score.

    Returns the mean of each metric over prompts (``METRICS``, fractions in [0, 1]), ``attribute``
    per caption style and per number of asked objects (``attribute_by_objects``), ``fsd`` against the
    bench scenes rendered at ``width``×``height``, and ``per_prompt`` rows.
    """
    items = bench_items(n)
    t0 = time.perf_counter()
    rows, gen_feats, real_feats = [], [], []
    for b, start in enumerate(range(0, n, batch_size)):
        batch = items[start:start + batch_size]
        images = generate_fn([it.prompt for it in batch], seed + b)
        if len(images) != len(batch):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(batch)} prompts")
        for it, img in zip(batch, images):
            dets = detect(img)
            parsed = parse_prompt(it.prompt)
            rows.append({"prompt": it.prompt, "style": it.style, "objects": len(parsed.objects),
                         "found": len(dets), **score(dets, parsed)})
            gen_feats.append(features(img, dets))
            real_feats.append(_real_features(len(real_feats), width, height))
    out: dict = {"n": n}
    for m in METRICS:
        vals = [r[m] for r in rows if r[m] is not None]
        out[m] = float(np.mean(vals)) if vals else None
    for style in ("long", "short"):
        vals = [r["attribute"] for r in rows if r["style"] == style]
        out[f"attribute_{style}"] = float(np.mean(vals)) if vals else None
    counts = sorted({r["objects"] for r in rows})  # where a model breaks down as scenes get fuller
    out["attribute_by_objects"] = {str(k): float(np.mean([r["attribute"] for r in rows if r["objects"] == k]))
                                   for k in counts}
    # How a model fails, per caption style and asked objects ("short/1": "a red star"): images with no object
    # at all (a model that never commits to a place), and with more objects than asked (strays, fragments).
    out["empty"] = float(np.mean([r["found"] == 0 for r in rows]))
    groups = sorted({(r["style"], r["objects"]) for r in rows})
    out["by_group"] = {f"{st}/{k}": _group([r for r in rows if (r["style"], r["objects"]) == (st, k)])
                       for st, k in groups}
    out["fsd"] = frechet_distance(np.array(gen_feats), np.array(real_feats)) if n > 1 else None
    out["seconds"] = time.perf_counter() - t0
    out["per_prompt"] = rows
    return out


def _group(rows: list[dict]) -> dict[str, float | int]:
    return {"n": len(rows), "attribute": float(np.mean([r["attribute"] for r in rows])),
            "count": float(np.mean([r["count"] for r in rows])),
            "empty": float(np.mean([r["found"] == 0 for r in rows])),
            "extra": float(np.mean([r["found"] > r["objects"] for r in rows]))}


def format_table(results: dict[str, dict]) -> str:
    """Markdown table of several models' ``evaluate`` results side by side (accuracies in %)."""
    cols = ["attribute", "attribute_long", "attribute_short", "count", "colour", "shape", "position", "size"]
    head = "| model | " + " | ".join(cols) + " | FSD ↓ | n |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for name, r in results.items():
        cells = [f"{100 * r[c]:.1f}" if r.get(c) is not None else "–" for c in cols]
        fsd = f"{r['fsd']:.3f}" if r.get("fsd") is not None else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fsd} | {r['n']} |")
    return "\n".join(lines)
