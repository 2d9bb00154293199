"""A user's own data for the finetune stage: counted, cleaned, or refused with a message saying why."""

from __future__ import annotations

import json
import zipfile

import pytest
from fixtures import make_images

from train.data import read_records
from train.userdata import read_user_data, unpack_zip, write_clean_jsonl


def _broken_folder(tmp_path):
    folder = make_images(tmp_path / "imgs", sizes=[(48, 48)] * 4, long=False)
    (folder / "img3.png").write_bytes(b"not a png at all")  # unreadable, with a caption
    data = (folder / "img2.png").read_bytes()
    (folder / "img2.png").write_bytes(data[: len(data) // 2])  # truncated pixel data, with a caption
    (folder / "img1.txt").unlink()  # readable, no caption
    return folder


def test_folder_counts_unreadable_and_uncaptioned_images(tmp_path):
    data = read_user_data(_broken_folder(tmp_path))
    assert (data.kind, data.images, data.skipped_images, data.missing_captions) == ("folder", 1, 2, 1)
    assert [r.caption for r in data.records] == ["a red square"]
    assert data.summary() == "1 captioned images (2 unreadable skipped, 1 without a caption)"


def test_clean_list_holds_only_usable_images_and_the_trainer_reads_it(tmp_path):
    data = read_user_data(_broken_folder(tmp_path))
    out = write_clean_jsonl(data, tmp_path / "clean.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"path": str((tmp_path / "imgs" / "img0.png").resolve()), "caption": "a red square"}]
    assert [r.caption for r in read_records(out)] == ["a red square"]


def test_jsonl_with_image_and_caption_keys(tmp_path):
    folder = make_images(tmp_path / "imgs", sizes=[(48, 48)] * 2, long=False)
    rows = [{"image": "imgs/img0.png", "caption": "a red square"}, {"image": "imgs/missing.png", "caption": "x"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = read_user_data(path)
    assert (data.kind, data.images, data.skipped_images) == ("jsonl", 1, 1)
    assert data.records[0].path == folder / "img0.png"


def test_zip_is_unpacked_once_and_read(tmp_path):
    folder = make_images(tmp_path / "imgs", sizes=[(48, 48)] * 3, long=False)
    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"set/{f.name}")
        z.writestr("../evil.txt", "outside")  # never written outside the unpack folder
    data = read_user_data(archive, tmp_path / "unpacked")
    assert (data.kind, data.images) == ("zip", 3)
    assert data.source.parent == tmp_path / "unpacked"
    assert not (tmp_path / "evil.txt").exists()
    assert unpack_zip(archive, tmp_path / "unpacked") == data.source  # reused, not unpacked again


def test_refusals_name_the_problem(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"^user data {missing} does not exist: give an image folder"):
        read_user_data(missing)
    folder = make_images(tmp_path / "bare", sizes=[(48, 48)] * 2, long=False)
    for f in folder.glob("*.txt"):
        f.unlink()
    with pytest.raises(ValueError, match=rf"^user data {folder}: no captions found \(2 images, none with a caption\)"):
        read_user_data(folder)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK but not really")
    with pytest.raises(ValueError, match="^user data bad.zip is not a readable .zip"):  # no server path
        read_user_data(bad)
    other = tmp_path / "notes.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="is a .csv file; accepted: a folder, a .jsonl or a .zip"):
        read_user_data(other)
