"""Aspect-ratio buckets: equal to the tables diffusers' pipelines bin with; snapping."""

import pytest

from pixsigma.buckets import bucket_table, check_size, nearest_bucket


@pytest.mark.parametrize("res,name", [(256, "ASPECT_RATIO_256_BIN"), (512, "ASPECT_RATIO_512_BIN"),
                                      (1024, "ASPECT_RATIO_1024_BIN"), (2048, "ASPECT_RATIO_2048_BIN")])
def test_tables_equal_diffusers(res, name):
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha, pipeline_pixart_sigma

    ref = getattr(pipeline_pixart_sigma, name, None) or getattr(pipeline_pixart_alpha, name)
    assert bucket_table(res) == {float(k): (int(h), int(w)) for k, (h, w) in ref.items()}


def test_4096_table_is_2048_doubled():
    t2, t4 = bucket_table(2048), bucket_table(4096)
    assert t4 == {r: (2 * h, 2 * w) for r, (h, w) in t2.items()}
    assert t4[1.0] == (4096, 4096) and t4[0.25] == (2048, 8192)


@pytest.mark.parametrize("res", [128, 256, 384, 1536, 3072])
def test_every_bucket_is_a_valid_size(res):
    table = bucket_table(res)
    assert table[1.0] == (res, res)  # the square bucket is the base size
    for r, (h, w) in table.items():
        assert h % 16 == 0 and w % 16 == 0 and abs(h / w - r) < 0.011


@pytest.mark.parametrize("h,w,res,expect", [(1024, 1024, 1024, (1024, 1024)), (720, 1280, 1024, (768, 1344)),
                                            (3000, 1000, 2048, (3456, 1152)), (100, 400, 256, (128, 512))])
def test_nearest_bucket(h, w, res, expect):
    assert nearest_bucket(h, w, res) == expect


def test_errors_name_accepted_range():
    with pytest.raises(ValueError, match=r"base resolution must be an integer in \[64, 4096\]"):
        bucket_table(8192)
    with pytest.raises(ValueError, match="must be positive"):
        nearest_bucket(0, 10, 1024)
    with pytest.raises(ValueError, match="height 1000 is not accepted without binning: use a multiple of 16"):
        check_size(1000, 1024)
