"""Prompt expansion: a short shapes prompt becomes a dense caption that keeps everything it asks."""

import numpy as np
import pytest

from shapes import shapesbench
from shapes.prompts import expand_prompt, expandable
from shapes.world import long_caption, parse_prompt, render


def _cells(text: str) -> list[tuple[str, str, str, int]]:
    return [(o.shape, o.colour, o.size, o.cell) for o in parse_prompt(text).objects]


def test_expansion_is_a_dense_caption_of_a_scene_keeping_what_was_asked():
    out = expand_prompt("a red star above a blue ring", seed=3)
    assert out != "a red star above a blue ring" and out.startswith("Two shapes on ")
    objs = {(s, c): (size, cell) for s, c, size, cell in _cells(out)}
    assert set(objs) == {("star", "red"), ("ring", "blue")}
    assert all(size is not None and cell is not None for size, cell in objs.values())
    assert objs[("star", "red")][1] // 3 < objs[("ring", "blue")][1] // 3  # the star's row is above
    kept = expand_prompt("a large green square in the top left and a circle", seed=0)
    got = _cells(kept)
    assert ("square", "green", "large", 0) in got and len(got) == 2
    circle = next(o for o in got if o[0] == "circle")
    assert circle[1] is not None and circle[3] != 0  # a colour drawn for it, and a cell of its own


def test_expansion_is_seeded_and_varies_what_the_prompt_leaves_open():
    a = [expand_prompt("a pink triangle", seed=s) for s in range(12)]
    assert a == [expand_prompt("a pink triangle", seed=s) for s in range(12)]
    assert len({_cells(x)[0][3] for x in a}) >= 4  # the place is drawn, not always the centre
    assert {_cells(x)[0][1] for x in a} == {"pink"}


def test_bench_short_prompts_expand_to_scenes_that_score_perfectly_against_the_original():
    """The world's oracle draws each expanded caption exactly; read back, it must satisfy the short prompt."""
    items = [it for it in shapesbench.bench_items(80) if it.style == "short"]
    rng = np.random.default_rng(0)
    for k, it in enumerate(items):
        dense = expand_prompt(it.prompt, seed=k)
        assert dense != it.prompt
        image = render(shapesbench.scene_for_prompt(dense, rng), 128, 128)
        scores = shapesbench.score(shapesbench.detect(image), parse_prompt(it.prompt))
        assert scores["attribute"] == 1.0, (it.prompt, dense, scores)


@pytest.mark.parametrize("prompt", [
    "a red star on a plain blue background",  # names a background: the parser does not read it
    "a red star wearing a hat",  # words outside the world's vocabulary
    "five red stars",  # the parser would read a plural: two
    "many stars",
    "a big red star",  # in the vocabulary, but not a size the parser reads
    "a red star on the left",  # a place outside "in the ..."
    "a star of red colour",  # a colour not right before its shape
    "a red star next to a blue ring",
    "a red star above",  # a relation with nothing after it
    "three shapes: a red star and a blue ring",
    "",
    "a red star above a blue ring. the blue ring is above the red star",  # no placement satisfies both
    "a red star in the centre and a blue ring in the centre",  # two objects asked for one cell
    "a red star above 3 blue rings",  # a number the parser does not read: expanding would drop it
])
def test_prompts_expansion_could_change_are_left_as_they_are(prompt):
    assert not expandable(prompt) and expand_prompt(prompt, 0) == prompt


@pytest.mark.parametrize("prompt", [
    "a blue square", "a picture of two blue rings", "a red star to the left of a blue ring",
    "a large red star in the top left", "a red star. the red star is above a blue ring",
    "a small blue ring is below a red star, with a green cross",
])
def test_prompts_the_parser_reads_whole_are_expanded(prompt):
    assert expandable(prompt) and expand_prompt(prompt, 0) != prompt


def test_a_dense_caption_comes_back_unchanged():
    scene = shapesbench.bench_items(1)[0].scene
    assert expand_prompt(long_caption(scene), seed=5) == long_caption(scene)  # it names its background
