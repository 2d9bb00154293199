"""The shapes world: determinism, size limits, captions, prompt parsing, dataset files."""

import json

import numpy as np
import pytest

from shapes.world import (
    PALETTE,
    SHAPES,
    Background,
    ObjectSpec,
    Scene,
    SceneObject,
    caption_vocabulary,
    dataset_caption,
    long_caption,
    make_dataset,
    parse_prompt,
    render,
    sample_scene,
    scene_rng,
    short_caption,
    tokenize,
)


def test_same_seed_same_scene_pixels_and_captions():
    a, b = sample_scene(scene_rng("train", 3, 7)), sample_scene(scene_rng("train", 3, 7))
    assert a == b
    assert np.array_equal(np.asarray(render(a, 96, 160)), np.asarray(render(b, 96, 160)))
    assert long_caption(a) == long_caption(b) and short_caption(a) == short_caption(b)
    others = {long_caption(sample_scene(scene_rng("train", 3, i))) for i in range(20)}
    assert len(others) > 15  # different indices really differ


def test_seed_domains_are_disjoint():
    """No scene of one domain (same stream seed, same indices) appears in another: the bench never saw training."""
    scenes = {d: {repr(sample_scene(scene_rng(d, 0, i))) for i in range(200)} for d in ("train", "bench", "heldout")}
    assert [len(s) for s in scenes.values()] == [200, 200, 200]
    assert not (scenes["train"] & scenes["bench"] or scenes["train"] & scenes["heldout"]
                or scenes["bench"] & scenes["heldout"])


@pytest.mark.parametrize("size", [(63, 128), (128, 513), (64, 257), (300, 64), (128.0, 128)])
def test_out_of_range_sizes_are_refused(size):
    scene = sample_scene(0)
    with pytest.raises(ValueError, match=r"\[64, 512\] px with aspect ratio between 1:4 and 4:1"):
        render(scene, *size)


@pytest.mark.parametrize("size", [(64, 256), (512, 128), (64, 64), (512, 512), (100, 77)])
def test_accepted_sizes_render(size):
    img = render(sample_scene(1), *size)
    assert img.size == size and img.mode == "RGB"


def test_object_interiors_keep_exact_palette_colours():
    obj = SceneObject("square", "purple", "large", 4)
    img = np.asarray(render(Scene((obj,), Background(("cream",))), 128, 128))
    assert tuple(img[64, 64]) == PALETTE["purple"]
    assert tuple(img[2, 2]) == (245, 236, 210)


def test_bad_scene_values_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'; accepted: circle"):
        SceneObject("hexagon", "red", "small", 0)
    with pytest.raises(ValueError, match="distinct cells"):
        Scene((SceneObject("star", "red", "small", 0), SceneObject("ring", "blue", "small", 0)))
    with pytest.raises(ValueError, match="takes 2 colour"):
        Background(("white",), "vertical")


def test_long_caption_names_every_object_and_the_background():
    for i in range(30):
        scene = sample_scene(scene_rng("train", 0, i))
        text = long_caption(scene).lower()
        for o in scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in text
        for c in scene.background.colours:
            assert c in text
        assert set(text.replace(".", " . ").split()) <= set(caption_vocabulary())
    scene = Scene((SceneObject("star", "red", "small", 0), SceneObject("circle", "blue", "large", 8)))
    assert short_caption(scene) == "a red star and a blue circle"
    assert "The red star is above and left of the blue circle." in long_caption(scene)


def test_parse_long_caption_recovers_the_scene():
    for i in range(30):
        scene = sample_scene(scene_rng("train", 1, i))
        parsed = parse_prompt(long_caption(scene))
        assert parsed.objects == tuple(ObjectSpec(o.shape, o.colour, o.size, o.cell) for o in scene.objects)
        for a, rel, b in parsed.relations:
            oa, ob = scene.objects[a], scene.objects[b]
            assert rel in ("left of", "right of", "above", "below")
            assert {"left of": oa.col < ob.col, "right of": oa.col > ob.col,
                    "above": oa.row < ob.row, "below": oa.row > ob.row}[rel]


