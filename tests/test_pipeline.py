"""Text -> image: parity with diffusers' PixArtSigmaPipeline, binning, the CLI contract, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma.cli import main as cli
from pixsigma.config import KVCompress
from pixsigma.io import read_params
from pixsigma.pipeline import GenerationRequest, OutOfMemory, PixSigmaPipeline, SamplingDefaults
from pixsigma.sampling import PIXART_BETAS

PROMPT = "a red star above a blue ring"


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("sampler,size", [("default", (256, 256)), ("sa-solver", (320, 200)), ("ddim", (256, 256))])
def test_pipeline_matches_diffusers(tiny_pipeline, pipe, sampler, size):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, SASolverScheduler

    ref_pipe = PixArtSigmaPipeline.from_pretrained(tiny_pipeline)
    if sampler == "sa-solver":  # as the PixArt-Σ demo sets it up
        ref_pipe.scheduler = SASolverScheduler(**PIXART_BETAS, algorithm_type="data_prediction")
    elif sampler == "ddim":
        ref_pipe.scheduler = DDIMScheduler(**PIXART_BETAS, clip_sample=False)  # as SD ships it for latents
    w, h = size
    ref = ref_pipe(PROMPT, negative_prompt="", num_inference_steps=6, guidance_scale=4.5, width=w, height=h,
                   generator=torch.Generator("cpu").manual_seed(11), clean_caption=False, output_type="pil").images[0]
    ours = pipe.generate(GenerationRequest(PROMPT, steps=6, seed=11, width=w, height=h, sampler=sampler)).images[0]
    assert ours.size == ref.size == (w, h)
    assert np.asarray(ours).std() > 1  # a real image, not a constant
    assert psnr(ours, ref) >= 45


def test_binning_generates_in_bucket_and_returns_asked_size(pipe):
    res = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=0, width=300, height=200))
    assert res.images[0].size == (300, 200)
    assert res.params["generated_size"] == [304, 208]  # the 256 table's bucket for h/w 0.67 -> key 0.68
    exact = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=0, width=96, height=64, binning=False))
    assert exact.images[0].size == (96, 64) and exact.params["generated_size"] == [96, 64]


def test_no_binning_refuses_bad_sizes(pipe):
    with pytest.raises(ValueError, match="multiple of 16 between 16 and"):
        pipe.generate(GenerationRequest(PROMPT, steps=1, width=100, height=64, binning=False))


def test_same_seed_same_image_and_batches(pipe):
    a = pipe.generate(GenerationRequest(PROMPT, steps=3, seed=5, num_images=2))
    b = pipe.generate(GenerationRequest(PROMPT, steps=3, seed=5))
    assert len(a.images) == 2
    assert psnr(a.images[0], b.images[0]) > 40  # the first image of a batch is the seed's single image
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))


def test_callback_sees_every_step(pipe):
    seen = []
    pipe.generate(GenerationRequest(PROMPT, steps=4, seed=1), callback=lambda i, n, lat: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_long_prompt_warns_with_dropped_count(pipe):
    long = " ".join(["red star"] * 200)  # 400 words + EOS
    res = pipe.generate(GenerationRequest(long, steps=1, seed=0))
    assert any("401 tokens" in w and "last 101 tokens were dropped" in w for w in res.warnings)


def test_unknown_words_are_listed(pipe):
    assert pipe.unknown_words("a red zebra above the moon") == ["zebra", "moon"]


@pytest.mark.parametrize("kwargs,msg", [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": True}, "steps must be an integer >= 1 or null, got True"),
    ({"guidance": -1.0}, "guidance must be a number >= 0"),
    ({"sampler": "plms"}, "unknown sampler 'plms'; accepted: default, dpm-solver"),
    ({"num_images": 0}, "num_images must be an integer in 1-16"),
])
def test_bad_requests(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationRequest(PROMPT, **kwargs)


def test_kv_pipeline_in_pixsigma_layout_and_override(tiny_kv_pipeline):
    pipe = PixSigmaPipeline.from_pretrained(str(tiny_kv_pipeline))
    assert pipe.transformer.config.kv_compress == KVCompress(2, (1,))
    req = dict(prompt=PROMPT, steps=3, seed=2)
    own = np.asarray(pipe.generate(GenerationRequest(**req)).images[0], dtype=np.float64)
    off = np.asarray(pipe.generate(GenerationRequest(**req, kv=KVCompress())).images[0], dtype=np.float64)
    again = np.asarray(pipe.generate(GenerationRequest(**req)).images[0], dtype=np.float64)
    assert np.array_equal(own, again)  # the override is undone after the request
    assert not np.array_equal(own, off)


def test_bf16_runs(tiny_pipeline):
    pipe = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), dtype="bf16")
    img = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=0)).images[0]
    assert img.size == (256, 256)


def test_oom_names_options(pipe, monkeypatch):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipe, "_generate", boom)
    with pytest.raises(OutOfMemory, match=r"--dtype bf16.*--offload-t5.*--kv-compress 2"):
        pipe.generate(GenerationRequest(PROMPT, width=4096, height=4096))


def test_cli_generate_writes_png_with_parameters(tiny_pipeline, tmp_path):
    out = tmp_path / "img.png"
    assert cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), "--seed", "9", "--steps", "3",
                "--width", "320", "--height", "192", "--kv-compress", "2", "--kv-layers", "1"]) == 0
    assert Image.open(out).size == (320, 192)
    params = read_params(out)
    assert params["seed"] == 9 and params["prompt"] == PROMPT and params["kv_compress"]["layers"] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name != "img.png"]  # no temp files left behind


@pytest.mark.parametrize("args,msg", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--guidance", "-2"], "--guidance must be >= 0"),
    (["--kv-compress", "0"], "--kv-compress must be >= 1"),
    (["--kv-layers", "3-1", "--kv-compress", "2"], "bad layer range"),
    (["--no-binning", "--width", "100"], "multiple of 16"),
])
def test_cli_bad_input(tiny_pipeline, tmp_path, capsys, args, msg):
    out = tmp_path / "x.png"
    assert cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_cli_missing_model_names_layouts(tmp_path, capsys):
    assert cli(["generate", PROMPT, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "model_index.json" in err and "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS" in err


def test_cli_help_documents_contract(capsys):
    with pytest.raises(SystemExit):
        cli(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--transformer", "--negative", "--seed", "--steps", "--guidance", "--width", "--height",
                 "--sampler", "--no-binning", "--kv-compress", "--kv-layers", "--kv-operator", "--num-images",
                 "--device", "--dtype", "--offload-t5"):
        assert flag in text


def test_speed_mode_keeps_the_image(tiny_pipeline, pipe):
    from pixsigma.cli import SPEED_MODES
    from pixsigma.speed import MODES

    assert SPEED_MODES == MODES  # the CLI's choices are the engine's modes
    fast = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), speed="sdpa")
    req = GenerationRequest(PROMPT, steps=3, seed=4)
    assert psnr(fast.generate(req).images[0], pipe.generate(req).images[0]) >= 45


def test_guidance_interval_is_opt_in_and_recorded(pipe):
    base = pipe.generate(GenerationRequest(PROMPT, steps=4, seed=3))
    inter = pipe.generate(GenerationRequest(PROMPT, steps=4, seed=3, guidance_interval=(0.0, 500.0)))
    assert inter.params["guidance_interval"] == [0.0, 500.0] and "guidance_interval" not in base.params
    assert not np.array_equal(np.asarray(base.images[0]), np.asarray(inter.images[0]))
    with pytest.raises(ValueError, match="guidance_interval must be"):
        GenerationRequest(PROMPT, guidance_interval=(600.0, 100.0))


def test_batches_larger_than_the_text_cache(pipe):
    prompts = [f"{c} {s}" for c in ("red", "blue", "green", "small", "large", "big", "the")
               for s in ("star", "circle", "square", "ring", "triangle")]  # 35 distinct > TEXT_CACHE
    emb, mask, _ = pipe.encode_prompts(prompts)
    assert emb.shape[0] == 35 and mask.shape[0] == 35


def test_a_folder_sets_its_own_steps_and_guidance(tiny_pipeline, pipe, tmp_path):
    import shutil

    assert pipe.resolve_sampling(GenerationRequest(PROMPT)) == (4.5, 20)  # no sampling.json: PixArt's
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline, folder)
    SamplingDefaults(steps=3, guidance=2.0).write(folder)
    own = PixSigmaPipeline.from_pretrained(str(folder), device="cpu")
    r = own.generate(GenerationRequest(PROMPT, seed=1))
    assert (r.params["steps"], r.params["guidance"]) == (3, 2.0)
    spelled = own.generate(GenerationRequest(PROMPT, seed=1, steps=3, guidance=2.0))
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(spelled.images[0]))
    r = own.generate(GenerationRequest(PROMPT, seed=1, steps=2, guidance=1.0))  # the request's own win
    assert (r.params["steps"], r.params["guidance"]) == (2, 1.0)
    # the folder's steps go with its own sampler; another sampler keeps its own count
    assert own.resolve_sampling(GenerationRequest(PROMPT, sampler="ddim")) == (2.0, 50)


def test_a_folder_expands_prompts_with_its_named_expander(tiny_pipeline, pipe, tmp_path):
    """The model reads the expander's rewrite (seeded per image), the result says so, and a request can opt out."""
    import shutil

    from shapes.prompts import expand_prompt

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline, folder)
    SamplingDefaults(steps=2, guidance=2.0, prompt_expander="shapes").write(folder)
    own = PixSigmaPipeline.from_pretrained(str(folder), device="cpu")
    r = own.generate(GenerationRequest(PROMPT, seed=5, num_images=2))
    assert r.params["prompt"] == PROMPT
    assert r.params["expanded_prompts"] == [expand_prompt(PROMPT, 5), expand_prompt(PROMPT, 6)]
    read = own.generate(GenerationRequest(r.params["expanded_prompts"], seed=5, expand_prompt=False))
    assert np.array_equal(np.asarray(r.images[1]), np.asarray(read.images[1]))  # exactly what it read
    plain = own.generate(GenerationRequest(PROMPT, seed=5, expand_prompt=False))
    assert "expanded_prompts" not in plain.params and "expanded_prompts" not in read.params
    as_folder = pipe.generate(GenerationRequest(PROMPT, seed=5, steps=2, guidance=2.0))  # no expander named
    assert "expanded_prompts" not in as_folder.params
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(as_folder.images[0]))
    with pytest.raises(ValueError, match="expand_prompt must be true or false"):
        GenerationRequest(PROMPT, expand_prompt="yes")


