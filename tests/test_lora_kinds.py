"""LoHa and LoKr files (LyCORIS and PEFT layouts) equal peft's own tuners on diffusers' transformer; text-encoder
keys equal peft on T5 in every layout, or are skipped with one counted warning."""

import json

import pytest
import torch
from lora_files import TE_PREFIX, dit_tensors, te_tensors, write
from safetensors.torch import save_file

from pixsigma.lora import LoraSpec, LoraStack
from pixsigma.weights import load_dit

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 16)


def _diffusers_out(model, x, t, y):
    return model(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                 return_dict=False)[0]


@pytest.fixture(scope="module", params=["loha", "lokr"])
def lycoris(request, tiny_pipeline):
    """(kind, diffusers' output with a random peft LoHa/LoKr, its peft state dict, r, alpha, the base output)."""
    from diffusers import PixArtTransformer2DModel
    from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model

    ref = PixArtTransformer2DModel.from_pretrained(tiny_pipeline / "transformer")
    x, t, y = _inputs()
    with torch.no_grad():
        base = _diffusers_out(ref, x, t, y)
    r, alpha = 2, 6.0
    config = (LoHaConfig if request.param == "loha" else LoKrConfig)(r=r, alpha=alpha, target_modules=TARGETS,
                                                                     init_weights=False)
    inject_adapter_in_model(config, ref)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.4)
        out = _diffusers_out(ref, x, t, y)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(ref).items()}
    return request.param, out, sd, r, alpha, base


@pytest.mark.parametrize("layout", ["lycoris", "peft"])
def test_loha_and_lokr_equal_peft_on_diffusers(tiny_pipeline, lycoris, layout, tmp_path):
    kind, ref, sd, r, alpha, base = lycoris
    if kind == "lokr":
        assert any(k.endswith("lokr_w2_a") for k in sd) and any(k.endswith("lokr_w1") for k in sd)
    modules = sorted({k.rsplit(".", 1)[0] for k in sd})
    if layout == "lycoris":  # LyCORIS: lora_unet_ + the path with underscores, '.alpha' per module
        tensors = {"lora_unet_" + k.rsplit(".", 1)[0].replace(".", "_") + "." + k.rsplit(".", 1)[1]: v
                   for k, v in sd.items()}
        tensors |= {"lora_unet_" + m.replace(".", "_") + ".alpha": torch.tensor(alpha) for m in modules}
        path = tmp_path / "lycoris.safetensors"
        save_file(tensors, path)
    else:  # PEFT save_pretrained: base_model.model. keys, r and alpha in adapter_config.json
        path = tmp_path / "peft"
        path.mkdir()
        save_file({f"base_model.model.{k}": v for k, v in sd.items()}, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": kind.upper(), "r": r, "alpha": alpha}))
    dit = load_dit(tiny_pipeline / "transformer")
    stack = LoraStack(dit)
    x, t, y = _inputs()
    with torch.no_grad():
        plain = dit(x, t, y)
        assert (plain - base).abs().max() <= 1e-5
        assert stack.set([LoraSpec(str(path), 1.0)]) == []
        ours = dit(x, t, y)
        assert (ref - base).abs().max() > 1e-2  # the adapter matters
        assert (ours - ref).abs().max() <= 1e-5, (ours - ref).abs().max()
        stack.fuse()
        assert (dit(x, t, y) - ref).abs().max() <= 1e-5
        stack.set([])
        assert not stack.fused or torch.equal(dit(x, t, y), plain)
        stack.unfuse()
        assert torch.equal(dit(x, t, y), plain)


def test_lora_and_loha_together_then_none(tiny_pipeline, lycoris, tmp_path):
    """Nested peft layers (a LoHa around a LoRA layer) add up, and taking both off gives the base back exactly."""
    kind, ref, sd, r, alpha, _ = lycoris
    path = tmp_path / "a.safetensors"
    save_file({"lora_unet_" + k.rsplit(".", 1)[0].replace(".", "_") + "." + k.rsplit(".", 1)[1]: v
               for k, v in sd.items()}, path)
    torch.manual_seed(3)
    lora = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 32),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 2)}
    save_file(lora, tmp_path / "l.safetensors")
    dit = load_dit(tiny_pipeline / "transformer")
    stack = LoraStack(dit)
    x, t, y = _inputs()
    with torch.no_grad():
        plain = dit(x, t, y)
        stack.set([LoraSpec(str(tmp_path / "l.safetensors"))])
        only_lora = dit(x, t, y) - plain
        stack.set([LoraSpec(str(path))])
        only_other = dit(x, t, y) - plain
        stack.set([LoraSpec(str(tmp_path / "l.safetensors")), LoraSpec(str(path))])
        both = dit(x, t, y)
        assert not torch.allclose(both, plain + only_other, atol=1e-4)  # both act
        stack.set([])
        assert torch.equal(dit(x, t, y), plain)
    assert only_lora.abs().max() > 1e-3


