"""The demo ControlNet: shapes-world edge maps for the shipped Σ, its training data, its training and its
ShapesBench evaluation (each held-out prompt also gets its real scene's Canny edge map as control).

python -m shapes.controlnet_demo --out assets/demo/sigma/controlnet --minutes 20 --eval 64
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

from pixsigma.control import canny, control_latent
from pixsigma.controlnet_weights import save_controlnet
from pixsigma.model.controlnet import ControlNet, controlled_forward
from pixsigma.pipeline import PixSigmaPipeline
from pixsigma.registry import MODEL_ALIASES
from pixsigma.sampling import decode, denoise, initial_noise, make_scheduler, to_pil
from shapes.shapesbench import bench_items, detect, score
from shapes.world import long_caption, parse_prompt, render, sample_scene, scene_rng
from train.controlnet import controlnet_losses, make_trainable, param_groups
from train.diffusion import GaussianDiffusion

Tensor = torch.Tensor
SIZE = 256  # the shipped Σ's base resolution: the copies are conditioned where the base was trained


@dataclass(frozen=True)
class DemoSpec:
    n_train: int = 2048
    batch: int = 16
    lr: float = 2e-4
    proj_lr: float = 1e-3  # zero-initialised projections: a higher rate gets the residuals going sooner
    copies: int = 4
    drop_caption: float = 0.1
    # half of each batch at high noise, where layout is decided (what a control map mostly says)
    timestep_band: tuple[int, int, float] | None = (500, 999, 0.5)
    seed: int = 0


def edge_map(scene, size: int = SIZE) -> Image.Image:
    return canny(render(scene, size, size))


@torch.no_grad()
def training_set(pipe: PixSigmaPipeline, n: int, seed: int = 0, size: int = SIZE, chunk: int = 32) -> dict:
    """x0 and control latents, T5 features and masks of ``n`` training-domain scenes (dense captions)."""
    scale = float(pipe.vae.config.scaling_factor)
    xs, cs, ys, ms = [], [], [], []
    for start in range(0, n, chunk):
        scenes = [sample_scene(scene_rng("train", seed, i)) for i in range(start, min(n, start + chunk))]
        images = [render(s, size, size) for s in scenes]
        from pixsigma.sampling import from_pil

        xs.append(pipe.vae.encode(from_pil(images)).latent_dist.mean * scale)
        cs.append(control_latent(pipe.vae, [canny(im) for im in images]))
        y, m, _ = pipe.encode_prompts([long_caption(s) for s in scenes])
        ys.append(y)
        ms.append(m)
    return {"x0": torch.cat(xs), "control": torch.cat(cs), "y": torch.cat(ys), "mask": torch.cat(ms)}


def train(pipe: PixSigmaPipeline, data: dict, spec: DemoSpec, seconds: float, log=print) -> tuple[ControlNet, dict]:
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
        if step % 25 == 0 or step == 3:
            log(f"step {step} loss {np.mean(losses[-25:]):.4f} {time.perf_counter() - start:.0f}s")
    net.eval()
    info = {"steps": step, "seconds": round(time.perf_counter() - start), "final_loss": float(np.mean(losses[-50:]))}
    return net, info


@torch.no_grad()
def generate(pipe: PixSigmaPipeline, net: ControlNet | None, prompts: list[str], controls: list[Image.Image] | None,
             scale: float, seed: int) -> list[Image.Image]:
    """One image per prompt, each with its own control map (the pipeline takes one per request), folder settings."""
    guidance, steps = pipe.resolve_sampling(pipe_request(prompts))
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
    return to_pil(decode(pipe.vae, lat))


def pipe_request(prompts: list[str]):
    from pixsigma.pipeline import GenerationRequest

    return GenerationRequest(prompts)


def evaluate(pipe: PixSigmaPipeline, net: ControlNet | None, n: int, scales: tuple[float, ...], batch: int = 8,
             seed: int = 0) -> dict[str, dict]:
    """ShapesBench position/count/attribute over the first ``n`` prompts: without control (``none``), and with
    each prompt's real scene's edge map at each scale."""
    items = bench_items(n)
    out: dict[str, dict] = {}
    for scale in (None, *scales):
        rows = []
        for b, s in enumerate(range(0, n, batch)):
            chunk = items[s:s + batch]
            controls = None if scale is None else [edge_map(it.scene) for it in chunk]
            images = generate(pipe, net, [it.prompt for it in chunk], controls, scale or 0.0, seed + b)
            for it, im in zip(chunk, images):
                dets = detect(im)
                row = score(dets, parse_prompt(it.prompt))  # adherence to the prompt
                scene = score(dets, parse_prompt(long_caption(it.scene)))  # to the scene the control map shows
                rows.append({**row, "scene_position": scene["position"], "scene_count": scene["count"]})
        key = "none" if scale is None else f"scale {scale:g}"
        out[key] = {m: float(np.mean([r[m] for r in rows if r[m] is not None])) for m in
                    ("position", "count", "attribute", "colour", "shape", "scene_position", "scene_count")}
        out[key]["n"] = n
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--n-train", type=int, default=DemoSpec.n_train)
    p.add_argument("--batch", type=int, default=DemoSpec.batch)
    p.add_argument("--lr", type=float, default=DemoSpec.lr)
    p.add_argument("--proj-lr", type=float, default=DemoSpec.proj_lr)
    p.add_argument("--copies", type=int, default=DemoSpec.copies)
    p.add_argument("--eval", type=int, default=32, help="bench prompts to evaluate (0: none)")
    p.add_argument("--scales", default="0.5,1,1.5,2")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16")
    p.add_argument("--data", help="a .pt file of the training tensors: read if it exists, else written")
    a = p.parse_args(argv)
    spec = DemoSpec(a.n_train, a.batch, a.lr, a.proj_lr, a.copies)
    pipe = PixSigmaPipeline.from_pretrained(str(MODEL_ALIASES["demo"]), device="cpu", dtype="fp32",
                                            controlnet=None)
    pipe.controlnet = None
    t0 = time.perf_counter()
    if a.data and Path(a.data).is_file():
        data = torch.load(a.data, weights_only=True)
    else:
        data = training_set(pipe, spec.n_train, spec.seed)
        if a.data:
            torch.save(data, a.data)
    print(f"data {spec.n_train} in {time.perf_counter() - t0:.0f}s", flush=True)
    net, info = train(pipe, data, spec, a.minutes * 60, log=lambda s: print(s, flush=True))
    scales = tuple(float(s) for s in a.scales.split(","))
    metrics = evaluate(pipe, net, a.eval, scales) if a.eval else {}
    print(json.dumps(metrics, indent=1), flush=True)
    meta = {"train": {**asdict(spec), **info, "control_type": "canny", "size": SIZE}, "shapesbench": metrics}
    save_controlnet(net, a.out, torch.float16 if a.fp16 else None, extra=meta)


if __name__ == "__main__":
    main()
