"""The features a request can combine, as one table: what each sets on a ``GenerationRequest``, which
``pixsigma generate`` arguments say the same, what it needs of the pipeline (speed mode, T5 precision) and how
its use shows in the parameters a result records.

Read by the pair matrix (tests/test_compose.py), the CLI pairs on the demo (tests/test_cli_pairs.py) and the GPU
smoke run (bench/smoke.py), so a feature added here is exercised in every pair and every speed mode at once.
Features of one ``group`` exclude each other (one sampler, one speed mode, one edit per request). Also here: the
random ControlNet and LoRA those runs attach to a random DiT (bench and tests share them; tests import bench,
never the other way).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from pixsigma.config import KVCompress
from pixsigma.model.controlnet import ControlNet
from pixsigma.model.dit import PixArtDiT
from pixsigma.pipeline import GenerationRequest
from pixsigma.sampling import SAMPLERS

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")  # diffusers names, every block
GUIDANCE_INTERVAL = (0.0, 600.0)  # 2 steps run at t ≈ 999 and ≈ 500: one step guided, one not
IMG2IMG_STRENGTH = 0.75  # of 2 steps, one runs: the shortest edit schedule that still samples


@dataclass(frozen=True)
class Inputs:
    """What the features read besides the prompt: images at the output size, a LoRA, the KV override, scales.
    ``files`` (``save``): the same images as PNGs, for the command line."""

    width: int
    height: int
    lora: str  # a LoRA path, folder or shipped alias
    kv: KVCompress  # the 'kv' feature's override
    lora_scale: float = 1.0
    control_scale: float = 1.0
    control_type: str = "raw"
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def control_image(self) -> Image.Image:
        """A white rectangle outline on black (an edge map: ``raw`` reads it as it is)."""
        im = Image.new("RGB", (self.width, self.height), "black")
        w, h = self.width, self.height
        ImageDraw.Draw(im).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline="white", width=max(2, w // 32))
        return im

    @property
    def init_image(self) -> Image.Image:
        """A red square on white."""
        im = Image.new("RGB", (self.width, self.height), "white")
        w, h = self.width, self.height
        im.paste((220, 30, 30), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        return im

    @property
    def mask(self) -> Image.Image:
        """The left half white (repainted)."""
        im = Image.new("L", (self.width, self.height), 0)
        im.paste(255, (0, 0, self.width // 2, self.height))
        return im

    def save(self, folder: str | Path) -> Inputs:
        """These inputs with their images written as PNGs under ``folder`` (``files``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in ("control_image", "init_image", "mask"):
            files[name] = folder / f"{name}.png"
            getattr(self, name).save(files[name])
        return Inputs(self.width, self.height, self.lora, self.kv, self.lora_scale, self.control_scale,
                      self.control_type, files)


@dataclass(frozen=True)
class Feature:
    """One feature: ``request`` gives its GenerationRequest fields, ``cli`` its ``pixsigma generate``
    arguments, ``recorded`` whether result parameters show it (None: nothing to record, e.g. a speed mode)."""

    name: str
    group: str
    request: Callable[[Inputs], dict[str, Any]] = lambda i: {}
    cli: Callable[[Inputs], list[str]] = lambda i: []
    recorded: Callable[[dict[str, Any], Inputs], bool] | None = None
    speed: str = "eager"  # pixsigma.speed mode the pipeline's DiT runs in
    t5: str | None = None  # T5 precision the pipeline loads (from_pretrained's t5_precision)
    images: int = 1  # images per prompt
    cuda_only: bool = False


def _kv_args(kv: KVCompress) -> list[str]:
    if not kv.active:
        return ["--kv-compress", "1"]
    return ["--kv-compress", str(kv.ratio), "--kv-layers", ",".join(map(str, kv.layers)), "--kv-operator", kv.operator]


def _sampler(name: str) -> Feature:
    return Feature(f"sampler-{name}", "sampler", lambda i: {"sampler": name}, lambda i: ["--sampler", name],
                   lambda p, i: p["sampler"] == name)


def _speed(mode: str) -> Feature:
    return Feature(f"speed-{mode}", "speed", cli=lambda i: ["--speed", mode], speed=mode, cuda_only=mode == "graphs")


FEATURES: tuple[Feature, ...] = (
    Feature("controlnet", "control",
            lambda i: {"control_image": i.control_image, "control_type": i.control_type,
                       "control_scale": i.control_scale},
            lambda i: ["--control", str(i.files["control_image"]), "--control-type", i.control_type,
                       "--control-scale", str(i.control_scale)],
            lambda p, i: p.get("control") == {"type": i.control_type, "scale": i.control_scale}),
    Feature("lora", "lora", lambda i: {"loras": f"{i.lora}:{i.lora_scale}"},
            lambda i: ["--lora", f"{i.lora}:{i.lora_scale}"],
            lambda p, i: [float(x["scale"]) for x in p.get("loras", [])] == [i.lora_scale]),
    Feature("img2img", "edit", lambda i: {"init_image": i.init_image, "strength": IMG2IMG_STRENGTH},
            lambda i: ["--init-image", str(i.files["init_image"]), "--strength", str(IMG2IMG_STRENGTH)],
            lambda p, i: p.get("edit") == {"mode": "img2img", "strength": IMG2IMG_STRENGTH}),
    Feature("inpaint", "edit", lambda i: {"init_image": i.init_image, "mask": i.mask},
            lambda i: ["--init-image", str(i.files["init_image"]), "--mask", str(i.files["mask"])],
            lambda p, i: p.get("edit", {}).get("mode") == "inpaint"),
    Feature("kv", "kv", lambda i: {"kv": i.kv},
            lambda i: _kv_args(i.kv),
            lambda p, i: p["kv_compress"] == {"ratio": i.kv.ratio, "layers": list(i.kv.layers),
                                              "operator": i.kv.operator}),
    Feature("interval", "interval", lambda i: {"guidance_interval": GUIDANCE_INTERVAL},
            lambda i: ["--guidance-interval", *(str(t) for t in GUIDANCE_INTERVAL)],
            lambda p, i: p.get("guidance_interval") == list(GUIDANCE_INTERVAL)),
    *(_sampler(s) for s in SAMPLERS if s != "default"),
    Feature("images-2", "images", lambda i: {"num_images": 2}, lambda i: ["--num-images", "2"], images=2),
    *(_speed(m) for m in ("sdpa", "compile", "graphs")),
    Feature("t5-int8", "t5", cli=lambda i: ["--t5", "int8"], recorded=lambda p, i: p.get("t5") == "int8",
            t5="int8"),
)
BY_NAME = {f.name: f for f in FEATURES}


def features_for(device: torch.device | str) -> tuple[Feature, ...]:
    """The features that run on ``device`` (CUDA graphs only on CUDA)."""
    cuda = torch.device(device).type == "cuda"
    return tuple(f for f in FEATURES if cuda or not f.cuda_only)


def pairs(features: Iterable[Feature]) -> list[tuple[Feature, Feature]]:
    """Every unordered pair of features that can share a request (different groups)."""
    return [(a, b) for a, b in itertools.combinations(features, 2) if a.group != b.group]


def pair_id(combo: Iterable[Feature]) -> str:
    return "+".join(f.name for f in combo) or "plain"


def request_for(combo: Iterable[Feature], inputs: Inputs, **base: Any) -> GenerationRequest:
    """The request that turns on every feature of ``combo`` over ``base`` fields (a field two features set
    differently is refused: they are not a pair)."""
    fields: dict[str, Any] = {}
    for f in combo:
        for k, v in f.request(inputs).items():
            if k in fields:
                raise ValueError(f"features set {k!r} twice; {pair_id(combo)} is not a pair")
            fields[k] = v
    return GenerationRequest(**{**base, **fields})


def cli_args(combo: Iterable[Feature], inputs: Inputs) -> list[str]:
    """The ``pixsigma generate`` arguments of ``combo`` (``inputs.files`` must be saved)."""
    return [a for f in combo for a in f.cli(inputs)]


def pipeline_needs(combo: Iterable[Feature]) -> tuple[str, str | None]:
    """(speed mode, T5 precision) the pipeline must run ``combo`` with."""
    combo = list(combo)
    speed = next((f.speed for f in combo if f.speed != "eager"), "eager")
    t5 = next((f.t5 for f in combo if f.t5 is not None), None)
    return speed, t5


def images_per_prompt(combo: Iterable[Feature]) -> int:
    return max([f.images for f in combo], default=1)


def unrecorded(combo: Iterable[Feature], params: dict[str, Any], inputs: Inputs) -> list[str]:
    """The features of ``combo`` whose use the result ``params`` fail to record."""
    return [f.name for f in combo if f.recorded is not None and not f.recorded(params, inputs)]


# -- random adapters for random DiTs ------------------------------------------------------------------------------
@torch.no_grad()
def random_controlnet(dit: PixArtDiT, seed: int = 0, scale: float = 0.05) -> ControlNet:
    """A ControlNet for ``dit`` with every weight moved away from its init (the zero projections of a fresh one
    would make it a no-op and every comparison pass)."""
    net = ControlNet.from_base(dit)
    device = next(net.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where it lives: an XL one has 0.3 B weights
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * scale)
    return net.eval()


def random_lora(dit: PixArtDiT, path: str | Path, rank: int = 4, seed: int = 0, scale: float = 1.0) -> Path:
    """A LoRA file for ``dit`` in diffusers' layout (``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight``,
    no alpha: scale 1) on ``LORA_TARGETS`` of every block, both factors random so it changes the output."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = dit.config.hidden_size
    tensors = {}
    for i in range(dit.config.depth):
        for target in LORA_TARGETS:
            key = f"transformer.transformer_blocks.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d, generator=gen) * scale / d**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d, rank, generator=gen) * scale
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path
