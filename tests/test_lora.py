"""LoRA through peft: every layout in the wild equals diffusers + peft, scale 0 is the base, adapters add up,
swaps never reload and restore the base bit for bit, fuse/unfuse is exact, skipped keys are counted, bad files
and numbers are refused by name."""

import json
import math

import numpy as np
import pytest
import torch
from lora_files import DIT_LAYOUTS, dit_tensors, write
from safetensors.torch import save_file

from pixsigma.cli import main as cli
from pixsigma.lora import SCALE_RANGE, LoraSpec, LoraStack, parse_loras, read_adapter
from pixsigma.pipeline import GenerationRequest

PROMPT = "a red star above a blue ring"
RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]
CONFIG = {"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def peft_lora(tiny_pipeline):
    """(diffusers' image with a random peft LoRA, that LoRA's peft state dict)."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = PixArtTransformer2DModel.from_pretrained(tiny_pipeline / "transformer")
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), transformer)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)  # B nonzero: the adapter changes the image
    ref_pipe = PixArtSigmaPipeline.from_pretrained(tiny_pipeline, transformer=transformer)
    image = ref_pipe(PROMPT, negative_prompt="", num_inference_steps=6, guidance_scale=4.5, width=256, height=256,
                     generator=torch.Generator("cpu").manual_seed(11), clean_caption=False).images[0]
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}
    return image, sd


def lora_file(sd, folder, layout="diffusers") -> str:
    return write(dit_tensors(layout, sd, ALPHA), folder, layout, CONFIG)


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    return torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 16)


@pytest.mark.parametrize("layout", DIT_LAYOUTS)
def test_every_layout_matches_diffusers_with_peft(pipe, peft_lora, tmp_path, layout):
    ref, sd = peft_lora
    req = GenerationRequest(PROMPT, steps=6, seed=11, width=256, height=256)
    pipe.set_loras([])
    if layout == DIT_LAYOUTS[0]:
        assert psnr(pipe.generate(req).images[0], ref) < 35  # the adapter matters
    path = lora_file(sd, tmp_path, layout)
    assert pipe.set_loras(f"{path}:1.0") == []  # every key used: no warning
    res = pipe.generate(req)
    score = psnr(res.images[0], ref)
    assert score >= 45, (layout, score)
    assert res.params["loras"] == [{"path": path, "scale": 1.0}] and res.warnings == []
    pipe.set_loras([])


def test_scale_zero_is_the_base_and_adapters_add_up(pipe, peft_lora, tmp_path, inputs):
    path = lora_file(peft_lora[1], tmp_path)
    req = GenerationRequest(PROMPT, steps=4, seed=3, width=256, height=256)
    pipe.set_loras([])
    base = np.asarray(pipe.generate(req).images[0])
    pipe.set_loras([LoraSpec(path, 0.0)])
    assert np.array_equal(np.asarray(pipe.generate(req).images[0]), base)
    dit = pipe.transformer
    pipe.set_loras(f"{path}:1.0")
    with torch.no_grad():
        whole = dit(*inputs)
        pipe.set_loras(f"{path}:0.5, {path}:0.5")
        assert torch.allclose(dit(*inputs), whole, atol=1e-5)
        pipe.set_loras(f"{path}:-1.0")
        assert not torch.allclose(dit(*inputs), whole, atol=1e-3)
    pipe.set_loras([])


def test_switching_never_reloads_and_none_is_the_untouched_model(pipe, peft_lora, tmp_path, monkeypatch, inputs):
    import pixsigma.lora_read as read_mod
    import pixsigma.weights as weights_mod

    kohya, omi = lora_file(peft_lora[1], tmp_path, "onetrainer_legacy"), lora_file(peft_lora[1], tmp_path / "o",
                                                                                  "onetrainer_omi")
    pipe.set_loras([])
    dit = pipe.transformer
    modules = dict(dit.named_modules())
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        base = dit(*inputs)
    reads = []
    real = read_mod.load_state_dict_file
    monkeypatch.setattr(read_mod, "load_state_dict_file", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(weights_mod, "read_checkpoint", lambda *a, **k: pytest.fail("the base was reloaded"))
    with torch.no_grad():
        pipe.set_loras(f"{omi}:0.7")
        alone = dit(*inputs)
        for spec in (f"{kohya}:1", f"{kohya}:-0.7", "", f"{kohya}:2", f"{omi}:0.7"):
            pipe.set_loras(spec)
        assert torch.equal(dit(*inputs), alone)  # B after A equals B alone
        pipe.set_loras([])
        assert torch.equal(dit(*inputs), base)  # none after A, B: the never-adapted model, bit for bit
    assert len(reads) == 2  # each file is read once, then served from the stack's cache
    assert dict(dit.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in dit.named_modules())
    after = dit.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_fuse_merges_and_unfuse_restores_the_base_bit_for_bit(pipe, peft_lora, tmp_path, inputs):
    path = lora_file(peft_lora[1], tmp_path, "onetrainer_omi")
    pipe.set_loras([])
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    stack = pipe.loras
    with torch.no_grad():
        pipe.set_loras(f"{path}:0.8")
        unfused = pipe.transformer(*inputs)
        stack.fuse()
        assert stack.fused
        qkv = pipe.transformer.blocks[0].attn.qkv
        assert qkv.merged and not torch.equal(qkv.get_base_layer().weight, weights["blocks.0.attn.qkv.weight"])
        fused = pipe.transformer(*inputs)
        assert torch.allclose(fused, unfused, atol=1e-5) and not torch.equal(fused, unfused)
        pipe.set_loras(f"{path}:0.4")  # while fused, a new set is fused too
        assert stack.fused and torch.allclose(pipe.transformer(*inputs), pipe.transformer(*inputs))
        stack.unfuse()
        pipe.set_loras(f"{path}:0.8")
        assert torch.equal(pipe.transformer(*inputs), unfused)
        pipe.set_loras([])
    now = pipe.transformer.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())


def test_unknown_dit_keys_are_counted_and_skipped(pipe, peft_lora, tmp_path, inputs):
    tensors = dit_tensors("diffusers", peft_lora[1], ALPHA)
    good = write(tensors, tmp_path / "good", "diffusers", CONFIG)
    extra = {**tensors, "transformer.transformer_blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
             "transformer.transformer_blocks.9.attn1.to_q.lora_B.weight": torch.zeros(32, 4),
             "transformer.pos_embed.bias_free.lora_A.weight": torch.zeros(4, 4)}
    path = write(extra, tmp_path / "extra", "diffusers", CONFIG)
    with torch.no_grad():
        pipe.set_loras(good)
        ref = pipe.transformer(*inputs)
        warnings = pipe.set_loras(path)
        assert torch.equal(pipe.transformer(*inputs), ref)
    assert warnings == ["LoRA diffusers.safetensors: 3 key(s) match no module of this DiT and were skipped "
                        "(e.g. 'transformer.pos_embed.bias_free.lora_A.weight')"]  # keys in file order
    res = pipe.generate(GenerationRequest(PROMPT, steps=1, seed=1, width=256, height=256))
    assert warnings[0] in res.warnings
    pipe.set_loras([])
    assert pipe.loras.warnings == []


def _bad(tmp_path, key, shape, **extra):
    save_file({key: torch.zeros(shape), key.replace("lora_A", "lora_B"): torch.zeros(32, 4), **extra},
              tmp_path / "bad.safetensors")
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("key,shape,msg", [
    ("transformer.transformer_blocks.9.attn1.to_q.lora_A.weight", (4, 32),
     "none of its 2 keys names a module of this model (e.g. "
     "'transformer.transformer_blocks.9.attn1.to_q.lora_A.weight')"),
    ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", (4, 64),
     "key 'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight': lora shapes "
     "{'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight': (4, 64), "
     "'transformer.transformer_blocks.0.attn1.to_q.lora_B.weight': (32, 4)} do not give the (32, 32) delta"),
    ("transformer.transformer_blocks.0.attn1.to_q.dora_scale", (4, 32), "none of its 1 keys names a module"),
])
def test_bad_files_are_refused_naming_the_key(pipe, tmp_path, key, shape, msg):
    path = _bad(tmp_path, key, shape)
    with pytest.raises(ValueError) as e:
        pipe.set_loras(str(path))
    assert msg in str(e.value)
    assert pipe.loras.active == []


def test_a_file_without_alpha_has_scale_one_and_rslora(pipe, peft_lora, tmp_path):
    sd = {f"transformer.{k}": v for k, v in peft_lora[1].items()}
    save_file(sd, tmp_path / "plain.safetensors")
    w = read_adapter(tmp_path / "plain.safetensors", pipe.transformer)
    assert {f.scale for fs in w.dit.values() for f in fs} == {1.0}
    (tmp_path / "rs").mkdir()
    save_file({f"base_model.model.{k}": v for k, v in peft_lora[1].items()},
              tmp_path / "rs" / "adapter_model.safetensors")
    (tmp_path / "rs" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    w = read_adapter(tmp_path / "rs", pipe.transformer)
    assert {f.scale for fs in w.dit.values() for f in fs} == {4.0}  # alpha / sqrt(r)


# -- numbers at the edge (issue 27.4) -----------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("demo-tiny-huge:nan", "nan"), ("demo-tiny-huge:inf", "inf"),
                                        ("demo-tiny-huge:-inf", "-inf"), ("x.safetensors:4.5", "4.5"),
                                        ("demo-tiny-huge:1e308", "1e+308")])
def test_scales_are_finite_and_in_the_range(text, value):
    lo, hi = SCALE_RANGE
    with pytest.raises(ValueError) as e:
        LoraSpec.parse(text)
    assert str(e.value) == f"scale of {text.rpartition(':')[0]!r} must be in [{lo}, {hi}], got {value}"
    with pytest.raises(ValueError, match="must be in"):
        parse_loras(f"a:1, {text}")
    with pytest.raises(ValueError, match="must be in"):
        GenerationRequest(PROMPT, loras=text)
    assert LoraSpec.parse("C:/x/y.safetensors:-4").scale == -4.0


def test_cli_refuses_a_non_finite_scale_with_exit_2(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "x.png"
    rc = cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), "--lora", "demo-tiny-huge:inf"])
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == "error: scale of 'demo-tiny-huge' must be in [-4.0, 4.0], got inf"


@pytest.mark.parametrize("case", ["nan_tensor", "inf_alpha_tensor", "nan_lora_alpha", "huge_lora_alpha"])
def test_non_finite_tensors_and_alphas_are_refused_naming_file_and_key(pipe, peft_lora, tmp_path, case):
    tensors = dit_tensors("onetrainer_omi", peft_lora[1], ALPHA)
    config = dict(CONFIG)
    key = "transformer.blocks.1.mlp.fc2.lora_up.weight"
    if case == "nan_tensor":
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
        msg = f"key {key!r} holds non-finite values (NaN or inf)"
    elif case == "inf_alpha_tensor":
        key = "transformer.blocks.0.attn.qkv.1.alpha"
        tensors[key] = torch.tensor(float("inf"))
        msg = f"key {key!r} is inf; alpha must be finite and within [-10000, 10000]"
    else:
        tensors = dit_tensors("peft", peft_lora[1], ALPHA)
        config["lora_alpha"] = float("nan") if case == "nan_lora_alpha" else 1e308
        msg = f"'lora_alpha' of the adapter config is {config['lora_alpha']!r}; alpha must be finite"
    path = write(tensors, tmp_path, "peft" if "lora_alpha" in case else "onetrainer_omi", config)
    with pytest.raises(ValueError) as e:
        pipe.set_loras(path)
    assert str(e.value).startswith("LoRA ") and msg in str(e.value) and str(tmp_path) in str(e.value)
    assert pipe.loras.active == [] and not math.isnan(pipe.transformer(
        torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), torch.zeros(1, 5, 16)).sum().item())


def test_the_stack_alone_on_a_dit(tiny_pipeline, peft_lora, tmp_path, inputs):
    from pixsigma.weights import load_dit

    dit = load_dit(tiny_pipeline / "transformer")
    stack = LoraStack(dit)
    path = lora_file(peft_lora[1], tmp_path, "comfyui")
    with torch.no_grad():
        base = dit(*inputs)
        assert stack.set([LoraSpec(path, 1.0)]) == [] and stack.active == [(path, 1.0)]
        assert not torch.allclose(dit(*inputs), base, atol=1e-3)
        stack.set([])
        assert torch.equal(dit(*inputs), base)


def test_parse_loras_forms():
    assert parse_loras("demo-tiny-huge:1.0, b.safetensors:0.5") == [LoraSpec("demo-tiny-huge", 1.0),
                                                                    LoraSpec("b.safetensors", 0.5)]
    assert parse_loras(["C:/x/y.safetensors", ("z", 2)]) == [LoraSpec("C:/x/y.safetensors"), LoraSpec("z", 2.0)]
    with pytest.raises(ValueError, match="LoRA scale must be a number"):
        LoraSpec("a", "big")


def test_cli_lora_bad_path_writes_nothing(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "x.png"
    rc = cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), "--steps", "2",
              "--lora", str(tmp_path / "missing.safetensors:0.5")])
    assert rc == 2 and not out.exists()
    assert "LoRA" in capsys.readouterr().err


def test_train_a_lora_and_load_it_back(tiny_pipeline, pipe, tmp_path):
    from fixtures import make_images, write_config
    from safetensors.torch import load_file

    from pixsigma.io import read_params
    from pixsigma.weights import load_dit
    from train.config import load_config
    from train.loop import train
    from train.lora import LoraTrainConfig, add_lora

    enc = {"source": str(make_images(tmp_path / "imgs")), "text_encoder": str(tiny_pipeline),
           "vae": str(tiny_pipeline)}
    cfg = load_config(write_config(tmp_path / "lora.yaml", output_dir=str(tmp_path / "run"), data=enc, steps=3,
                                   stage={"name": "finetune", "load_from": str(tiny_pipeline / "transformer")},
                                   optim={"name": "adamw", "lr": 3e-2, "betas": [0.9, 0.999], "eps": [1e-8]},
                                   lora={"rank": 2, "alpha": 4, "target_modules": ["attn.qkv", "mlp.fc1"]}))
    res = train(cfg)
    final = tmp_path / "run" / "final"
    assert res["exports"] == {"final": str(final)}
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 4.0)
    keys = set(load_file(final / "pytorch_lora_weights.safetensors"))
    assert "transformer.transformer_blocks.1.attn1.to_v.lora_B.weight" in keys
    assert "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 4
    # the trained model as the loop left it (its last checkpoint) == the base + the exported LoRA
    trained = load_dit(tiny_pipeline / "transformer")
    add_lora(trained, LoraTrainConfig(2, 4, ("attn.qkv", "mlp.fc1")))
    trained.load_state_dict(load_file(tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 16)
    pipe.set_loras(str(final))
    with torch.no_grad():
        ours, ref = pipe.transformer(x, t, y), trained(x, t, y)
    pipe.set_loras([])
    assert torch.allclose(ours, ref, atol=1e-5) and not torch.allclose(ours, pipe.transformer(x, t, y), atol=1e-4)
    out = tmp_path / "x.png"
    assert cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), "--steps", "2",
                "--seed", "1", "--lora", f"{final}:0.5"]) == 0
    assert read_params(out)["loras"] == [{"path": str(final), "scale": 0.5}]


def test_bf16_dit_and_the_cache_bound(tiny_pipeline, peft_lora, tmp_path, inputs, monkeypatch):
    """A bf16 DiT runs (and fuses) fp32 adapters close to the fp32 result; adapters beyond ``CACHE_SIZE`` leave the
    layers and are read again when asked for."""
    import pixsigma.lora as lora_mod
    from pixsigma.weights import load_dit

    paths = [lora_file(peft_lora[1], tmp_path / str(i), layout) for i, layout in enumerate(DIT_LAYOUTS[:3])]
    ref32 = load_dit(tiny_pipeline / "transformer")
    LoraStack(ref32).set([LoraSpec(paths[0])])
    dit = load_dit(tiny_pipeline / "transformer", dtype=torch.bfloat16)
    stack = LoraStack(dit)
    x, t, y = inputs
    with torch.no_grad():
        want = ref32(x, t, y)
        base = dit(x.bfloat16(), t, y.bfloat16())
        stack.set([LoraSpec(paths[0])])
        got = dit(x.bfloat16(), t, y.bfloat16())
        tol = 0.02 * want.abs().max()  # bf16 keeps about 3 digits
        assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < tol
        stack.fuse()
        assert (dit(x.bfloat16(), t, y.bfloat16()).float() - want).abs().max() < tol
        stack.unfuse()
        monkeypatch.setattr(lora_mod, "CACHE_SIZE", 1)
        for p in paths[1:]:
            stack.set([LoraSpec(p)])
        held = {a for c in stack._chains["dit"].values() for a in c.adapters()}
        assert len(stack._names) == 1 and held == set(*stack._names.values())  # the others left the layers
        stack.set([LoraSpec(paths[0])])
        assert torch.equal(dit(x.bfloat16(), t, y.bfloat16()), got)
        stack.set([])
        assert torch.equal(dit(x.bfloat16(), t, y.bfloat16()), base)


def test_adapters_leave_the_models_requires_grad_as_it_was(tiny_pipeline, peft_lora, tmp_path):
    from pixsigma.weights import load_dit

    dit = load_dit(tiny_pipeline / "transformer")
    dit.blocks[1].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in dit.named_parameters()}
    stack = LoraStack(dit)
    stack.set([LoraSpec(lora_file(peft_lora[1], tmp_path))])
    adapted = {n.replace(".base_layer", ""): p.requires_grad for n, p in dit.named_parameters() if ".lora_" not in n}
    assert adapted == flags and not any(p.requires_grad for n, p in dit.named_parameters() if ".lora_" in n)
    stack.set([])
    assert {n: p.requires_grad for n, p in dit.named_parameters()} == flags


def test_cli_refuses_a_nan_file_with_exit_2(tiny_pipeline, peft_lora, tmp_path, capsys):
    tensors = dit_tensors("onetrainer_legacy", peft_lora[1], ALPHA)
    key = "lora_transformer_transformer_blocks_0_ff_net_2.lora_down.weight"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    path = write(tensors, tmp_path, "onetrainer_legacy")
    out = tmp_path / "x.png"
    assert cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), "--steps", "1",
                "--lora", f"{path}:0.5"]) == 2
    assert not out.exists()
    assert capsys.readouterr().err.strip().endswith(f"LoRA {path}: key {key!r} holds non-finite values (NaN or inf)")