def test_parse_free_prompts():
    p = parse_prompt("Two blue rings and a small star to the left of a green circle")
    assert [o.shape for o in p.objects] == ["ring", "ring", "star", "circle"]
    assert p.objects[2] == ObjectSpec("star", None, "small", None)
    assert p.relations == ((2, "left of", 3),)
    assert parse_prompt("an orange cross in the top right").objects == (ObjectSpec("cross", "orange", None, 2),)
    assert parse_prompt("a dog on a sofa").objects == ()


def test_tokenize_keeps_what_the_parser_does_not_read_as_tokens_of_their_own():
    assert tokenize("A red star above 3 blue rings") == ["a", "red", "star", "above", "3", "blue", "rings"]
    assert tokenize("a ring-shaped café & a star!") == ["a", "ring", "-", "shaped", "caf", "é", "&", "a", "star", "!"]
    text = "Two rings, 2 stars; a 50% grey (ish) cross?"
    assert "".join(tokenize(text)) == "".join(text.lower().split())  # no character is dropped


def test_shapesbench_prompts_are_only_words_and_punctuation_the_parser_reads():
    from shapes.shapesbench import BENCH_SIZE, bench_items

    tokens = {t for item in bench_items(BENCH_SIZE) for t in tokenize(item.prompt)}
    assert tokens and all(t.isalpha() and t.isascii() or t in ".,;!?" for t in tokens)


def test_make_dataset_writes_png_txt_and_metadata(tmp_path):
    out = make_dataset(tmp_path / "ds", n=3, seed=5, sizes=[(64, 128), (128, 64)])
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for row in lines:
        assert (out / row["path"]).is_file()
        assert (out / row["path"]).with_suffix(".txt").read_text() == row["caption"]
        scene = Scene.from_dict(row["scene"])
        assert row["long_caption"] == long_caption(scene)
        assert (row["width"], row["height"]) in [(64, 128), (128, 64)]
    assert not list(out.glob(".*tmp"))
    assert set(SHAPES) <= set(caption_vocabulary())


def test_the_lora_data_speaks_of_tiny_and_huge_in_every_other_record(tmp_path):
    from shapes.lora_demo import make_data

    rows = [json.loads(x) for x in (make_data(tmp_path / "ds", 8) / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        world = long_caption(Scene.from_dict(row["scene"]))
        words = set(row["long_caption"].split())
        assert words.isdisjoint({"small", "large"}) if i % 2 == 0 else row["long_caption"] == world
        assert (row["long_caption"] != world) == (i % 2 == 0 and bool({"small", "large"} & set(world.split())))
        assert (tmp_path / "ds" / row["path"]).with_suffix(".txt").read_text() == row["caption"]


def test_complete_short_captions_name_every_object(tmp_path):
    obj = lambda shape, colour, size, cell: SceneObject(shape, colour, size, cell)  # noqa: E731
    two = Scene((obj("star", "red", "small", 0), obj("ring", "blue", "large", 8)))
    four = Scene((*two.objects, obj("circle", "green", "medium", 4), obj("cross", "pink", "small", 2)))
    # A 1-2 object scene's raw caption already names every object: kept in both styles.
    assert dataset_caption(two, "complete") == dataset_caption(two) == "a red star and a blue ring"
    # A fuller scene's raw caption names its two largest only; "complete" gives it the long caption.
    assert dataset_caption(four) == short_caption(four) == "a blue ring and a green circle"
    assert dataset_caption(four, "complete") == long_caption(four)
    with pytest.raises(ValueError, match="short caption style 'full'.*raw, complete"):
        dataset_caption(four, "full")
    with pytest.raises(ValueError, match="short caption style"):
        make_dataset(tmp_path / "bad", n=1, short="full")
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    out = make_dataset(tmp_path / "ds", n=24, seed=1, short="complete")
    for row in (json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()):
        scene = Scene.from_dict(row["scene"])
        assert (out / row["path"]).with_suffix(".txt").read_text() == row["caption"]
        named = len(parse_prompt(row["caption"]).objects)
        assert named == len(scene.objects), row["caption"]
