"""The demo ControlNet: shapes-world control maps for the shipped Σ, its training data, its training and its
ShapesBench evaluation (each held-out prompt also gets its real scene's control map).

At generation time the demo's prompt expander gives a short prompt an invented layout, which the control map then
contradicts; so half of the training scenes with one or two objects read that rewrite of their short caption
instead of their own dense caption, and the copies learn that the control map, not the text, decides the layout.

python -m shapes.controlnet_demo --out assets/demo/sigma/controlnet --control-type canny --minutes 20 --eval 64
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixsigma.control import CONDITION_MAKERS, control_latent
from pixsigma.controlnet_weights import save_controlnet
from pixsigma.layout import CHECKOUT
from pixsigma.model.controlnet import ControlNet, controlled_forward
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.registry import MODEL_ALIASES
from pixsigma.sampling import decode, denoise, from_pil, initial_noise, make_scheduler, to_pil

from .prompts import expand_prompt
from .shapesbench import bench_items, detect, score
from .world import long_caption, parse_prompt, render, sample_scene, scene_rng, short_caption

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.controlnet import check_train_control_type, controlnet_losses, make_trainable, param_groups
    from train.diffusion import GaussianDiffusion
else:
    from pixsigma.train.controlnet import check_train_control_type, controlnet_losses, make_trainable, param_groups
    from pixsigma.train.diffusion import GaussianDiffusion

Tensor = torch.Tensor
SIZE = 256  # the shipped Σ's base resolution: the copies are conditioned where the base was trained
METRICS = ("position", "count", "attribute", "colour", "shape", "scene_position", "scene_count",
           "short_text_position", "short_scene_position")


@dataclass(frozen=True)
class DemoSpec:
    control_type: str = "canny"
    n_train: int = 2048
    batch: int = 16
    lr: float = 2e-4
    proj_lr: float = 1e-3  # zero-initialised projections: a higher rate gets the residuals going sooner
    copies: int = 4
    drop_caption: float = 0.1
    expanded_share: float = 0.5  # of one- and two-object scenes: read the expander's rewrite of the short caption
    # half of each batch at high noise, where layout is decided (what a control map mostly says)
    timestep_band: tuple[int, int, float] | None = (500, 999, 0.5)
    seed: int = 0

    def __post_init__(self) -> None:
        check_train_control_type(self.control_type)
        if not 0 <= self.expanded_share <= 1:
            raise ValueError(f"expanded_share must be in [0, 1], got {self.expanded_share!r}")


def control_image(scene, kind: str, size: int = SIZE) -> Image.Image:
    """The control map of a scene: its ``kind`` map of the rendered image."""
    return CONDITION_MAKERS[kind](render(scene, size, size))


def training_caption(scene, index: int, spec: DemoSpec) -> str:
    """The dense caption, or (``expanded_share`` of one- and two-object scenes) the expander's rewrite of the
    short caption, which places the objects elsewhere than the control map shows."""
    rng = np.random.default_rng([spec.seed, index, 0xCA9])
    if len(scene.objects) <= 2 and rng.random() < spec.expanded_share:
        return expand_prompt(short_caption(scene), int(rng.integers(2**31)))
    return long_caption(scene)


@torch.no_grad()
def training_set(pipe: PixSigmaPipeline, spec: DemoSpec, domain: str = "train", size: int = SIZE,
                 chunk: int = 32) -> dict:
    """x0 and control latents, T5 features and masks of ``spec.n_train`` scenes of ``domain``."""
    scale = float(pipe.vae.config.scaling_factor)
    xs, cs, ys, ms = [], [], [], []
    for start in range(0, spec.n_train, chunk):
        idx = range(start, min(spec.n_train, start + chunk))
        scenes = [sample_scene(scene_rng(domain, spec.seed, i)) for i in idx]
        images = [render(s, size, size) for s in scenes]
        xs.append(pipe.vae.encode(from_pil(images)).latent_dist.mean * scale)
        cs.append(control_latent(pipe.vae, [CONDITION_MAKERS[spec.control_type](im) for im in images]))
        y, m, _ = pipe.encode_prompts([training_caption(s, i, spec) for s, i in zip(scenes, idx)])
        ys.append(y)
        ms.append(m)
    return {"x0": torch.cat(xs), "control": torch.cat(cs), "y": torch.cat(ys), "mask": torch.cat(ms)}


@torch.no_grad()
def control_gap(base, net: ControlNet, diffusion: GaussianDiffusion, data: dict, t: int = 800) -> dict[str, float]:
    """Held-out MSE at timestep ``t`` with each scene's own control map and with another scene's: the ControlNet
    reads its control where the own map gives the lower loss."""
    g = torch.Generator().manual_seed(0)
    x0 = data["x0"]
    noise = torch.randn(x0.shape, generator=g)
    tt = torch.full((x0.shape[0],), t)
    xt = diffusion.q_sample(x0, tt, noise)

    def mse(control: Tensor | None) -> float:
        out = controlled_forward(base, net, xt, tt, data["y"], data["mask"], control, 1.0)
        return float(diffusion.training_losses(out, x0, xt, tt, noise)["mse"].mean())

    return {"base": mse(None), "own": mse(data["control"]), "other": mse(data["control"].roll(1, 0))}


def train(pipe: PixSigmaPipeline, data: dict, spec: DemoSpec, seconds: float, held_out: dict | None = None,
          log=print) -> tuple[ControlNet, dict]:
    torch.manual_seed(spec.seed)
    base = pipe.transformer
    net = make_trainable(base, spec.copies)
    net.train()
    opt = torch.optim.AdamW(param_groups(net, spec.lr, spec.proj_lr), weight_decay=0.0)
    diffusion = GaussianDiffusion(prediction_type=base.config.prediction_type, timestep_band=spec.timestep_band)
    y_null, m_null, _ = pipe.encode_prompts([""])
    n = data["x0"].shape[0]
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, n, (spec.batch,))
        y, mask = data["y"][idx], data["mask"][idx]
        drop = torch.rand(spec.batch) < spec.drop_caption
        y = torch.where(drop[:, None, None], y_null.expand_as(y), y)
        mask = torch.where(drop[:, None], m_null.expand_as(mask), mask)
        loss = controlnet_losses(base, net, diffusion, data["x0"][idx], data["control"][idx], y, mask)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0 or step == 3:
            gap = "" if held_out is None else " held-out " + json.dumps(
                {k: round(v, 4) for k, v in control_gap(base, net, diffusion, held_out).items()})
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - start:.0f}s{gap}")
    net.eval()
    info = {"steps": step, "seconds": round(time.perf_counter() - start), "final_loss": float(np.mean(losses[-50:]))}
    if held_out is not None:
        info["held_out_mse_t800"] = control_gap(base, net, diffusion, held_out)
    return net, info


@torch.no_grad()
def generate(pipe: PixSigmaPipeline, net: ControlNet | None, prompts: list[str], controls: list[Image.Image] | None,
             scale: float, seed: int) -> tuple[list[Image.Image], list[str]]:
    """(one image per prompt, each with its own control map (the pipeline takes one per request), the prompts
    the model read), folder settings."""
    guidance, steps = pipe.resolve_sampling(GenerationRequest(prompts))
    read = pipe.expand(prompts, seed)
    cond, cmask, _ = pipe.encode_prompts(read)
    uncond, umask, _ = pipe.encode_prompts([""] * len(read))
    y, mask = torch.cat([uncond, cond]), torch.cat([umask, cmask])
    base = pipe.transformer
    sched = make_scheduler(None, pipe.scheduler_config, base.config.prediction_type)
    lat, gen = initial_noise((len(prompts), 4, SIZE // 8, SIZE // 8), seed, pipe.device, pipe.dtype,
                             sched.init_noise_sigma)
    c = None if controls is None or net is None else control_latent(pipe.vae, controls)
    c = None if c is None else torch.cat([c, c])  # both guidance halves get the same control

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if c is None:
            return base(x, t, y, mask)
        return controlled_forward(base, net, x, t, y, mask, c, scale)

    lat = denoise(model_fn, sched, lat, steps, guidance, gen, None, base.config.learn_sigma)
    return to_pil(decode(pipe.vae, lat)), read


def _row(image: Image.Image, prompt: str, read: str, scene, style: str) -> dict:
    dets = detect(image)
    row = score(dets, parse_prompt(prompt))  # adherence to the prompt
    on_scene = score(dets, parse_prompt(long_caption(scene)))  # to the scene the control map shows
    row.update(scene_position=on_scene["position"], scene_count=on_scene["count"],
               short_text_position=None, short_scene_position=None)
    if style == "short":  # the expander invented a layout: does the image follow it, or the control map?
        row.update(short_text_position=score(dets, parse_prompt(read))["position"],
                   short_scene_position=on_scene["position"])
    return row


def _mean(rows: list[dict], n: int) -> dict:
    out = {m: float(np.mean(v)) if (v := [r[m] for r in rows if r[m] is not None]) else None for m in METRICS}
    return {**out, "n": n}


@torch.no_grad()
def vae_ceiling(pipe: PixSigmaPipeline, n: int) -> dict:
    """The metrics of the real scenes through the VAE (encode, decode): what a perfect model could score."""
    rows = []
    scale = float(pipe.vae.config.scaling_factor)
    for it in bench_items(n):
        image = render(it.scene, SIZE, SIZE)
        lat = pipe.vae.encode(from_pil([image])).latent_dist.mean * scale
        rows.append(_row(to_pil(decode(pipe.vae, lat))[0], it.prompt, long_caption(it.scene), it.scene, "long"))
    return _mean(rows, n)


def evaluate(pipe: PixSigmaPipeline, net: ControlNet | None, n: int, scales: tuple[float, ...], kind: str,
             batch: int = 8, seed: int = 0) -> dict[str, dict]:
    """ShapesBench over the first ``n`` prompts: without control (``none``), and with each prompt's real scene's
    ``kind`` map at each scale; ``scene_*`` score the image against that scene, ``short_*`` (short prompts only,
    whose layout the expander invents) its positions against the text read and against the control's scene."""
    items = bench_items(n)
    out: dict[str, dict] = {}
    for scale in (None, *scales):
        rows = []
        for b, s in enumerate(range(0, n, batch)):
            chunk = items[s:s + batch]
            controls = None if scale is None else [control_image(it.scene, kind) for it in chunk]
            images, read = generate(pipe, net, [it.prompt for it in chunk], controls, scale or 0.0, seed + b)
            rows += [_row(im, it.prompt, r, it.scene, it.style) for it, im, r in zip(chunk, images, read)]
        out["none" if scale is None else f"scale {scale:g}"] = _mean(rows, n)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--control-type", default=DemoSpec.control_type)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--n-train", type=int, default=DemoSpec.n_train)
    p.add_argument("--batch", type=int, default=DemoSpec.batch)
    p.add_argument("--lr", type=float, default=DemoSpec.lr)
    p.add_argument("--proj-lr", type=float, default=DemoSpec.proj_lr)
    p.add_argument("--copies", type=int, default=DemoSpec.copies)
    p.add_argument("--expanded-share", type=float, default=DemoSpec.expanded_share)
    p.add_argument("--eval", type=int, default=32, help="bench prompts to evaluate (0: none)")
    p.add_argument("--scales", default="0.5,1,1.5,2")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16")
    p.add_argument("--data", help="a .pt file of the training tensors: read if it exists, else written")
    p.add_argument("--resume", action="store_true", help="evaluate the ControlNet already in --out (no training)")
    a = p.parse_args(argv)
    spec = DemoSpec(a.control_type, a.n_train, a.batch, a.lr, a.proj_lr, a.copies, expanded_share=a.expanded_share)
    pipe = PixSigmaPipeline.from_pretrained(str(MODEL_ALIASES["demo"]), device="cpu", dtype="fp32",
                                            controlnet=a.out if a.resume else None)
    scales = tuple(float(s) for s in a.scales.split(","))
    if a.resume:
        net, pipe.controlnet = pipe.controlnet, None
        meta = json.loads((Path(a.out) / "controlnet.json").read_text())
        metrics = evaluate(pipe, net, a.eval, scales, meta["train"]["control_type"]) if a.eval else {}
        metrics["vae ceiling"] = vae_ceiling(pipe, a.eval)
        print(json.dumps(metrics, indent=1), flush=True)
        meta["shapesbench"] = metrics
        save_controlnet(net, a.out, torch.float16 if a.fp16 else None, extra={k: v for k, v in meta.items()
                                                                             if k != "controlnet"})
        return
    pipe.controlnet = None
    t0 = time.perf_counter()
    if a.data and Path(a.data).is_file():
        data = torch.load(a.data, weights_only=True)
    else:
        data = training_set(pipe, spec)
        if a.data:
            torch.save(data, a.data)
    held = training_set(pipe, DemoSpec(spec.control_type, 32, seed=spec.seed), "heldout")
    print(f"data {spec.n_train} in {time.perf_counter() - t0:.0f}s", flush=True)
    net, info = train(pipe, data, spec, a.minutes * 60, held, log=lambda s: print(s, flush=True))
    meta = {"control_type": spec.control_type,
            "train": {**asdict(spec), **info, "size": SIZE}}
    save_controlnet(net, a.out, torch.float16 if a.fp16 else None, extra=meta)  # kept even if evaluation stops
    metrics = evaluate(pipe, net, a.eval, scales, spec.control_type) if a.eval else {}
    print(json.dumps(metrics, indent=1), flush=True)
    save_controlnet(net, a.out, torch.float16 if a.fp16 else None, extra={**meta, "shapesbench": metrics})


if __name__ == "__main__":
    main()
