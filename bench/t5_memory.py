"""``python -m bench.t5_memory``: T5's memory and embeddings at each ``--t5`` precision.

Measured on the demo's T5 (``assets/demo/sigma/text_encoder``, loaded by ``pixsigma.t5.load_t5`` on the CPU):
parameter + buffer memory of fp32, bf16 and int8 (weight-only, torchao), and the cosine similarity of each
one's per-token embeddings to bf16's and fp32's over a fixed prompt set (padding excluded). For T5-XXL
(PixArt-Σ's encoder) the memory is **computed** from its parameter count (the model built on the meta device,
no weights) and the bytes each precision stores — the same formula, checked here against the demo's measured
bytes. Results: ``bench/results/t5_memory.json`` and ``.md``, with the machine beside them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "assets" / "demo" / "sigma"
# The demo's vocabulary: short prompts as typed, and the dense captions its expander writes.
PROMPTS = (
    "a red star", "two blue circles", "a small green triangle above a large yellow square",
    "three pink rings on a plain cream background", "a purple cross left of an orange star",
    "four shapes", "a black ring in the middle", "a grey square at the top right and a mint circle at the bottom left",
    "a picture of a big white star on a plain lilac background",
    "one medium brown triangle in the centre, one small red circle at the top left, one large blue square at the "
    "bottom right, on a plain grey background",
    "two stars and a ring", "a tiny yellow circle next to a huge green cross",
    "an image with many colourful objects", "a red circle below a blue ring",
    "the top left is a small orange square, the bottom is a large purple star",
    "a photo of five little pink crosss",
)
# google/t5-v1_1-xxl's encoder, the text encoder of every released PixArt-Σ (its public config.json).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
INT8_PER_ROW = 1  # torchao Int8Tensor: one int8 zero point per output row, beside its scale (compute dtype)
GB = 1e9
IMAGE_PROMPT, IMAGE_SEED = "a red star above a blue ring", 7  # the README's demo image


def _psnr(a, b) -> float | None:
    """PSNR in dB of two same-size images (None: identical)."""
    import numpy as np

    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return None if mse == 0 else round(10 * np.log10(255**2 / mse), 2)


def images() -> dict:
    """The demo Σ's 256 px image (its own steps and guidance) with T5 at each precision, PSNR to fp32 T5's."""
    from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
    from pixsigma.t5 import T5_PRECISIONS

    req = GenerationRequest(IMAGE_PROMPT, seed=IMAGE_SEED)
    out = {p: PixSigmaPipeline.from_pretrained("demo", device="cpu", t5_precision=p).generate(req).images[0]
           for p in T5_PRECISIONS}
    return {"prompt": IMAGE_PROMPT, "seed": IMAGE_SEED,
            "psnr_to_fp32_db": {p: _psnr(im, out["fp32"]) for p, im in out.items()}}


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Linear weight elements, their output rows, and every other parameter element (tied tensors once)."""
    linear = rows = other = 0
    seen: set[int] = set()
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, torch.nn.Linear) and name == "weight":
                linear, rows = linear + p.numel(), rows + p.shape[0]
            else:
                other += p.numel()
    return {"linear": linear, "rows": rows, "other": other, "total": linear + other}


def computed_bytes(counts: dict[str, int], precision: str, compute_bytes: int) -> int:
    """Bytes a precision stores: fp32 4 and bf16 2 per element; int8 one per linear weight plus a scale
    (``compute_bytes``) and a zero point per output row, everything else in the compute dtype."""
    if precision == "fp32":
        return 4 * counts["total"]
    if precision == "bf16":
        return 2 * counts["total"]
    return counts["linear"] + counts["rows"] * (compute_bytes + INT8_PER_ROW) + counts["other"] * compute_bytes


def t5_xxl() -> dict:
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**T5_XXL))
    counts = count_params(model)
    return {"config": T5_XXL, "params": counts,
            "bytes": {p: computed_bytes(counts, p, 2) for p in ("fp32", "bf16", "int8")},
            "note": "computed from the parameter count (meta device) and bytes per element; int8 in a bf16 "
                    "pipeline (scales and non-linear weights in bf16); not measured"}


def _cosines(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)[mask.bool()]
    return {"mean": round(cos.mean().item(), 6), "min": round(cos.min().item(), 6)}


