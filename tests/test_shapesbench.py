"""ShapesBench reads real world images back near perfectly and noise/blank images near zero."""

import numpy as np
import pytest
from PIL import Image

from shapes.shapesbench import (
    BENCH_SIZE,
    bench_items,
    classify_shape,
    detect,
    evaluate,
    format_table,
    frechet_distance,
    oracle_generate_fn,
    score,
)
from shapes.world import Scene, SceneObject, parse_prompt, render, sample_scene, scene_rng


def _truth(width=128, height=128):
    scenes = {it.prompt: it.scene for it in bench_items()}
    return lambda prompts, seed: [render(scenes[p], width, height) for p in prompts]


def test_bench_is_fixed_and_mixes_styles():
    items = bench_items()
    assert len(items) == BENCH_SIZE >= 200
    assert items == bench_items()
    assert {it.style for it in items[:10]} == {"long", "short"}
    for it in items:
        assert len(parse_prompt(it.prompt).objects) == len(it.scene.objects)
    with pytest.raises(ValueError, match="n must be in 1..256"):
        bench_items(BENCH_SIZE + 1)


def test_detect_reads_every_object_of_a_real_scene():
    for i in range(20):
        scene = sample_scene(scene_rng("heldout", 9, i))
        got = {(d.colour, d.shape, d.size, d.cell) for d in detect(render(scene, 128, 128))}
        assert got == {(o.colour, o.shape, o.size, o.cell) for o in scene.objects}


def test_calibration_real_scenes_near_perfect_noise_and_blank_near_zero():
    real = evaluate(_truth(), n=50)
    assert real["attribute"] >= 0.95 and real["shape"] >= 0.95 and real["position"] >= 0.95
    oracle = evaluate(oracle_generate_fn(160, 96), n=50, width=160, height=96)
    assert oracle["attribute"] >= 0.95

    def noise(prompts, seed):
        rng = np.random.default_rng(seed)
        return [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in prompts]

    bad = evaluate(noise, n=24)
    # per number of asked objects: the bench holds 1-4 object scenes, each bucket the mean of its prompts
    assert set(real["attribute_by_objects"]) == {"1", "2", "3", "4"}
    rows = bad["per_prompt"]
    for k, v in bad["attribute_by_objects"].items():
        assert v == pytest.approx(np.mean([r["attribute"] for r in rows if r["objects"] == int(k)]))
    blank = evaluate(lambda prompts, seed: [Image.new("RGB", (128, 128), "white") for _ in prompts], n=24)
    assert bad["attribute"] <= 0.3 and blank["attribute"] <= 0.3
    # the failure breakdown: a blank image is "empty", a four-object scene has "extra" objects for a prompt that
    # asks for fewer, real scenes are neither
    assert blank["empty"] == 1.0 and real["empty"] == 0.0
    assert all(g["empty"] == 1.0 and g["extra"] == 0.0 for g in blank["by_group"].values())
    crowded = evaluate(lambda prompts, seed: [render(sample_scene(seed * 100 + i, n_objects=4), 128, 128)
                                              for i in range(len(prompts))], n=24)
    assert crowded["by_group"]["short/1"]["extra"] == 1.0 and crowded["by_group"]["short/2"]["extra"] == 1.0
    assert crowded["empty"] == 0.0 and all(g["extra"] == 0.0 for g in real["by_group"].values())
    groups = real["by_group"]
    assert set(groups) == {"long/1", "long/2", "long/3", "long/4", "short/1", "short/2"}  # short: 1-2 objects
    assert sum(g["n"] for g in groups.values()) == 50
    assert bad["fsd"] > 10 * max(real["fsd"], oracle["fsd"], 0.01)
    table = format_table({"real": real, "noise": bad})
    assert table.splitlines()[0].startswith("| model | attribute") and "| noise | " in table


def test_score_wrong_colour_and_place():
    img = render(Scene((SceneObject("star", "blue", "large", 0),)), 128, 128)
    s = score(detect(img), parse_prompt("A large red star in the bottom right."))
    assert s["count"] == 1.0 and s["shape"] == 1.0 and s["colour"] == 0.0 and s["position"] == 0.0
    assert s["attribute"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="names no shape"):
        score([], parse_prompt("a cat"))


def test_classify_and_frechet_basics():
    assert classify_shape(1.0, 1.0, 0.0, 1.0) == "square"
    assert classify_shape(0.78, 0.97, 0.25, 1.0) == "ring"
    assert classify_shape(0.5, 0.95, 0.0, 0.34) == "triangle"
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + 3.0) == pytest.approx(45.0, rel=1e-6)


def test_generate_fn_must_return_one_image_per_prompt():
    with pytest.raises(ValueError, match="returned 0 images for 4 prompts"):
        evaluate(lambda prompts, seed: [], n=4, batch_size=4)
