"""LoRA: every layout in the wild equals diffusers + peft, scale 0 is the base, adapters add up, swaps never
reload, bad files are refused by name."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pixsigma.cli import main as cli
from pixsigma.lora import LoraSpec, parse_loras
from pixsigma.lora import read_adapter as load_lora
from pixsigma.pipeline import GenerationRequest

PROMPT = "a red star above a blue ring"
RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]
# diffusers module -> (original module, part, parts), written out here independently of pixsigma.lora_keys
ORIGINAL = {"attn1.to_q": ("attn.qkv", 0, 3), "attn1.to_k": ("attn.qkv", 1, 3), "attn1.to_v": ("attn.qkv", 2, 3),
            "attn1.to_out.0": ("attn.proj", 0, 1), "attn2.to_q": ("cross_attn.q_linear", 0, 1),
            "attn2.to_k": ("cross_attn.kv_linear", 0, 2), "attn2.to_v": ("cross_attn.kv_linear", 1, 2),
            "attn2.to_out.0": ("cross_attn.proj", 0, 1), "ff.net.0.proj": ("mlp.fc1", 0, 1),
            "ff.net.2": ("mlp.fc2", 0, 1)}


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


def write_layout(layout: str, sd: dict, folder) -> str:
    """The peft LoRA saved as a file (or folder) of ``layout``; returns the path to pass."""
    folder.mkdir(parents=True, exist_ok=True)
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    a = {m: sd[f"{m}.lora_A.weight"] for m in mods}
    b = {m: sd[f"{m}.lora_B.weight"] for m in mods}
    out: dict = {}
    if layout == "diffusers":
        for m in mods:
            out[f"transformer.{m}.lora_A.weight"], out[f"transformer.{m}.lora_B.weight"] = a[m], b[m]
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})}
        save_file(out, folder / "lora.safetensors", metadata=meta)
        return str(folder / "lora.safetensors")
    if layout in ("peft", "comfyui"):
        prefix = "base_model.model." if layout == "peft" else "unet.base_model.model."
        for m in mods:
            out[f"{prefix}{m}.lora_A.weight"], out[f"{prefix}{m}.lora_B.weight"] = a[m], b[m]
            if layout == "comfyui":
                out[f"{prefix}{m}.alpha"] = torch.tensor(ALPHA)
        if layout == "comfyui":
            save_file(out, folder / "comfy.safetensors")
            return str(folder / "comfy.safetensors")
        save_file(out, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}))
        return str(folder)
    if layout == "kohya":
        for m in mods:
            base = "lora_transformer_" + m.replace(".", "_")
            out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"] = a[m], b[m]
            out[f"{base}.alpha"] = torch.tensor(ALPHA)
        save_file(out, folder / "kohya.safetensors")
        return str(folder / "kohya.safetensors")
    assert layout == "onetrainer"  # original names: q/k/v (k/v) fused into one LoRA of rank 3r (2r)
    fused: dict = {}
    for m in mods:
        if m == "proj_out":
            fused["final_layer.linear"] = [(0, 1, a[m], b[m])]
            continue
        i, sub = m.split(".", 2)[1], m.split(".", 2)[2]
        orig, part, parts = ORIGINAL[sub]
        fused.setdefault(f"blocks.{i}.{orig}", []).append((part, parts, a[m], b[m]))
    for name, pieces in fused.items():
        pieces.sort(key=lambda p: p[0])
        down = torch.cat([p[2] for p in pieces])  # (n·r, in)
        up = torch.block_diag(*[p[3] for p in pieces])  # (n·rows, n·r)
        out[f"transformer.{name}.lora_down.weight"], out[f"transformer.{name}.lora_up.weight"] = down, up
        out[f"transformer.{name}.alpha"] = torch.tensor(ALPHA * len(pieces))  # alpha / rank unchanged
    save_file(out, folder / "onetrainer.safetensors")
    return str(folder / "onetrainer.safetensors")


LAYOUTS = ("diffusers", "peft", "comfyui", "onetrainer", "kohya")


def test_every_layout_matches_diffusers_with_peft(pipe, peft_lora, tmp_path):
    ref, sd = peft_lora
    req = GenerationRequest(PROMPT, steps=6, seed=11, width=256, height=256)
    pipe.set_loras([])
    base = pipe.generate(req).images[0]
    assert psnr(base, ref) < 35  # the adapter matters
    for layout in LAYOUTS:
        path = write_layout(layout, sd, tmp_path / layout)
        pipe.set_loras(f"{path}:1.0")
        res = pipe.generate(req)
        score = psnr(res.images[0], ref)
        assert score >= 45, (layout, score)
        assert res.params["loras"] == [{"path": path, "scale": 1.0}]
    pipe.set_loras([])


def test_scale_zero_is_the_base_and_adapters_add_up(pipe, peft_lora, tmp_path):
    path = write_layout("diffusers", peft_lora[1], tmp_path)
    req = GenerationRequest(PROMPT, steps=4, seed=3, width=256, height=256)
    pipe.set_loras([])
    base = np.asarray(pipe.generate(req).images[0])
    pipe.set_loras([LoraSpec(path, 0.0)])
    assert np.array_equal(np.asarray(pipe.generate(req).images[0]), base)
    dit = pipe.transformer
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 16)
    pipe.set_loras(f"{path}:1.0")
    whole = dit(x, t, y)
    pipe.set_loras(f"{path}:0.5, {path}:0.5")
    assert torch.allclose(dit(x, t, y), whole, atol=1e-5)
    pipe.set_loras([])


def test_switching_never_reloads_or_changes_the_base(pipe, peft_lora, tmp_path, monkeypatch):
    import pixsigma.lora as lora_mod
    import pixsigma.weights as weights_mod

    path = write_layout("kohya", peft_lora[1], tmp_path)
    params = dict(pipe.transformer.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    reads = []
    real = lora_mod.load_state_dict_file
    monkeypatch.setattr(lora_mod, "load_state_dict_file", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(weights_mod, "read_checkpoint", lambda *a, **k: pytest.fail("the base was reloaded"))
    for spec in (f"{path}:1", f"{path}:-0.7", "", f"{path}:2"):
        pipe.set_loras(spec)
    assert len(reads) == 1  # the file is read once, then served from the stack's cache
    for k, v in pipe.transformer.named_parameters():
        assert v is params[k] and torch.equal(v, before[k])
    pipe.set_loras([])


def test_a_file_without_alpha_has_scale_one_and_rslora(pipe, peft_lora, tmp_path):
    sd = {f"transformer.{k}": v for k, v in peft_lora[1].items()}
    save_file(sd, tmp_path / "plain.safetensors")
    w = load_lora(tmp_path / "plain.safetensors", pipe.transformer)
    assert {f for pairs in w.modules.values() for _, _, f, _ in pairs} == {1.0}
    assert w.layout == "diffusers"


def _bad(tmp_path, key, shape):
    save_file({key: torch.zeros(shape), key.replace("lora_A", "lora_B"): torch.zeros(32, 4)},
              tmp_path / "bad.safetensors")
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("key,shape,msg", [
    ("transformer.transformer_blocks.9.attn1.to_q.lora_A.weight", (4, 32),
     "key 'transformer.transformer_blocks.9.attn1.to_q.lora_A.weight' matches no Linear of this model"),
    ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", (4, 64),
     "key 'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight' has shape (4, 64), the model's "
     "transformer_blocks.0.attn1.to_q expects (4, 32)"),
    ("transformer.transformer_blocks.0.attn1.to_q.hada_w1_a", (4, 32),
     "key 'transformer.transformer_blocks.0.attn1.to_q.hada_w1_a' is in no known LoRA layout"),
])
def test_bad_files_are_refused_naming_the_key(pipe, tmp_path, key, shape, msg):
    path = _bad(tmp_path, key, shape)
    with pytest.raises(ValueError, match="accepted: PEFT/diffusers" if "layout" in msg else "expects|model") as e:
        pipe.set_loras(str(path))
    assert msg in str(e.value)
    assert pipe.loras.active == []


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