def demo() -> dict:
    from transformers import AutoTokenizer

    from pixsigma.t5 import T5_PRECISIONS, load_t5, module_bytes, quantised_linears
    from pixsigma.text import encode_text

    tok = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    emb, rows = {}, {}
    counts = count_params(load_t5(DEMO / "text_encoder", "fp32", torch.float32, torch.device("cpu")))
    for p in T5_PRECISIONS:
        model = load_t5(DEMO / "text_encoder", p, torch.float32, torch.device("cpu"))
        e, mask = encode_text(tok, model, list(PROMPTS), 300, pad_to_max=False)
        emb[p] = e
        rows[p] = {"bytes": module_bytes(model), "computed_bytes": computed_bytes(counts, p, 4),
                   "quantised_linears": len(quantised_linears(model)),
                   "dtype": str(next(iter(model.state_dict().values())).dtype).removeprefix("torch.")}
    for p in T5_PRECISIONS:
        rows[p]["cosine_to_bf16"] = _cosines(emb[p], emb["bf16"], mask)
        rows[p]["cosine_to_fp32"] = _cosines(emb[p], emb["fp32"], mask)
    return {"model": str(DEMO.relative_to(REPO) / "text_encoder"), "params": counts, "prompts": len(PROMPTS),
            "tokens": int(mask.sum()), "compute_dtype": "float32 (int8: weights int8, scales float32)",
            "precisions": rows}


def render(r: dict) -> str:
    env, d, x = r["environment"], r["demo"], r["t5_xxl"]
    lines = [
        "# `python -m bench.t5_memory`: T5 at each `--t5` precision", "",
        f"Measured {r['measured_at']}: `{r['command']}`", "",
        "| device | CPU | CPU count | torch | torchao | transformers | python |", "|---|---|---|---|---|---|---|",
        f"| {env['device_type']} | {env.get('device_name', '')} | {env['cpu_count']} | {env['torch']} | "
        f"{r['torchao']} | {env['transformers']} | {env['python']} |", "",
        f"**Measured** on the demo T5 (`{d['model']}`, {d['params']['total']:,} parameters, "
        f"{d['params']['linear']:,} of them in linear layers), on the CPU, computing in fp32; cosine similarity "
        f"of per-token embeddings over {d['prompts']} fixed prompts ({d['tokens']} tokens, padding excluded), "
        "mean / min:", "",
        "| `--t5` | parameter + buffer memory | computed (formula below) | linears in 8 bits | cosine to bf16 | "
        "cosine to fp32 |", "|---|---|---|---|---|---|",
    ]
    for p, row in d["precisions"].items():
        cb, cf = row["cosine_to_bf16"], row["cosine_to_fp32"]
        lines.append(f"| {p} | {row['bytes'] / 2**20:.3f} MiB ({row['bytes']:,} B) | {row['computed_bytes']:,} B "
                     f"| {row['quantised_linears']} | {cb['mean']:.6f} / {cb['min']:.6f} | "
                     f"{cf['mean']:.6f} / {cf['min']:.6f} |")
    b = x["bytes"]
    lines += [
        "", f"**Computed, not measured**: T5-XXL (google/t5-v1_1-xxl's encoder, {x['params']['total'] / 1e9:.3f}B "
        f"parameters, {x['params']['linear'] / 1e9:.3f}B in linear layers; built on the meta device, no weights). "
        "fp32 4 bytes and bf16 2 bytes per parameter; int8: 1 byte per linear weight + a bf16 scale and an int8 "
        "zero point per output row, embeddings and norms in bf16.", "",
        "| `--t5` | T5-XXL memory (GB = 10⁹ B) |", "|---|---|",
        *[f"| {p} | {v / GB:.2f} GB |" for p, v in b.items()], "",
        f"int8 / bf16 = {b['int8'] / b['bf16']:.3f}. " + (
            "The formula reproduces the demo's measured bytes exactly (table above), which is what the T5-XXL "
            "figures rest on." if all(row["bytes"] == row["computed_bytes"] for row in d["precisions"].values())
            else "**The formula does not reproduce the demo's measured bytes** (table above): the T5-XXL figures "
            "are approximate."), "",
        f"**Measured**: the demo Σ's image of \"{r['images']['prompt']}\" (seed {r['images']['seed']}, 256 px, its "
        "own steps and guidance, fp32 DiT) with T5 at each precision; PSNR to the image with fp32 T5 "
        "(∞: identical):", "",
        "| `--t5` | PSNR to fp32 T5 |", "|---|---|",
        *[f"| {p} | {'∞' if v is None else f'{v} dB'} |" for p, v in r["images"]["psnr_to_fp32_db"].items()], "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.t5_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    import importlib.metadata

    from bench.measure import environment
    from pixsigma.io import atomic_write

    torch.set_num_threads(args.threads)
    result = {"command": shlex.join(["python", "-m", "bench.t5_memory", *(sys.argv[1:] if argv is None else argv)]),
              "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "environment": environment(torch.device("cpu")), "torchao": importlib.metadata.version("torchao"),
              "demo": demo(), "images": images(), "t5_xxl": t5_xxl()}
    json_path, md_path = args.out / "t5_memory.json", args.out / "t5_memory.md"
    atomic_write(json_path, lambda t: Path(t).write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(md_path, lambda t: Path(t).write_text(render(result)))
    print(render(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
