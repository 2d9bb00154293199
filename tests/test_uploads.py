"""The attacker's probes against the Train tab's data, kept as tests: a zip bomb (built here, small, over a lowered
budget), headers that lie, too many members, a bad CRC, a binary caption, a metadata.jsonl naming server files, a
huge image inside a zip, concurrent unpacks, the Data box pointed at the server; and the uploads' pruning."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zipfile
from pathlib import Path

import pytest
from bad_images import huge_paletted_png
from fixtures import make_images

import train.unzip
from pixsigma_ui.retention import Retention
from pixsigma_ui.uploads import UnpackGate, UploadLimits, Uploads
from train.data import Record
from train.unzip import ZipBudget, ZipRefused, copy_capped
from train.userdata import check_inside, read_user_data

TIGHT = ZipBudget(zip_mb=1, total_mb=4, member_mb=2, members=50)


def captioned_zip(path, tmp_path, n=2, extra=(), caption0=None):
    folder = make_images(tmp_path / f"src-{path.stem}", sizes=[(48, 48)] * n, long=False)
    if caption0 is not None:
        (folder / "img0.txt").write_bytes(caption0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
        for name, data in extra:
            z.writestr(name, data)
    return path


def bomb(path, mb=8, name="zeros.png"):
    """``mb`` MB of zeros deflated to a few KB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open(name, "w") as f:
        for _ in range(mb):
            f.write(bytes(1 << 20))
    return path


def left_behind(root):
    return sorted(p.name for p in root.rglob("*")) if root.exists() else []


def test_a_zip_bomb_is_refused_from_its_headers_and_leaves_nothing(tmp_path):
    archive = bomb(tmp_path / "bomb.zip", 8)
    assert archive.stat().st_size < 50_000
    with pytest.raises(ZipRefused, match=r"^user data bomb.zip: zeros.png inflates to 8.0 MB; at most 2 MB per file"):
        read_user_data(archive, tmp_path / "up", TIGHT)
    with pytest.raises(ZipRefused, match=r"^user data bomb.zip inflates to 8.0 MB; at most 4 MB in all"):
        read_user_data(archive, tmp_path / "up", ZipBudget(1, 4, 100, 50))
    assert left_behind(tmp_path / "up") == []


def test_the_budget_holds_while_streaming_whatever_the_headers_say(tmp_path, monkeypatch):
    monkeypatch.setattr(train.unzip, "check_headers", lambda archive, label, budget: archive.infolist())  # trusted
    archive = bomb(tmp_path / "bomb.zip", 8)
    with pytest.raises(ZipRefused, match=r"zeros.png inflates past 2 MB \(its header said less\)"):
        read_user_data(archive, tmp_path / "up", TIGHT)
    assert left_behind(tmp_path / "up") == []
    src, dst = io.BytesIO(bytes(5 << 20)), io.BytesIO()
    with pytest.raises(ZipRefused, match="inflates past 4 MB in all"):
        copy_capped(src, dst, "x", "m", 100 << 20, 4 << 20, TIGHT)
    assert dst.tell() <= 4 << 20 and src.tell() <= 5 << 20  # stopped at the limit, not read to the end


def test_a_zip_whose_headers_lie_is_refused_as_damaged(tmp_path):
    archive = bomb(tmp_path / "liar.zip", 3)
    data = bytearray(archive.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local and central headers: size 1000
        at = data.find(sig)
        data[at + offset: at + offset + 4] = struct.pack("<I", 1000)
    archive.write_bytes(bytes(data))
    with pytest.raises(ZipRefused, match=r"^user data liar.zip is damaged at zeros.png \(Bad CRC-32"):
        read_user_data(archive, tmp_path / "up", TIGHT)
    assert left_behind(tmp_path / "up") == []


def test_too_many_members_and_too_big_a_zip_are_refused(tmp_path, monkeypatch):
    many = captioned_zip(tmp_path / "many.zip", tmp_path, extra=[(f"n{i}.txt", "x") for i in range(60)])
    assert train.unzip.entry_count(many) == 64 and train.unzip.entry_count(tmp_path / "nope.zip") is None
    monkeypatch.setattr(zipfile, "ZipFile", None)  # refused from the end record: the directory is never parsed
    with pytest.raises(ZipRefused, match=r"^user data many.zip holds 64 entries; at most 50 are accepted"):
        read_user_data(many, tmp_path / "up", TIGHT)
    monkeypatch.undo()
    with pytest.raises(ZipRefused, match=r"^user data many.zip is 0.0 MB; at most 0.0001 MB per .zip"):
        read_user_data(many, tmp_path / "up", ZipBudget(zip_mb=0.0001))
    with pytest.raises(ValueError, match="zip budget members must be a finite number > 0, got 0"):
        ZipBudget(members=0)
    assert left_behind(tmp_path / "up") == []


def test_a_bad_crc_is_refused_in_our_words(tmp_path):
    archive = tmp_path / "crc.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.txt", "a red square " * 20)
    data = bytearray(archive.read_bytes())
    at = data.find(b"a red square")
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(ZipRefused, match=r"^user data crc.zip is damaged at a.txt \(Bad CRC-32 for file 'a.txt'\); "
                                         "zip it again$"):
        read_user_data(archive, tmp_path / "up", TIGHT)
    assert left_behind(tmp_path / "up") == []


