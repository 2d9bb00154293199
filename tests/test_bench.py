"""The benchmark suite (bench/) and the speed options (pixsigma/speed.py), on a CPU with tiny models."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.__main__ import main
from bench.flops import dit_step_flops, token_grid
from bench.measure import NotMeasured, check_device, time_calls, time_wall
from bench.models import (
    build_peer,
    build_pixsigma,
    dit_config,
    dit_inputs,
    random_dit_weights,
    run_peer,
    run_pixsigma,
)
from bench.plan import BenchSettings
from bench.report import render, save
from bench.run import targets
from pixsigma.config import PRESETS, DiTConfig, KVCompress
from pixsigma.model.dit import PixArtDiT
from pixsigma.speed import MODES, cfg_interval, chosen_backends, optimize, speed_mode

CPU = torch.device("cpu")


@pytest.fixture
def threads():
    """main() sets the CPU thread count (the issue's 2 cores); give the test process its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# -- FLOPs -------------------------------------------------------------------------------------------------


def test_flops_hand_count_tiny_kv():
    # tiny: depth 2, D 32, 2 heads, C_text 16, L 16, p 2, C_out 8, MLP 128; R = 2 on block 1.
    cfg = PRESETS["tiny"].with_kv(KVCompress(2, (1,)))
    f = dit_step_flops(cfg, 64, 64, batch=1)  # 64 px -> 8×8 latent -> 4×4 = 16 tokens; block 1 keeps 2×2 = 4
    n, m, d, lt = 16, 4, 32, 16
    expect = {
        "patch_embed": 2 * n * (4 * 2 * 2) * d,  # 16384
        "adaln": 2 * (256 * d + d * d) + 2 * d * 6 * d,  # 30720
        "caption_embed": 2 * lt * (16 * d + d * d),  # 49152
        "self_attn_proj": 2 * (2 * n * d * 3 * d + 2 * n * d * d),  # 262144
        "kv_compress": 2 * (2 * m * d * 2 * 2),  # 2048: depthwise 2×2 conv on k and v, block 1 only
        "self_attn_matmul": 4 * n * n * d + 4 * n * m * d,  # 32768 + 8192
        "cross_attn": 2 * (2 * n * d * d + 2 * lt * d * 2 * d + 4 * n * lt * d + 2 * n * d * d),  # 327680
        "mlp": 2 * (2 * 2 * n * d * 128),  # 524288
        "final_layer": 2 * n * d * (2 * 2 * 8),  # 32768
    }
    assert f.parts == expect
    assert f.total == 1_286_144 and f.tokens == 16
    assert dit_step_flops(cfg, 64, 64, batch=2).total == 2 * 1_286_144


@pytest.mark.parametrize("cfg, size", [
    (PRESETS["tiny"], (64, 64)),
    (PRESETS["tiny"].with_kv(KVCompress(2, (1,))), (48, 80)),  # 3×5 grid: R = 2 pads to 2×3 keys
    (DiTConfig(depth=2, hidden_size=48, num_heads=2, caption_channels=16, max_tokens=7, sample_size=8,
               micro_condition=True, kv_compress=KVCompress(3, (0,))), (48, 80)),
])
def test_flops_match_torch_flop_counter(cfg, size):
    model = PixArtDiT(cfg).eval()
    h, w = size
    x, y = torch.randn(2, 4, h // 8, w // 8), torch.randn(2, cfg.max_tokens, cfg.caption_channels)
    extra = {"resolution": torch.ones(2, 2), "aspect_ratio": torch.ones(2, 1)} if cfg.micro_condition else {}
    # The math backend runs attention as matmuls, which the counter sees (it skips the fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.tensor([1, 2]), y, torch.ones(2, cfg.max_tokens), **extra)
    assert counter.get_total_flops() == dit_step_flops(cfg, h, w, batch=2).total


def test_flops_kv_compression_quarters_attention_of_compressed_layers():
    full, kv = dit_config("xl", 4096), dit_config("xl", 4096, kv=True)
    a, b = dit_step_flops(full, 4096, 4096).parts, dit_step_flops(kv, 4096, 4096).parts
    assert b["self_attn_matmul"] * 8 == a["self_attn_matmul"] * 5  # 14 full + 14 quartered layers of 28
    assert a["mlp"] == b["mlp"] and a["cross_attn"] == b["cross_attn"]


def test_flops_reject_size_off_the_grid():
    with pytest.raises(ValueError, match="1000x1000 is not a multiple of 16 px"):
        token_grid(PRESETS["XL_2_1024"], 1000, 1000)


# -- measurement helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("timer", [time_calls, time_wall])
def test_timers_run_warmup_and_repeats_and_refuse_bad_counts_before_any_call(timer):
    calls = []
    timing = timer(lambda: calls.append(1), CPU, warmup=2, repeats=3)
    assert len(calls) == 5 and (timing.warmup, timing.repeats) == (2, 3)
    assert timing.min_s <= timing.median_s <= timing.max_s
    for warmup, repeats in ((1, 0), (-1, 2)):
        with pytest.raises(ValueError, match=f"got repeats={repeats}, warmup={warmup}"):
            timer(lambda: calls.append(1), CPU, warmup=warmup, repeats=repeats)
    assert len(calls) == 5


def test_check_device_refuses_unusable_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NotMeasured, match="CUDA is not available"):
        check_device("cuda")
    with pytest.raises(NotMeasured, match="accepted: cpu, cuda"):
        check_device("mps")
    assert check_device("cpu") == CPU


def test_settings_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        BenchSettings(sizes=(1000,))
    with pytest.raises(ValueError, match="unknown speed mode"):
        BenchSettings(modes=("turbo",))
    with pytest.raises(ValueError, match="parts must be"):
        BenchSettings(parts=("everything",))


def test_peer_and_pixsigma_share_weights():
    cfg = dit_config("tiny", 64)
    w = random_dit_weights(cfg, CPU)
    ours, peer = build_pixsigma(cfg, w, CPU, torch.float32), build_peer(cfg, w, CPU, torch.float32)
    kv = build_pixsigma(dit_config("tiny", 64, kv=True), w, CPU, torch.float32)
    inputs = dit_inputs(cfg, 64, 2, CPU, torch.float32)
    with torch.no_grad():
        a, b, c = run_pixsigma(ours, inputs), run_peer(peer, inputs), run_pixsigma(kv, inputs)
    assert a.abs().max() > 0.05  # random weights everywhere: a real signal
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() > 1e-4  # KV compression changes the output
    assert torch.equal(kv.blocks[0].attn.qkv.weight, ours.blocks[0].attn.qkv.weight)


# -- speed options -----------------------------------------------------------------------------------------


def test_optimize_modes_keep_output_and_weights():
    cfg = dit_config("tiny", 64, kv=True)
    model = build_pixsigma(cfg, random_dit_weights(cfg, CPU), CPU, torch.float32)
    inputs = dit_inputs(cfg, 64, 2, CPU, torch.float32)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = run_pixsigma(model, inputs)
        assert optimize(model, "sdpa") is model and speed_mode(model) == "sdpa"
        assert torch.allclose(run_pixsigma(model, inputs), ref, atol=1e-6)
        assert list(chosen_backends(model).values())[0] in ("FLASH_ATTENTION", "MATH")
        optimize(model, "eager")
        assert speed_mode(model) == "eager" and "forward" not in model.__dict__ and chosen_backends(model) == {}
        assert torch.equal(run_pixsigma(model, inputs), ref)
    assert list(model.state_dict()) == keys


def test_optimize_rejects_unknown_mode():
    model = PixArtDiT(PRESETS["tiny"])
    with pytest.raises(ValueError, match="accepted: " + ", ".join(MODES)):
        optimize(model, "fast")
    with pytest.raises(TypeError, match="PixArtDiT"):
        optimize(torch.nn.Linear(2, 2), "sdpa")


def test_cfg_interval_skips_unconditional_half_outside_interval():
    seen = []

    def dit(x, t, y, mask=None):
        seen.append(x.shape[0])
        return x * 2 + y.mean()

    fn = cfg_interval(dit, 200, 700)
    x = torch.arange(4.0).reshape(2, 2)  # [uncond; cond]
    y = torch.tensor([[0.0], [10.0]])
    inside = fn(x, torch.full((2,), 500.0), y, torch.ones(2, 1))
    assert seen == [2] and torch.equal(inside, dit(x, None, y))
    seen.clear()
    outside = fn(x, torch.full((2,), 900.0), y, torch.ones(2, 1))
    assert seen == [1]  # half the work
    assert torch.equal(outside[0], outside[1]) and torch.equal(outside[1], x[1] * 2 + 10)
    guided = outside[0] + 4.5 * (outside[1] - outside[0])
    assert torch.equal(guided, outside[1])  # unguided step: CFG of equal halves is the conditional output
    with pytest.raises(ValueError, match="even size"):
        fn(x[:1], torch.full((1,), 900.0), y[:1])
    with pytest.raises(ValueError, match="t_low <= t_high"):
        cfg_interval(dit, 800, 100)


# -- the bench end to end ----------------------------------------------------------------------------------

QUICK = ["--quick", "--device", "cpu", "--sizes", "64", "--steps", "2", "--threads", "1"]


def test_quick_bench_writes_json_and_markdown(tmp_path, threads):
    assert main([*QUICK, "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"]["cpu-quick"]
    assert run["failures"] == [] and run["environment"]["torch"] == torch.__version__
    dit = run["dit"]
    assert [(r["impl"], r["kv"], r["mode"]) for r in dit] == [
        ("diffusers", "off", "eager"), ("pixsigma", "off", "eager"), ("pixsigma", "off", "sdpa"),
        ("pixsigma", "R=2 on 1–1", "eager"), ("pixsigma", "R=2 on 1–1", "sdpa")]
    assert all(r["status"] == "ok" and r["timing"]["median_s"] > 0 for r in dit)
    assert dit[1]["flops"] == dit_step_flops(dit_config("tiny", 64), 64, 64).total
    assert dit[3]["flops"] == dit_step_flops(dit_config("tiny", 64, kv=True), 64, 64).total
    assert dit[1]["speedup"] == pytest.approx(dit[0]["timing"]["median_s"] / dit[1]["timing"]["median_s"])
    same = next(r for r in run["equality"] if r["b"] == "diffusers")
    assert same["max_abs_diff"] <= 1e-5 and same["max_abs_ref"] > 0.05
    assert [r["status"] for r in run["e2e"]] == ["ok"] and run["e2e"][0]["generated_size"] == [64, 64]
    assert [r["status"] for r in run["guidance_interval"]] == ["ok", "ok"]
    md = (tmp_path / "results.md").read_text()
    assert "QUICK RUN" in md and torch.__version__ in md and "| 64 | diffusers | off | eager |" in md


def test_unavailable_device_fails_without_writing(tmp_path, monkeypatch, capsys, threads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 1
    assert list(tmp_path.iterdir()) == []
    assert "CUDA is not available" in capsys.readouterr().err


def test_failed_measurement_is_loud(tmp_path, monkeypatch, capsys, threads):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr("bench.dit.build_peer", oom)
    strict, partial = tmp_path / "strict", tmp_path / "partial"
    assert main([*QUICK, "--parts", "dit", "--out", str(strict)]) == 1
    assert not strict.exists()
    assert "64px diffusers: not measured: out of memory" in capsys.readouterr().err
    assert main([*QUICK, "--parts", "dit", "--allow-partial", "--out", str(partial)]) == 0
    run = json.loads((partial / "results.json").read_text())["runs"]["cpu-quick-dit"]
    peer = run["dit"][0]
    assert peer["status"] == "not measured" and "out of memory" in peer["reason"] and "timing" not in peer
    assert all(r["speedup"] is None for r in run["dit"][1:])  # no ratio against a number never measured
    assert "| 64 | diffusers | off | eager | not measured: out of memory" in (partial / "results.md").read_text()


def test_cpu_run_labels_the_fallback_when_demo_is_missing(tmp_path, monkeypatch, threads):
    def missing(*args, **kwargs):
        raise FileNotFoundError("demo model 'demo' is missing")

    monkeypatch.setattr("bench.e2e.PixSigmaPipeline.from_pretrained", missing)
    args = ["--device", "cpu", "--sizes", "64", "--steps", "1", "--threads", "1", "--parts", "e2e"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"]["cpu-e2e"]
    assert run["e2e"][0]["pipeline"].startswith("FALLBACK") and "not the demo" in run["e2e"][0]["pipeline"]
    assert any(n.startswith("FALLBACK") for n in run["notes"])
    assert "FALLBACK random pipeline" in (tmp_path / "results.md").read_text()


def test_cpu_run_uses_the_demo_when_present(tmp_path, monkeypatch, tiny_pipeline, threads):
    from pixsigma.pipeline import PixSigmaPipeline

    real = PixSigmaPipeline.from_pretrained.__func__
    monkeypatch.setattr("bench.e2e.PixSigmaPipeline.from_pretrained",
                        classmethod(lambda cls, model, **kw: real(cls, str(tiny_pipeline), **kw)))
    args = ["--device", "cpu", "--sizes", "64", "--steps", "1", "--threads", "1", "--parts", "e2e"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"]["cpu-e2e"]
    assert run["e2e"][0]["pipeline"].startswith("demo") and run["e2e"][0]["generated_size"] == [64, 64]
    assert not any("FALLBACK" in n for n in run["notes"])


# -- results files and targets -----------------------------------------------------------------------------


def _run(key, **sections):
    return {"key": key, "title": f"run {key}", "started": "2026-01-01T00:00:00+00:00", "seconds": 1.0,
            "command": "python -m bench", "notes": [], "environment": {"device_name": f"dev-{key}", "torch": "x"},
            "settings": {"arch_label": "a", "dtype": "bfloat16", "batch": 2, "steps": 20}, **sections}


def test_save_merges_runs_by_device(tmp_path):
    save(_run("cpu"), tmp_path)
    save(_run("cuda"), tmp_path)
    save({**_run("cpu"), "title": "second cpu run"}, tmp_path)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted(runs) == ["cpu", "cuda"] and runs["cpu"]["title"] == "second cpu run"
    md = (tmp_path / "results.md").read_text()
    assert "dev-cuda" in md and "second cpu run" in md and "run cpu" not in md
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _ok(size, kv, speedup):
    return {"size": size, "impl": "pixsigma", "kv": kv, "mode": "compile", "status": "ok", "speedup": speedup}


def test_targets_judge_only_what_was_measured():
    from bench.plan import profile_for

    p = profile_for(BenchSettings(device="cuda"), torch.device("cuda"))
    dit = [_ok(1024, "off", 1.6), _ok(1024, "R=2 on 14–27", 1.9), _ok(4096, "R=2 on 14–27", 2.0),
           {"size": 2048, "impl": "pixsigma", "kv": "off", "mode": "eager", "status": "not measured", "reason": "x"}]
    e2e = [{"size": 4096, "t5": "offloaded to CPU", "status": "ok", "timing": {"median_s": 30.0},
            "peak_memory_bytes": 25e9}]
    got = {t["target"]: t["met"] for t in targets({"dit": dit, "e2e": e2e}, p)}
    assert got["DiT step ≥ 1.5× diffusers at 1024 (no KV: same output)"] is True  # KV rows do not count here
    assert got["DiT step ≥ 2.2× diffusers at 4096 (KV R=2)"] is False
    assert got["DiT step faster than diffusers at 2048"] is None  # its only row failed: not measured, not "no"
    assert got["20-step 4096² image ≤ 35 s (T5 offloaded)"] is True
    assert got["peak GPU memory ≤ 24 GB at 4096 (T5 offloaded)"] is False
    assert got["peak GPU memory ≤ 12 GB at 1024 (T5 offloaded)"] is None
    assert "not measured" in render({"cuda": _run("cuda", targets=targets({"dit": dit, "e2e": e2e}, p))})


def test_noisy_latency_is_flagged():
    def row(lo, med, hi):
        return {"size": 64, "impl": "pixsigma", "kv": "off", "mode": "eager", "status": "ok", "flops": 1e9,
                "tflops": 1.0, "peak_fraction": 0.5, "speedup": 1.0,
                "timing": {"median_s": med, "min_s": lo, "max_s": hi, "repeats": 5, "warmup": 1}}

    md = render({"cpu": _run("cpu", dit=[row(0.010, 0.011, 0.012), row(0.010, 0.020, 0.090)])})
    assert "| 11.0 ms |" in md  # steady: the median alone
    assert "20.0 ms (noisy: 10.0 ms–90.0 ms)" in md


def test_busy_cpu_is_flagged(tmp_path, monkeypatch, threads):
    monkeypatch.setattr("bench.run._load", lambda: 9.0)  # other work competing for the cores
    assert main([*QUICK, "--parts", "dit", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"]["cpu-quick-dit"]
    assert run["busy"] is True and any(n.startswith("BUSY MACHINE") for n in run["notes"])
    assert "vs peer (unreliable: busy machine)" in (tmp_path / "results.md").read_text()


def test_few_step_target_compares_the_two_demo_rows():
    from bench.e2e import FEW_STEP_PIPELINE
    from bench.plan import profile_for

    p = profile_for(BenchSettings(device="cpu"), torch.device("cpu"))
    slow = {"size": 256, "pipeline": "demo (trained, assets/demo/sigma)", "status": "ok", "steps": 20,
            "timing": {"median_s": 2.4}}
    fast = {"size": 256, "pipeline": FEW_STEP_PIPELINE, "status": "ok", "steps": 4, "timing": {"median_s": 0.6}}
    got = {t["target"]: t for t in targets({"e2e": [slow, fast]}, p)}
    few = got["demo 256 px with demo-lcm (4 steps) ≥ 3× faster than its 20-step default"]
    assert few["met"] is True and few["measured"] == "4.0×"
    assert got["demo 256 px, 20 steps ≤ 3 s on 2 CPU cores"]["value"] == 2.4  # the 20-step row, not the fast one
    got = {t["target"]: t for t in targets({"e2e": [slow]}, p)}
    assert got["demo 256 px with demo-lcm (4 steps) ≥ 3× faster than its 20-step default"]["met"] is None