@pytest.mark.parametrize("body,msg", [
    ('{"steps": 0}', "steps must be an integer >= 1 or null, got 0"),
    ('{"guidance": "high"}', "guidance must be a number >= 0"),
    ('{"step": 30}', r"unknown keys \['step'\]; accepted: steps, guidance"),
    ("[30, 2]", "must hold an object like"),
    ("{steps: 30}", "is not valid JSON"),
    ('{"prompt_expander": "llm"}', r"unknown prompt_expander 'llm'; accepted: shapes, or null"),
])
def test_bad_sampling_file_is_named(tmp_path, body, msg):
    (tmp_path / "sampling.json").write_text(body)
    with pytest.raises(ValueError, match=msg) as e:
        SamplingDefaults.read(tmp_path)
    assert str(tmp_path / "sampling.json") in str(e.value)


def test_euler_ancestral_is_seeded(pipe):
    """Its re-noising draws from the request's generator: the seed alone fixes the image."""
    from diffusers import EulerAncestralDiscreteScheduler

    from pixsigma.sampling import make_scheduler

    assert isinstance(make_scheduler("euler-a"), EulerAncestralDiscreteScheduler)
    folder = {"_class_name": "EulerAncestralDiscreteScheduler", **PIXART_BETAS}
    assert isinstance(make_scheduler("default", folder), EulerAncestralDiscreteScheduler)
    a, b, c = (np.asarray(pipe.generate(GenerationRequest(PROMPT, sampler="euler-a", steps=4, seed=s)).images[0])
               for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
