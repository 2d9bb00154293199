"""The controlnet stage of the shared loop: only the ControlNet trains, the feature cache holds control latents,
the export loads as a ControlNet of the base, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from fixtures import TINY_DIT, make_encoders, make_images, random_dit, write_config

from pixsigma.controlnet_weights import load_controlnet
from pixsigma.weights import load_dit, save_dit
from train.cache import FeatureCache
from train.config import load_config
from train.extract import extract
from train.loop import train
from train.stages import ControlNetStage, Stage


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    base = random_dit(TINY_DIT.__class__(**{**TINY_DIT.to_dict(), "sample_size": 8, "depth": 3,
                                             "kv_compress": {"ratio": 1, "layers": []}}))
    save_dit(base, root / "base")
    return {"root": root, "enc": make_encoders(root / "enc"), "imgs": make_images(root / "imgs"),
            "base": root / "base"}


def _config(world, name: str, **over):
    stage = {"name": "controlnet", "load_from": str(world["base"]),
             "controlnet": {"control_type": "canny", "copies": 2, "proj_lr": 1e-2}}
    return write_config(world["root"] / f"{name}.yaml", output_dir=str(world["root"] / name), stage=stage,
                        **over)


def test_controlnet_stage_trains_only_the_controlnet_from_a_cache(world):
    root, enc = world["root"], world["enc"]
    data = {"source": str(world["imgs"]), "cache": str(root / "cache"), "text_encoder": str(enc), "vae": str(enc)}
    cfg = load_config(_config(world, "run", data=data, steps=3))
    extract(cfg)
    cache = FeatureCache(root / "cache")
    assert cache.index["control"] == "canny"
    item = cache[0]
    assert item["control"].shape == item["mean"].shape and item["control"].dtype == torch.float16
    before = load_dit(world["base"]).state_dict()
    res = train(cfg)
    assert res["state"] == "finished" and set(res["exports"]) == {"final"}
    base = load_dit(world["base"])
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the base file is untouched
    net = load_controlnet(root / "run" / "final", base)
    assert net.config.num_copies == 2
    # the projections left zero, the copies left the base blocks: only the ControlNet trained
    assert float(net.controlnet[0].after_proj.weight.abs().sum()) > 0
    assert float(net.controlnet[0].before_proj.weight.abs().sum()) > 0
    changed = [k for k, v in net.state_dict().items() if "copied_block" in k
               and not torch.equal(v, before["blocks." + k.split(".", 3)[1] + "." + k.split(".", 3)[3]])]
    assert changed
    with pytest.raises(ValueError, match="holds control latents of type canny, this run needs 'regions'"):
        train(load_config(_config(world, "wrong", data=data), ["stage.controlnet.control_type=regions"]))


def test_controlnet_stage_online_with_regions(world):
    enc = world["enc"]
    data = {"source": str(world["imgs"]), "text_encoder": str(enc), "vae": str(enc)}
    cfg = load_config(_config(world, "online", data=data, steps=1), ["stage.controlnet.control_type=regions"])
    assert train(cfg)["state"] == "finished"
    assert load_controlnet(world["root"] / "online" / "final", load_dit(world["base"])).config.num_copies == 2


def test_bad_controlnet_stage_settings():
    with pytest.raises(ValueError, match=r"must be one of \('canny', 'canny-thick', 'regions'\), got 'raw'"):
        ControlNetStage(control_type="raw")
    with pytest.raises(ValueError, match="stage.controlnet.copies must be a positive integer or null, got 0"):
        ControlNetStage(copies=0)
    with pytest.raises(ValueError, match="stage.controlnet is only used by the controlnet stage, not 'finetune'"):
        Stage("finetune", load_from="x", controlnet={"copies": 2})
    assert Stage("controlnet", load_from="x").controlnet == ControlNetStage()
