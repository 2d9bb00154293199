"""train.prepare: a stage's inputs resolved before it starts, made on demand, or refused with a message."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures import make_encoders, make_images, write_config

from pixsigma.config import PRESETS
from pixsigma.model.dit import PixArtDiT
from pixsigma.weights import save_dit
from train.prepare import REPO, check_stage, make_inputs, prepare_stage

CONFIGS = REPO / "configs"


def test_unreadable_or_missing_config_is_refused(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ValueError, match=f"^config {missing} does not exist$"):
        check_stage(missing, tmp_path / "runs")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ValueError, match=f"^config {bad} cannot be read: ParserError"):
        check_stage(bad, tmp_path / "runs")


def test_missing_user_data_and_weights_are_refused_by_name(tmp_path):
    cfg = CONFIGS / "shapes_sigma_polish.yaml"
    with pytest.raises(ValueError, match="^data.source /no/such/images does not exist: give an image folder with "
                                         ".txt captions, a .jsonl or a .zip$"):
        check_stage(cfg, tmp_path, ["data.source=/no/such/images"])
    with pytest.raises(ValueError, match="^stage.load_from /no/such/run does not exist: give a run folder, an "
                                         "exported model folder or a weights file$"):
        check_stage(cfg, tmp_path, ["stage.load_from=/no/such/run"])
    with pytest.raises(ValueError, match="^data.vae /no/vae does not exist: give a pipeline folder holding vae/$"):
        check_stage(cfg, tmp_path, ["data.vae=/no/vae"])


def test_user_data_without_captions_is_refused(tmp_path):
    folder = make_images(tmp_path / "imgs", sizes=[(48, 48)] * 2, long=False)
    for f in folder.glob("*.txt"):
        f.unlink()
    with pytest.raises(ValueError, match=rf"^user data {folder}: no captions found \(2 images"):
        check_stage(CONFIGS / "shapes_sigma_polish.yaml", tmp_path / "runs", [f"data.source={folder}"])


def test_fresh_runs_folder_starts_from_the_shipped_models_and_plans_what_to_make(tmp_path):
    runs = tmp_path / "runs"
    st = check_stage(CONFIGS / "shapes_sigma_polish.yaml", runs)  # the app's failing default: runs/…polish absent
    assert (st.start, st.load_from) == ("shipped sigma", REPO / "assets" / "demo" / "sigma" / "transformer")
    assert st.run_dir == runs / "shapes_sigma_polish" and st.to_make == ("data", "features")
    assert st.data == runs / "data" / "shapes" and st.cache.parent == runs / "cache"
    assert (st.finished, st.resume) == (False, False)
    assert not runs.exists()  # checking writes nothing
    vae = check_stage("shapes_sigma_resup.yaml", runs)  # a bare name is looked up in configs/
    # shipped α is in diffusers layout: a pixsigma copy (its pipeline's prediction type) is made in the runs folder
    assert (vae.start, vae.load_from, vae.to_make) == ("shipped alpha", runs / "shipped" / "alpha",
                                                      ("data", "features", "weights"))
    assert vae.config.stage.load_from == str(runs / "shipped" / "alpha")


def test_previous_run_is_preferred_to_the_shipped_model(tmp_path):
    runs = tmp_path / "runs"
    save_dit(PixArtDiT(PRESETS["demo"]), runs / "shapes_sigma_vae" / "final")
    st = check_stage(CONFIGS / "shapes_sigma_resup.yaml", runs)
    assert (st.start, st.load_from) == ("previous run", runs / "shapes_sigma_vae")
    scratch = check_stage(CONFIGS / "shapes_alpha.yaml", runs)
    assert (scratch.start, scratch.load_from) == ("scratch", None)


def test_prepare_makes_features_with_progress_and_is_idempotent(tmp_path):
    enc = make_encoders(tmp_path / "enc")
    imgs = make_images(tmp_path / "imgs")
    (imgs / "img7.png").write_bytes(b"broken")
    cfg = write_config(tmp_path / "c.yaml", stage={"name": "from_scratch"}, output_dir="runs/mine",
                       data={"source": str(imgs), "cache": "cache/mine", "text_encoder": str(enc), "vae": str(enc)})
    events = []
    st = prepare_stage(cfg, tmp_path / "runs", progress=events.append)
    assert st.run_dir == tmp_path / "runs" / "mine" and st.to_make == ()
    assert st.data_report["images"] == 7 and st.data_report["skipped_images"] == 1
    feats = [e for e in events if e.phase == "features"]
    assert feats[-1].done == feats[-1].total == 7 and feats[-1].rate > 0
    assert (st.cache / "index.json").is_file() and Path(st.data).is_file()
    again = check_stage(cfg, tmp_path / "runs")
    assert again.to_make == () and again.cache == st.cache


def test_the_apps_finetune_default_resolves_on_a_fresh_clone(tmp_path):
    """The Train tab's finetune of the loaded model on the shapes world: nothing needs to exist beforehand."""
    st = check_stage(CONFIGS / "_shapes_base.yaml", tmp_path / "runs",
                     ["stage.name=finetune", "stage.load_from=assets/demo/sigma", f"output_dir={tmp_path / 'ft'}"])
    assert (st.start, st.load_from) == ("given", REPO / "assets" / "demo" / "sigma")
    assert st.run_dir == tmp_path / "ft" and st.to_make == ("data", "features")
    assert st.config.data.cache == str(st.cache) and st.cache.name.startswith("shapes-")


def test_a_set_data_source_makes_that_sources_world_data(tmp_path):
    """``--set data.source=data/shapes_complete`` on a config naming data/shapes makes complete-caption data."""
    sets = ["stage.load_from=assets/demo/sigma", f"output_dir={tmp_path / 'ft'}",
            "data.source=data/shapes_complete", "data.max_images=24"]
    st = check_stage(CONFIGS / "_shapes_base.yaml", tmp_path / "runs", sets)
    assert st.data == tmp_path / "runs" / "data" / "shapes_complete" and "data" in st.to_make
    make_inputs(replace(st, to_make=("data",)), tmp_path / "runs")
    rows = [json.loads(line) for line in (st.data / "metadata.jsonl").read_text().splitlines()]
    full = [r for r in rows if len(r["scene"]["objects"]) >= 3]
    assert len(rows) == 24 and full and all(r["caption"] == r["long_caption"] for r in full)  # both slots long