def test_a_binary_caption_is_named_and_the_unpacked_folder_removed(tmp_path):
    archive = captioned_zip(tmp_path / "bin.zip", tmp_path, caption0=b"\xff\xfe\x00\x81 binary")
    with pytest.raises(ValueError, match=r"^bin-\w+/img0.txt: not UTF-8 text \(byte 0\); captions and .jsonl "
                                         "files must be UTF-8$"):  # the file, with no server path
        read_user_data(archive, tmp_path / "up", ZipBudget())
    assert left_behind(tmp_path / "up") == []


@pytest.mark.parametrize("entry", ["/etc/hostname.png", "../../x.png", "sub/../../x.png"])
def test_a_zips_metadata_may_name_only_its_own_files(tmp_path, entry):
    outside = tmp_path / "x.png"
    make_images(tmp_path / "o", sizes=[(48, 48)], long=False)
    (tmp_path / "o" / "img0.png").rename(outside)
    rows = [{"image": "img0.png", "caption": "ok"}, {"image": entry, "caption": "stolen"}]
    archive = captioned_zip(tmp_path / "meta.zip", tmp_path,
                            extra=[("metadata.jsonl", "\n".join(json.dumps(r) for r in rows))])
    with pytest.raises(ValueError, match=rf"metadata.jsonl names '{entry}', outside meta-\w+/: every image must be "
                                         r"a relative path inside the data's folder \(no absolute path, '..' or link"):
        read_user_data(archive, tmp_path / "up", ZipBudget())
    assert left_behind(tmp_path / "up") == []