# -- text-encoder keys ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_lora(tiny_pipeline):
    """(T5's output with a random peft LoRA, its peft state dict, the input ids)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(tiny_pipeline / "text_encoder")
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=T5_TARGETS), t5)
    torch.manual_seed(9)
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
        ids = torch.tensor([[3, 5, 7, 2, 0]])
        out = t5(input_ids=ids).last_hidden_state
    return out, {k: v.detach().clone() for k, v in get_peft_model_state_dict(t5).items()}, ids


@pytest.mark.parametrize("layout", sorted(TE_PREFIX))
def test_text_encoder_keys_equal_peft_on_t5(pipe, t5_lora, layout, tmp_path):
    ref, sd, ids = t5_lora
    path = write(te_tensors(layout, sd), tmp_path, layout)
    pipe.set_loras([])
    with torch.no_grad():
        base = pipe.text_encoder(input_ids=ids).last_hidden_state
        before = pipe.encode_prompts(["a red star"])[0]
        assert pipe.set_loras(path) == []
        ours = pipe.text_encoder(input_ids=ids).last_hidden_state
        after = pipe.encode_prompts(["a red star"])[0]
        assert (ref - base).abs().max() > 1e-2 and (ours - ref).abs().max() <= 1e-5
        assert not torch.allclose(before, after)  # the prompt cache did not serve the stale encoding
        pipe.set_loras([])
        assert torch.equal(pipe.text_encoder(input_ids=ids).last_hidden_state, base)
        assert torch.equal(pipe.encode_prompts(["a red star"])[0], before)


def test_text_encoder_keys_naming_no_t5_module_are_counted_never_refusing(pipe, tiny_pipeline, t5_lora, tmp_path):
    from lora_files import pairs

    sd = t5_lora[1]
    dit_sd = {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 32) * 0.1,
              "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 2) * 0.1}
    tensors = dit_tensors("onetrainer_legacy", dit_sd, 2.0)
    a, b = next(iter(pairs(sd).values()))
    for i in (5, 6):  # blocks the tiny T5 does not have
        tensors[f"lora_te_encoder_block_{i}_layer_0_SelfAttention_q.lora_down.weight"] = a.clone()
        tensors[f"lora_te_encoder_block_{i}_layer_0_SelfAttention_q.lora_up.weight"] = b.clone()
        tensors[f"lora_te_encoder_block_{i}_layer_0_SelfAttention_q.alpha"] = torch.tensor(2.0)
    path = write(tensors, tmp_path, "onetrainer_legacy")
    warnings = pipe.set_loras(path)
    assert warnings == ["LoRA onetrainer_legacy.safetensors: 6 text-encoder key(s) match no module of this model's "
                        "T5 and were skipped (e.g. 'lora_te_encoder_block_5_layer_0_SelfAttention_q.alpha')"]
    assert pipe.loras.active == [(path, 1.0)]
    pipe.set_loras([])
    stack = LoraStack(load_dit(tiny_pipeline / "transformer"))  # no text encoder: every T5 key is skipped
    assert stack.set([LoraSpec(path)]) == ["LoRA onetrainer_legacy.safetensors: 6 text-encoder key(s) skipped (no "
                                           "text encoder to adapt; e.g. "
                                           "'lora_te_encoder_block_5_layer_0_SelfAttention_q.alpha')"]
    stack.set([])


def test_text_encoder_keys_on_an_8bit_t5(tiny_pipeline, t5_lora, tmp_path):
    from pixsigma.pipeline import PixSigmaPipeline

    pipe = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu", t5_precision="int8")
    path = write(te_tensors("onetrainer_omi", t5_lora[1]), tmp_path, "onetrainer_omi")
    with torch.no_grad():
        before = pipe.encode_prompts(["a red star"])[0]
        assert pipe.set_loras(path) == []
        assert (pipe.encode_prompts(["a red star"])[0] - before).abs().max() > 1e-2
        pipe.loras.fuse()  # the DiT's adapters only: T5's stay unmerged on 8-bit weights
        pipe.loras.unfuse()
        pipe.set_loras([])
        assert torch.equal(pipe.encode_prompts(["a red star"])[0], before)


def test_peft_failing_midway_leaves_the_model_as_it_was(tiny_pipeline, t5_lora, tmp_path, monkeypatch):
    """A DiT injection that fails after peft wrapped some Linears is undone; a T5 one is skipped with a warning."""
    from transformers import T5EncoderModel

    import pixsigma.lora_peft as lora_peft

    torch.manual_seed(1)
    first = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 32),
             "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 2)}
    save_file(first, tmp_path / "first.safetensors")
    second = {f"lora_unet_transformer_blocks_1_attn1_to_q.hada_{w}": torch.randn(*s) for w, s in
              (("w1_a", (32, 2)), ("w1_b", (2, 32)), ("w2_a", (32, 2)), ("w2_b", (2, 32)))}
    second |= {"lora_unet_transformer_blocks_1_attn1_to_k.lora_down.weight": torch.randn(2, 32),
               "lora_unet_transformer_blocks_1_attn1_to_k.lora_up.weight": torch.randn(32, 2)}
    second |= te_tensors("onetrainer_omi", t5_lora[1])
    save_file(second, tmp_path / "second.safetensors")
    dit = load_dit(tiny_pipeline / "transformer")
    t5 = T5EncoderModel.from_pretrained(tiny_pipeline / "text_encoder")
    stack = LoraStack(dit, t5)
    x, t, y = _inputs()
    real = lora_peft.inject

    def fail_after(model, adapter, kind, modules):
        real(model, adapter, kind, modules)
        if kind == "loha" or model is t5:
            raise RuntimeError("peft says no")

    with torch.no_grad():
        stack.set([LoraSpec(str(tmp_path / "first.safetensors"))])
        want, modules = dit(x, t, y), dict(dit.named_modules())
        monkeypatch.setattr(lora_peft, "inject", fail_after)
        with pytest.raises(ValueError, match="LoRA second: peft could not apply it to the DiT: peft says no"):
            stack.set([LoraSpec(str(tmp_path / "second.safetensors"))])
        assert torch.equal(dit(x, t, y), want) and dict(dit.named_modules()).keys() == modules.keys()
        assert stack.active == [(str(tmp_path / "first.safetensors"), 1.0)]
        second = {k: v for k, v in second.items() if "hada" not in k}
        save_file(second, tmp_path / "second.safetensors")
        warnings = stack.set([LoraSpec(str(tmp_path / "second.safetensors"))])
        assert warnings == ["LoRA second: its 6 text-encoder module(s) were skipped (RuntimeError: peft says no)"]
        assert not any("lora_" in n for n, _ in t5.named_modules())  # T5 is untouched
        assert not torch.equal(dit(x, t, y), want)
