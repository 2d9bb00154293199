"""T5 at a precision (``--t5 fp32|bf16|int8``): 8-bit weights through transformers' torchao integration, their
memory and embeddings against fp32, the option through the pipeline, CLI and app, and the offloaded T5's host
copy."""

import pytest
import torch

from pixsigma.cli import main as cli
from pixsigma.io import read_params
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.t5 import (
    T5_PRECISIONS,
    check_t5_precision,
    keep_on_host,
    load_t5,
    module_bytes,
    quantised_linears,
    to_device,
    to_host,
)

CPU = torch.device("cpu")
PROMPT = "a red star above a blue ring"


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A small gated-GELU T5 encoder (T5 v1.1's shape) saved with save_pretrained."""
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=40, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu")
    T5EncoderModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _embed(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()


def test_int8_quantises_every_linear_halves_memory_and_keeps_the_embeddings(t5_folder):
    models = {p: load_t5(t5_folder, p, torch.float32, CPU) for p in T5_PRECISIONS}
    linears = [n for n, m in models["fp32"].named_modules() if isinstance(m, torch.nn.Linear)]
    assert quantised_linears(models["int8"]) == linears and quantised_linears(models["fp32"]) == []
    assert models["bf16"].dtype == torch.bfloat16
    mem = {p: module_bytes(m) for p, m in models.items()}
    assert mem["int8"] < mem["bf16"] < mem["fp32"]
    assert mem["bf16"] * 2 == mem["fp32"]
    torch.manual_seed(1)
    ids = torch.randint(3, 40, (4, 12))
    mask = torch.ones_like(ids)
    mask[1:, 8:] = 0
    ref = _embed(models["fp32"], ids, mask)
    for p in ("bf16", "int8"):
        cos = torch.nn.functional.cosine_similarity(_embed(models[p], ids, mask), ref, dim=-1)[mask.bool()]
        assert cos.min() >= 0.99, (p, cos.min())


def test_unknown_precision_names_the_option_and_the_values(tiny_pipeline, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--t5 'int4'; accepted: fp32, bf16, int8"):
        check_t5_precision("int4")
    with pytest.raises(ValueError, match=r"--t5 'int4'"):
        PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu", t5_precision="int4")
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit):
        cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--t5", "int4", "--out", str(out)])
    err = capsys.readouterr().err
    assert "--t5" in err and "'fp32', 'bf16', 'int8'" in err and not out.exists()
    from pixsigma_ui import server

    with pytest.raises(SystemExit):
        server.parse_args(["--t5", "int4"])
    assert "--t5" in capsys.readouterr().err


def test_pipeline_cli_and_app_take_the_option(tiny_pipeline, tmp_path):
    pipe = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu", t5_precision="int8", offload_t5=True)
    assert pipe.t5_precision == "int8" and quantised_linears(pipe.text_encoder)
    res = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=0))
    assert res.params["t5"] == "int8"
    plain = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")
    assert "t5" not in plain.generate(GenerationRequest(PROMPT, steps=2, seed=0)).params
    out = tmp_path / "int8.png"
    assert cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--t5", "bf16", "--steps", "2", "--seed", "0",
                "--device", "cpu", "--out", str(out)]) == 0
    assert read_params(out)["t5"] == "bf16"
    from pixsigma_ui import server

    opts = server.parse_args(["--model", str(tiny_pipeline), "--alpha-model", "none", "--device", "cpu",
                              "--t5", "int8"])
    engine = server.load_engine(opts, None)
    assert engine.pipes["main"].t5_precision == "int8"


def test_offloaded_t5_host_copy_round_trip(monkeypatch, t5_folder):
    model = load_t5(t5_folder, "fp32", torch.float32, CPU)
    if not torch.cuda.is_available():  # no pinned memory without CUDA: the host copy is the model as it is
        assert keep_on_host(model) is model and not hasattr(model, "_pixsigma_host")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the path, with pinning refused
    before = {n: t for n, t in model.state_dict().items()}
    keep_on_host(model)
    host = [id(t) for *_, t in model._pixsigma_host]
    assert model.shared.weight is model.encoder.embed_tokens.weight
    to_device(model, CPU)
    assert model.shared.weight is model.encoder.embed_tokens.weight  # tied weights stay one tensor
    to_host(model)
    assert [id(getattr(o, k)[n]) for o, k, n, _ in model._pixsigma_host] == host  # the same tensors, no copy
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())

