"""The chain's evaluation protocol: intervals on fixed outcomes, paired changes, conditions, the plot's colours."""

from __future__ import annotations

import json

import pytest

from train.chainplot import draw_chain, ema, stage_colours
from train.protocol import (
    Protocol,
    bootstrap_interval,
    boundary,
    change_label,
    changed,
    conditions,
    format_summary,
    paired,
    paired_change,
    recovery,
    separated,
    with_interval,
)


def test_bootstrap_interval_of_fixed_outcomes_is_the_hand_computed_one():
    # 48 hits in 96 prompts: mean 0.5, standard error sqrt(0.25 / 96) = 0.051, so 95 % is 0.5 ± 0.100
    lo, hi = bootstrap_interval([1.0] * 48 + [0.0] * 48)
    assert lo == pytest.approx(0.40, abs=0.012) and hi == pytest.approx(0.60, abs=0.012)
    assert (lo, hi) == bootstrap_interval([1.0] * 48 + [0.0] * 48)  # the fixed seed: the same every time
    assert (lo, hi) != bootstrap_interval([1.0] * 48 + [0.0] * 48, seed=1)
    # 24 of 96: 0.25 ± 1.96 * sqrt(0.25 * 0.75 / 96) = 0.25 ± 0.087
    lo, hi = bootstrap_interval([1.0] * 24 + [0.0] * 72)
    assert lo == pytest.approx(0.163, abs=0.012) and hi == pytest.approx(0.337, abs=0.012)
    assert bootstrap_interval([0.75] * 10) == (0.75, 0.75)  # no spread, no interval width


def test_paired_change_says_when_a_change_is_within_noise():
    before = [0.0, 0.5, 1.0, 0.25] * 24
    same = paired_change(before, before)
    assert same == {"change": 0.0, "interval": [0.0, 0.0], "within_noise": True}
    up = paired_change(before, [v + 0.1 for v in before])  # every prompt up by 0.1: a real change
    assert up["change"] == pytest.approx(0.1) and up["interval"] == pytest.approx([0.1, 0.1])
    assert not up["within_noise"]
    # one prompt of 96 up by 1: +1 point on average, but it rests on a single prompt
    one = paired_change([0.0] * 96, [1.0] + [0.0] * 95)
    assert one["change"] == pytest.approx(1 / 96, abs=1e-4) and one["within_noise"]
    with pytest.raises(ValueError, match="same prompts on both sides, got 3 and 2 scores"):
        paired_change([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="values must be a non-empty list of finite per-prompt scores"):
        bootstrap_interval([])


def test_with_interval_and_separated():
    proto = Protocol("ShapesBench", 96, 8, "dpm-solver", 4.5, 0, 16, "shapes")
    low = with_interval({"attribute": 0.25, "n": 96, "per_prompt": [1.0] * 24 + [0.0] * 72}, proto)
    high = with_interval({"attribute": 0.75, "n": 96, "per_prompt": [1.0] * 72 + [0.0] * 24}, proto)
    near = with_interval({"attribute": 0.3, "n": 96, "per_prompt": [1.0] * 29 + [0.0] * 67}, proto)
    assert "per_prompt" not in low and low["interval"] == list(bootstrap_interval([1.0] * 24 + [0.0] * 72))
    assert separated(low, high) and not separated(low, near) and not separated(high, low)
    assert json.loads(json.dumps(proto.to_dict()))["interval"].startswith("95 % percentile bootstrap")
    with pytest.raises(ValueError, match="protocol n must be an integer >= 1, got 0"):
        Protocol("ShapesBench", 0, 8, "dpm-solver", 4.5, 0, 16, None)


def test_conditions_name_what_changed_between_two_points():
    a, b, c = conditions("alpha", 128), conditions("sigma", 128), conditions("sigma", 256)
    assert changed(a, b) == ["pipeline"] and changed(b, c) == ["resolution"] and changed(c, c) == []
    assert change_label(a, b) == "VAE alpha → sigma" and change_label(b, c) == "128 → 256 px"
    assert change_label(c, c) == "" and changed(c, conditions("sigma", 256, expand=True)) == ["expander"]
    fast = conditions("sigma", 256, sampling="lcm 4, guidance 1")  # the consistency stage's points
    assert changed(c, fast) == ["sampling"] and change_label(c, fast) == "sampling protocol → lcm 4, guidance 1"
    old = {k: v for k, v in c.items() if k != "sampling"}  # a chain.json point from before the key existed
    assert changed(old, c) == [] and changed(old, fast) == ["sampling"]


def _summary(tmp_path):
    stages = []
    for i, name in enumerate(["alpha", "sigma_vae", "sigma_resup", "sigma_kv"]):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 0.5 - 0.01 * s + 0.05 * (s % 2)} for s in range(1, 11)] if i else []
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        curve = [[0, v, v - 0.05, v + 0.05] for v in (0.3 + 0.1 * i, 0.35 + 0.1 * i)] if i else [[0, 0.3, 0.2, 0.4]]
        curve[-1][0] = 10 if i else 0
        st = {"name": name, "stage": "x", "steps": 10 if i else 0, "curve": curve, "run_dir": str(run)}
        if i:
            st["boundary"] = {"label": "VAE alpha → sigma", "before": {"attribute": 0.3}, "after": {"attribute": 0.4}}
        stages.append(st)
    return {"preset": "tiny", "protocol": {"n": 96}, "stages": stages}


