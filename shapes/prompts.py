"""Prompt expansion for the shapes world: a short prompt rewritten as the dense caption Σ was trained on.

PixArt-Σ learned from dense captions, and a short prompt leaves it to guess: "a pink triangle" says nothing
of where, so the model's early estimate spreads over every cell and may never commit to one; "a red ring and
a blue triangle" reads like the world's alt-text, which names only the two largest objects of a fuller
scene, so more shapes may follow. ``expand_prompt`` writes the dense caption of a scene that keeps every
thing the prompt asks (shapes, colours, sizes, cells, relations) and draws what it leaves open from a seed,
as DALL-E 3 and others upsample prompts with a language model before the diffusion model sees them. Here
the world's own grammar is the language model: nothing is learned and nothing the prompt says is dropped.

A prompt is left as it is when expanding it could lose or change what it says: it has a word the world's
parser would pass over (outside its vocabulary, or where it does not read it: a background, "big", "on the
left", "five"), asks for 0 or more than 4 objects, or asks for places no placement satisfies.
"""

from __future__ import annotations

import itertools

import numpy as np

from .world import (
    CELL_WORDS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    PALETTE,
    SHAPE_OF,
    SIZES,
    ParsedPrompt,
    Scene,
    SceneObject,
    long_caption,
    parse_prompt,
    relation_holds,
    sample_scene,
    tokenize,
)

# Words that are safe anywhere (they carry no attribute); every other word must sit where parse_prompt reads
# it (``_unread``), or the rewrite would drop what it says.
_FILLER = {"a", "an", "the", "and", "with", "is", "of", "to", "in", "at", "picture", "image", "photo"}
_ADJECTIVES = set(PALETTE) | set(SIZES) | set(NUMBER_WORDS)  # read only in a chain right before a shape word
_SENTENCE_END = {".", ";", "!", "?"}


def _placements(parsed: ParsedPrompt) -> list[tuple[int, ...]]:
    """Every assignment of distinct cells (0..8) to the objects that keeps their asked cells and relations."""
    fixed = [s.cell for s in parsed.objects]
    if len({c for c in fixed if c is not None}) != sum(c is not None for c in fixed):
        return []  # two objects asked for the same cell
    free_idx = [i for i, c in enumerate(fixed) if c is None]
    free_cells = [c for c in range(9) if c not in fixed]
    out = []
    for chosen in itertools.permutations(free_cells, len(free_idx)):
        cells = list(fixed)
        for i, c in zip(free_idx, chosen):
            cells[i] = c
        if all(relation_holds(r, cells[a], cells[b]) for a, r, b in parsed.relations):
            out.append(tuple(cells))
    return out


def _unread(tokens: list[str]) -> list[str]:
    """The words of a prompt ``parse_prompt`` would pass over: outside the world's vocabulary, or in a place it
    does not read them ("a big star", "a star on the left", "a star of red colour", "five stars")."""
    sentence = list(itertools.accumulate(t in _SENTENCE_END for t in tokens))  # (T,) sentence index per token
    shapes = [k for k, t in enumerate(tokens) if t in SHAPE_OF]
    out = []
    for i, w in enumerate(tokens):
        shape_before = any(k < i and sentence[k] == sentence[i] for k in shapes)
        shape_after = any(k > i and sentence[k] == sentence[i] for k in shapes)
        if w in SHAPE_OF or w in _FILLER or w in _SENTENCE_END or w == ",":
            continue
        if w in _ADJECTIVES:
            j = i + 1
            while j < len(tokens) and tokens[j] in _ADJECTIVES:
                j += 1
            if j < len(tokens) and tokens[j] in SHAPE_OF:
                continue
        elif w in ("above", "below") or (w in ("left", "right") and tokens[i + 1:i + 2] == ["of"]):
            if shape_before and shape_after:  # a relation is read between two shapes of one sentence
                continue
        elif w in CELL_WORDS:
            j = i - 1
            while j >= 0 and tokens[j] in CELL_WORDS:
                j -= 1
            if i - j <= 2 and j >= 1 and tokens[j] == "the" and tokens[j - 1] in ("in", "at"):
                continue
        out.append(w)
    return out


def _plan(text: str) -> tuple[ParsedPrompt, list[tuple[int, ...]]] | None:
    """The parsed prompt and every placement of its objects, when ``text`` can be expanded; else None."""
    tokens = tokenize(text)
    if not tokens or _unread(tokens):
        return None
    parsed = parse_prompt(text)
    if not 1 <= len(parsed.objects) <= MAX_OBJECTS:  # checked first: placements of 5+ objects are many
        return None
    options = _placements(parsed)
    return (parsed, options) if options else None


def expandable(text: str) -> bool:
    """Whether ``expand_prompt`` rewrites ``text`` (see the module docstring for when it does not)."""
    return _plan(text) is not None


def expand_prompt(text: str, seed: int) -> str:
    """The dense caption of a scene satisfying ``text``, what it leaves open drawn from ``seed``; or ``text``.

    Kept: every object's shape and the colour, size and cell it is given, and every relation. Drawn: the rest
    (a colour not giving two objects the same colour and shape where the palette allows, a size, a cell among
    those that satisfy the relations, the background). The same text and seed always give the same caption.
    """
    plan = _plan(text)
    if plan is None:
        return text
    parsed, options = plan
    rng = np.random.default_rng([int(seed), 0x5EED])
    cells = options[int(rng.integers(len(options)))]
    taken = {(s.colour, s.shape) for s in parsed.objects if s.colour is not None}
    objects = []
    for spec, cell in zip(parsed.objects, cells):
        colour = spec.colour
        if colour is None:
            fresh = [c for c in PALETTE if (c, spec.shape) not in taken] or list(PALETTE)
            colour = fresh[int(rng.integers(len(fresh)))]
            taken.add((colour, spec.shape))
        size = spec.size or SIZES[int(rng.integers(len(SIZES)))]
        objects.append(SceneObject(spec.shape, colour, size, cell))
    background = sample_scene(rng, n_objects=1).background  # the world's own background distribution
    # Reading order, as every training caption lists its objects; the cells carry the asked relations.
    return long_caption(Scene(tuple(sorted(objects, key=lambda o: o.cell)), background))


__all__ = ["expand_prompt", "expandable"]
