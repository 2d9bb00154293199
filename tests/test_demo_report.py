"""The build's report helpers: each Σ curve's step-0 model and the plateau measure."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fixtures import TINY_DIT, random_dit

from pixsigma.config import KVCompress
from pixsigma.demo.report import _stage_start, plateau_step
from pixsigma.weights import save_dit


def test_stage_start_is_the_previous_export_in_the_next_stages_model(tmp_path):
    prev = random_dit(TINY_DIT)
    save_dit(prev, tmp_path / "final")
    nxt = replace(TINY_DIT.at_resolution(2 * TINY_DIT.resolution), kv_compress=KVCompress(2, (1,)))
    net = _stage_start(tmp_path / "final", nxt)
    assert net.config == nxt
    sd, ref = net.state_dict(), prev.state_dict()
    new = sorted(set(sd) - set(ref))
    assert new and all(".attn.sr." in k or ".attn.norm." in k for k in new)  # only the KV layer's merge is new
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, msg=k)
    w = sd["blocks.1.attn.sr.weight"]  # depthwise R×R conv at the average init
    torch.testing.assert_close(w, torch.full_like(w, 0.25))


def test_stage_start_refuses_weights_that_do_not_fit(tmp_path):
    save_dit(random_dit(TINY_DIT), tmp_path / "final")
    with pytest.raises(ValueError, match="does not fit the next stage"):
        _stage_start(tmp_path / "final", replace(TINY_DIT, depth=3))


def test_plateau_step_is_the_first_checkpoint_near_the_best():
    pts = [(3000, 0.20), (3100, 0.50), (3200, 0.61), (3300, 0.62), (3400, 0.60)]
    assert plateau_step(pts, 3000) == 200  # 0.61 is within 0.02 of the best 0.62
    assert plateau_step(pts, 3000, tol=0.0) == 300
    assert plateau_step([], 0) is None
