"""The one image loader at the edges: a pixel budget read from the header before decoding, every mode scaled into
the one asked for (16-bit never clipped), tiny inputs and outputs warned about; the CLI refuses with exit 2."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from bad_images import grey16_png, huge_paletted_png, rgb16_png
from PIL import Image

from pixsigma.control import canny
from pixsigma.edit import binary_mask
from pixsigma.image_load import MAX_PIXELS, ImageTooLarge, convert, from_array, load_image, open_checked, tiny_warning


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """A 48 KB paletted 20000×20000 PNG: PIL's own DecompressionBombError territory."""
    return huge_paletted_png(tmp_path_factory.mktemp("huge") / "huge.png")


def test_a_huge_image_is_refused_from_its_header_naming_parameter_size_and_limit(huge, tmp_path):
    assert huge.stat().st_size < 100_000
    with pytest.raises(ImageTooLarge, match=r"^--init-image is 400,000,000 pixels; at most 67,108,864 pixels, "
                                            r"e\.g\. 8192×8192 are accepted$"):
        load_image(huge, "--init-image")
    mid = huge_paletted_png(tmp_path / "mid.png", 3000)  # under PIL's bound: our budget names width × height
    with pytest.raises(ImageTooLarge, match=r"^mask is 3000×3000 \(9,000,000 pixels\); at most 4,000,000 pixels, "
                                            r"e\.g\. 2000×2000 are accepted$"):
        load_image(mid, "mask", "L", max_pixels=2000 * 2000)
    with open_checked(mid, "mask", MAX_PIXELS) as im:  # within the budget: opened, not yet decoded
        assert im.size == (3000, 3000) and im._im is None


def test_unreadable_and_truncated_files_are_refused_by_name(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"^control_image is not an image PIL can read \(UnidentifiedImageError\)"):
        load_image(tmp_path / "notes.png", "control_image")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="^init_image is not an image PIL can read"):
        load_image(tmp_path / "cut.png", "init_image")


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.tile(np.array([0, 16384, 32768, 65535], np.uint16), (8, 2))  # (8, 8)
    path = grey16_png(tmp_path / "g16.png", values)
    assert Image.open(path).mode == "I;16" and Image.open(path).convert("L").getextrema() == (0, 255)  # PIL clips
    rgb = np.asarray(load_image(path, "--init-image"))
    assert rgb.shape == (8, 8, 3) and rgb[0, :4, 0].tolist() == [0, 64, 128, 255]
    dark = grey16_png(tmp_path / "dark.png", np.full((4, 4), 200, np.uint16))  # 16-bit, however dark
    assert np.asarray(load_image(dark, "x", "L")).max() == 1


def test_a_16_bit_mask_repaints_only_its_white_half(tmp_path):
    values = np.full((16, 16), 16384, np.uint16)  # a quarter grey: keep
    values[:8] = 65535  # white: repaint
    path = grey16_png(tmp_path / "mask16.png", values)
    clipped, _ = binary_mask(Image.open(path).convert("L"), (16, 16))
    assert np.asarray(clipped).mean() == 255  # what PIL's convert alone gives: everything repainted
    mask, _ = binary_mask(load_image(path, "--mask", "L"), (16, 16))
    assert (np.asarray(mask) > 0).mean() == 0.5


def test_a_16_bit_control_image_keeps_its_edges(tmp_path):
    values = np.full((64, 64), 20000, np.uint16)
    values[:, 32:] = 50000  # both halves above 255: PIL's clip makes them one white
    path = grey16_png(tmp_path / "control16.png", values)
    assert np.asarray(canny(Image.open(path).convert("RGB"))).max() == 0  # the blank map of the report
    edges = np.asarray(canny(load_image(path, "--control")))
    assert edges.max() == 255 and edges[:, 28:36].max() == 255 and edges[:, :20].max() == 0


def test_16_bit_rgb_and_arrays_are_scaled(tmp_path):
    values = np.zeros((4, 4, 3), np.uint16)
    values[..., 0], values[..., 1], values[..., 2] = 65535, 32896, 257
    assert np.asarray(load_image(rgb16_png(tmp_path / "rgb16.png", values), "x"))[0, 0].tolist() == [255, 128, 1]
    assert np.asarray(from_array(values))[0, 0].tolist() == [255, 128, 1]
    assert np.asarray(from_array(np.full((2, 2), 0.5, np.float32))).tolist() == [[128, 128], [128, 128]]
    with pytest.raises(ValueError, match=r"must be \(H, W\) or \(H, W, 3\|4\), got shape \(2, 2, 2\)"):
        from_array(np.zeros((2, 2, 2), np.uint8))


def test_other_modes_convert_as_shown(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # transparent
    assert list(convert(rgba, "RGB").getdata()) == [(255, 0, 0), (255, 255, 255)]  # over white, as a page shows
    assert list(convert(rgba, "L").getdata())[1] == 0  # a mask's transparent pixel is not painted
    assert convert(rgba, "RGBA").getpixel((1, 0)) == (0, 0, 0, 0)  # the editor's layers keep their alpha
    la = Image.new("LA", (1, 1), (255, 0))
    assert convert(la, "RGB").getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert convert(cmyk, "RGB").getpixel((0, 0)) == (255, 0, 0)
    p = Image.new("P", (1, 1))
    p.putpalette([10, 20, 30] + [0] * 765)
    assert convert(p, "RGB").getpixel((0, 0)) == (10, 20, 30)
    f = Image.fromarray(np.full((1, 1), 0.25, np.float32))
    assert convert(f, "L").getpixel((0, 0)) == 64  # floats in 0..1
    i = Image.fromarray(np.full((1, 1), 65535, np.int32))
    assert convert(i, "L").getpixel((0, 0)) == 255  # 32-bit "I" with 16-bit levels


def test_tiny_inputs_are_warned_about():
    assert tiny_warning(Image.new("RGB", (1, 1)), "--init-image in.png") == (
        "--init-image in.png is only 1×1 px (under 64 px a side): it carries almost nothing to redraw or follow")
    assert tiny_warning(Image.new("RGB", (64, 64)), "x") is None


@pytest.mark.parametrize("option", ["--init-image", "--mask", "--control"])
def test_the_cli_refuses_a_huge_image_with_exit_2_before_any_model(huge, tmp_path, capsys, option):
    from pixsigma.cli import main

    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    extra = ["--init-image", str(tmp_path / "in.png")] if option == "--mask" else []
    argv = ["generate", "x", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o.png"), *extra,
            option, str(huge)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {huge} is 400,000,000 pixels; at most 67,108,864 pixels"), err
    assert "Traceback" not in err


def test_the_cli_warns_on_a_tiny_input_and_a_tiny_output(tmp_path, capsys, caplog):
    from pixsigma.cli import main

    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with caplog.at_level(logging.WARNING, logger="pixsigma"):
        assert main(["generate", "x", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o.png"),
                     "--init-image", str(tmp_path / "one.png"), "--width", "1", "--height", "1"]) == 2
    text = caplog.text
    assert f"--init-image {tmp_path / 'one.png'} is only 1×1 px (under 64 px a side)" in text
    assert "--width 1 and --height 1: under 64 px a side" in text