def test_a_link_out_of_a_folder_is_refused_naming_the_entry(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (folder / "a.png").symlink_to(tmp_path / "secret.png")
    (folder / "b.png").write_bytes(b"x")
    check_inside([Record(folder / "b.png", "ok")], folder, "data")
    with pytest.raises(ValueError, match="^data names 'a.png', outside data/"):
        check_inside([Record(folder / "a.png", "x")], folder, "data")
    inner = folder / "c.png"
    inner.symlink_to(folder / "b.png")  # a link, even one that stays inside, is refused in an upload
    with pytest.raises(ValueError, match="names 'c.png'"):
        check_inside([Record(inner, "x")], folder, "data")
    check_inside([Record(inner, "x")], folder, "data", strict=False)  # an operator's folder: where it resolves


def test_a_huge_image_inside_a_zip_refuses_the_upload(tmp_path):
    huge = huge_paletted_png(tmp_path / "big.png")
    archive = captioned_zip(tmp_path / "huge.zip", tmp_path, extra=[("big.png", huge.read_bytes()),
                                                                   ("big.txt", "a black square")])
    with pytest.raises(ValueError, match=r"^user data huge-\w+: big.png is 400,000,000 pixels; at most 16,777,216 "
                                         "pixels"):
        read_user_data(archive, tmp_path / "up", ZipBudget(), max_pixels=4096 * 4096)
    assert left_behind(tmp_path / "up") == []


def test_an_upload_is_received_within_the_limits_and_gradios_copy_removed(tmp_path, monkeypatch):
    import gradio.utils

    monkeypatch.setattr(gradio.utils, "get_upload_folder", lambda: str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    uploads = Uploads(tmp_path / "runs", UploadLimits(upload_mb=1, unpacked_mb=4, member_mb=2, members=50))
    good = captioned_zip(tmp_path / "gradio" / "mine.zip", tmp_path)
    data = uploads.receive(good, "session-a")
    assert data.images == 2 and data.source.parent == tmp_path / "runs" / "uploads" and not good.exists()
    bad = bomb(tmp_path / "gradio" / "bomb.zip", 8)
    with pytest.raises(ZipRefused, match="zeros.png inflates to 8.0 MB; at most 2 MB per file"):
        uploads.receive(bad, "session-a")
    assert not bad.exists() and [p.name for p in uploads.folder.iterdir()] == [data.source.name]
    kept = captioned_zip(tmp_path / "elsewhere.zip", tmp_path)
    uploads.receive(kept, "session-a")
    assert kept.exists()  # not gradio's copy: never removed


def test_one_unpack_per_session_and_a_global_cap_under_concurrent_calls():
    gate, n = UnpackGate(2), 8
    barrier, release = threading.Barrier(n), threading.Event()
    results: list[str] = []

    def call(client):
        barrier.wait()
        try:
            with gate.hold(client):
                results.append("in")
                release.wait(5)
        except ValueError as e:
            results.append(str(e))

    def run_all(clients: list[str]) -> None:  # all at once behind the barrier; held until the refusals are in
        results.clear()
        release.clear()
        threads = [threading.Thread(target=call, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        time.sleep(0.3)
        release.set()
        for t in threads:
            t.join()

    run_all(["same"] * n)
    assert results.count("in") == 1
    assert results.count("your previous upload is still being unpacked: wait for it to finish") == n - 1
    run_all([f"client-{i}" for i in range(n)])
    assert results.count("in") == 2
    assert results.count("2 uploads are being unpacked right now (the server's limit): try again in a minute") == n - 2
    with gate.hold("same"):  # released after the refusals: free again
        pass


@pytest.mark.parametrize("text", ["/usr/share/doc", "/no/such/folder", "../../", "/", "/etc/passwd", "/proc/self/root"])
def test_the_data_box_reaches_only_the_runs_folder_and_says_nothing_of_elsewhere(tmp_path, text):
    uploads = Uploads(tmp_path / "runs")
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        uploads.confine(text)
    assert time.monotonic() - start < 1  # never scanned
    assert str(e.value) == (f"data {text!r} is not a folder this app reads: upload a .zip, or give a folder under "
                            "the runs folder or one the operator allows (--data-root)")


def test_the_data_box_takes_the_runs_folder_and_operator_roots_not_links_or_lists_out(tmp_path):
    runs = tmp_path / "runs"
    mine = make_images(runs / "uploads" / "set-1", sizes=[(48, 48)], long=False)
    shared = make_images(tmp_path / "shared", sizes=[(48, 48)], long=False)
    uploads = Uploads(runs, UploadLimits(data_roots=(tmp_path / "shared",)))
    assert uploads.confine(str(mine)) == str(mine.resolve())
    assert uploads.confine("uploads/set-1") == str(mine.resolve())  # relative: to the runs folder
    assert uploads.confine(str(shared)) == str(shared.resolve())
    with pytest.raises(ValueError, match=r"^data 'aaaa.*' does not exist"):  # too long a name: no server fault
        uploads.confine("a" * 5000)
    (runs / "link").symlink_to("/usr/share")
    with pytest.raises(ValueError, match="is not a folder this app reads"):
        uploads.confine(str(runs / "link"))
    (runs / "list.jsonl").write_text(json.dumps({"image": "/etc/hostname.png", "caption": "x"}))
    with pytest.raises(ValueError, match="names '/etc/hostname.png', outside runs/"):
        uploads.confine(str(runs / "list.jsonl"))
    (runs / "ok.jsonl").write_text(json.dumps({"image": str(shared / "img0.png"), "caption": "x"}))
    assert uploads.confine(str(runs / "ok.jsonl")) == str((runs / "ok.jsonl").resolve())


def test_uploads_are_pruned_by_age_and_size_never_one_a_live_run_reads(tmp_path):
    runs = tmp_path / "runs"
    uploads = Uploads(runs, UploadLimits(keep_mb=0.01))  # 10 KiB
    now = time.time()
    folders = []
    for i, age in enumerate([30 * 3600, 3 * 3600, 2 * 3600, 10, 4 * 3600]):
        f = runs / "uploads" / (f"u{i}" if i < 4 else ".u4.tmp")  # .u4.tmp: new_folder's, an unpack under way
        f.mkdir(parents=True)
        (f / "a.png").write_bytes(bytes(4096))
        os.utime(f, (now - age, now - age))
        folders.append(f)
    live = runs / "finetune-1"
    live.mkdir()
    (live / "launch.json").write_text(json.dumps({"pid": os.getpid(), "cmd": ["x", "--set",
                                                                               f"data.source={folders[0]}"]}))
    removed = uploads.prune(Retention(hours=24), now)
    assert removed == [folders[1], folders[2]]  # u0: a live run reads it; u3: being unpacked (too young)
    assert sorted(p.name for p in (runs / "uploads").iterdir()) == [".u4.tmp", "u0", "u3"]


def test_the_train_tabs_upload_event_refuses_in_its_own_words(tmp_path, monkeypatch):
    import gradio as gr
    import gradio.utils

    from pixsigma_ui.train_tab import RunManager, build_train_tab

    monkeypatch.setattr(gradio.utils, "get_upload_folder", lambda: str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    manager = RunManager(tmp_path / "runs", {}, uploads=Uploads(tmp_path / "runs", UploadLimits(member_mb=2)))
    with gr.Blocks() as demo:
        build_train_tab(demo, manager)
    on_upload = next(f.fn for f in demo.fns.values() if f.name == "on_upload")
    request = gr.Request(session_hash="s1")
    with pytest.raises(gr.Error) as e:
        on_upload(str(bomb(tmp_path / "gradio" / "bomb.zip", 8)), request)
    assert e.value.message == "user data bomb.zip: zeros.png inflates to 8.0 MB; at most 2 MB per file are accepted"
    folder = on_upload(str(captioned_zip(tmp_path / "gradio" / "ok.zip", tmp_path)), request)
    assert Path(folder).parent == (tmp_path / "runs" / "uploads").resolve()
    assert list((tmp_path / "gradio").iterdir()) == []  # gradio's copies removed, refused or not