def test_plot_draws_each_stage_in_one_colour_in_both_panels(tmp_path):
    import matplotlib.pyplot as plt

    summary = _summary(tmp_path)
    fig = draw_chain(summary)
    try:
        score, loss = fig.axes
        colours = stage_colours([s["name"] for s in summary["stages"]])
        assert len(set(colours.values())) == 4
        for name, colour in colours.items():
            seen = {ln.get_color() for ax in (score, loss) for ln in ax.lines if ln.get_gid() == name}
            assert seen == {colour}, name
            trained = name != "alpha"
            assert len([ln for ln in loss.lines if ln.get_gid() == name]) == (2 if trained else 0)  # raw and EMA
            if trained:
                raw, smooth = [ln for ln in loss.lines if ln.get_gid() == name]
                assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None  # raw faint, EMA bold
                assert list(smooth.get_ydata()) == pytest.approx(ema(list(raw.get_ydata())))
        bands = [c for c in score.collections if c.get_gid() == "sigma_kv"]
        assert bands  # the interval band and error bars
        assert len([ln for ln in score.lines if ln.get_linestyle() == "--"]) == 3  # the boundaries
    finally:
        plt.close(fig)
    assert ema([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no pull toward 0


def test_recovery_verdict_and_its_words():
    proto = Protocol("ShapesBench", 96, 8, "dpm-solver", 4.5, 0, 16, None)
    low, mid = [1.0] * 24 + [0.0] * 72, [1.0] * 48 + [0.0] * 48
    alpha = {"attribute": 0.25, "per_prompt": low, "conditions": conditions("alpha", 128)}
    start = {"attribute": 0.5, "per_prompt": mid, "conditions": conditions("sigma", 128)}
    end = {"attribute": 0.5 + 1 / 96, "per_prompt": [1.0] * 49 + [0.0] * 47, "conditions": conditions("sigma", 128)}
    stages = [{"name": "alpha", "steps": 0, "shapesbench": with_interval(alpha, proto)},
              {"name": "sigma_vae", "steps": 10, "start_shapesbench": with_interval(start, proto),
               "shapesbench": with_interval(end, proto), "training_change": paired(start, end, proto),
               "boundary": boundary(alpha, start, "", proto)}]
    rec = recovery(stages)
    assert rec["stages"][0]["within_noise"] and rec["stages"][0]["recovered"]  # +1 point on one prompt
    assert rec["final_vs_alpha"]["separated"] and rec["met"]
    assert rec["final_vs_alpha_sigma_side"]["alpha"] == 0.5 and not rec["final_vs_alpha_sigma_side"]["separated"]
    text = format_summary({"stages": stages, "recovery": rec, "protocol": {"n": 96}})
    assert "| VAE alpha → sigma: 25.0 [" in text and "+25.0 [" in text and ", real)" in text
    assert "sigma_vae      10 steps: 50.0 [" in text and "within noise)" in text
    assert "final vs α as shipped: 51.0 vs 25.0, margin +26.0, outside both intervals" in text
    assert text.splitlines()[-2:] == ["recovery criteria met", "(ShapesBench attribute %, n = 96, 95 % intervals)"]
    rec["final_vs_alpha_sigma_side"]["paired"] = paired(start, end, proto)  # as Chain.summary adds it
    assert "final vs α through VAE-Σ: 51.0 vs 50.0, margin +1.0, NOT outside both intervals; paired +1.0 [" in (
        format_summary({"stages": stages, "recovery": rec, "protocol": {"n": 96}}))
    worse = {**end, "attribute": 0.3, "per_prompt": [1.0] * 29 + [0.0] * 67}  # 19 prompts lost: a real drop
    stages[1].update(shapesbench=with_interval(worse, proto), training_change=paired(start, worse, proto))
    rec = recovery(stages)
    assert not rec["stages"][0]["recovered"] and not rec["final_vs_alpha"]["separated"] and not rec["met"]
