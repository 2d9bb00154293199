"""The one training loop every stage runs (``accelerate``: one device, DDP, or FSDP from accelerate's config).

A step: per micro-batch, clean latents x0 and caption features (10% replaced by the null caption) ->
noise at a uniform timestep (or partly in ``timestep_band``) -> DiT -> ε MSE + learned-variance VLB;
after ``grad_accum`` micro-batches, clip, optimizer step, LR schedule, EMA. Checkpoints every ``save_every``
steps, on a stop request, and at the end; then the final export. Resuming restores everything a checkpoint
holds, so a resumed run continues exactly where the interrupted one was (same data order, same noise).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object, set_seed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from pixsigma.constants import FEW_STEP_SAMPLING
from pixsigma.folder_settings import SamplingDefaults
from pixsigma.io import atomic_write_text, save_png
from pixsigma.model.dit import PixArtDiT
from pixsigma.sampling import latent_rgb, to_pil

from .checkpoint import build_model, clean_partial, export_final, latest_checkpoint, save_checkpoint
from .config import TrainConfig
from .consistency import ConsistencyDistiller
from .controlnet import build_trainee, export_controlnet, optimizer_params
from .diffusion import GaussianDiffusion
from .features import open_features
from .lora import add_lora, export_lora
from .monitor import Monitor
from .optim import EMA, TrainState, build_optimizer, lr_schedule
from .runfiles import CONFIG, FINAL, SAMPLES, sample_name
from .runlock import acquire
from .sample import generate_latents, micro_kwargs, pad_tokens
from .sampler import BucketBatchSampler

Tensor = torch.Tensor


def drop_captions(y: Tensor, mask: Tensor, y_null: Tensor, mask_null: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Replace each caption by the null caption with probability ``p`` (classifier-free guidance training).
    y: (B, L, C), mask: (B, L); y_null: (1, L0, C)."""
    if p <= 0:
        return y, mask
    drop = torch.rand(y.shape[0], device=y.device) < p  # (B,)
    length = max(y.shape[1], y_null.shape[1])
    y, mask = pad_tokens(y, mask, length)
    y_null, mask_null = pad_tokens(y_null, mask_null, length)
    y_null, mask_null = y_null.to(y), mask_null.to(mask)
    return torch.where(drop[:, None, None], y_null, y), torch.where(drop[:, None], mask_null, mask)


def attention_kernels(device: torch.device, mixed_precision: str) -> AbstractContextManager:
    """SDPA kernels for training steps. On a CPU under bf16 autocast, torch's fused CPU attention kernel runs
    its bf16 backward far slower than the plain matmul path, so there the math kernel is used; elsewhere torch
    picks."""
    if device.type == "cpu" and mixed_precision == "bf16":
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


class Trainer:
    """Holds one run's objects; ``run()`` trains to ``cfg.steps`` or a stop request."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, monitor: Monitor, resume: bool):
        self.cfg, self.acc, self.monitor = cfg, accelerator, monitor
        acc, run_dir = accelerator, cfg.run_dir
        existing = latest_checkpoint(run_dir)
        if existing is not None and not resume:
            raise FileExistsError(f"{run_dir} already holds a run (checkpoint {existing.name}): pass --resume to "
                                  "continue it, or set another output_dir")
        if acc.is_main_process:
            clean_partial(run_dir)
            resolved = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists for YAML
            atomic_write_text(run_dir / CONFIG, yaml.safe_dump(resolved, sort_keys=False))
        set_seed(cfg.seed)  # the same initial weights on every process
        model, report = build_model(cfg)
        consistency = cfg.stage.consistency
        # a whole-DiT consistency student needs its own frozen teacher; a LoRA student's is the DiT without adapters
        teacher = copy.deepcopy(model).requires_grad_(False).eval().to(acc.device) \
            if consistency is not None and cfg.lora is None else None
        if cfg.lora is not None:
            add_lora(model, cfg.lora)  # the base frozen; only the adapter trains (build_optimizer skips frozen)
        self.dit = model.config
        if report["source"]:
            monitor.note(f"loaded {report['source']}; missing keys {report['missing'] or 'none'}; "
                         f"unexpected keys {report['unexpected'] or 'none'}")
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.control = cfg.stage.controlnet is not None  # the controlnet stage trains a ControlNet on the frozen model
        if self.control:
            model = build_trainee(cfg, model, acc.device)
        self.features = open_features(cfg, self.dit, acc.device)
        self.null = [t.to(acc.device) for t in self.features.null_caption()]  # (1, L0, C), (1, L0)
        self.prompts = self.features.prompts(list(cfg.sample_prompts)) if cfg.sample_every else None
        self.sampler = BucketBatchSampler(self.features.dataset.buckets, cfg.batch_size, acc.num_processes,
                                          acc.process_index, cfg.seed)
        optimizer = build_optimizer(optimizer_params(cfg, model) if self.control else model.parameters(), cfg.optim)
        self.scheduler = lr_schedule(optimizer, cfg.optim, cfg.steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.unwrapped: PixArtDiT = acc.unwrap_model(self.model)
        if acc.distributed_type == DistributedType.FSDP and (cfg.optim.ema_decay or cfg.sample_every):
            raise ValueError("with FSDP set optim.ema_decay: null and sample_every: 0 (EMA and validation images "
                             "need the whole model on one process)")
        if acc.distributed_type == DistributedType.FSDP and consistency is not None:
            raise ValueError("the consistency stage runs with one process or DDP, not FSDP (its teacher and target "
                             "run the whole model on each process)")
        self.ema = EMA(self.unwrapped, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.diffusion = GaussianDiffusion(prediction_type=self.dit.prediction_type, snr_gamma=cfg.snr_gamma,
                                           timestep_band=cfg.timestep_band)
        self.distiller = None if consistency is None else ConsistencyDistiller(
            self.unwrapped, self.diffusion.tables["sqrt_ac"] ** 2, consistency, self.dit.prediction_type, teacher)
        self.state = TrainState()
        acc.register_for_checkpointing(self.scheduler, self.state, *([self.ema] if self.ema else []),
                                       *([self.distiller] if self.distiller else []))
        if existing is not None:
            acc.load_state(str(existing))  # model, optimizer, schedule, EMA, position, RNG states
            monitor.note(f"resumed from {existing} at step {self.state.step}")
        else:
            if resume:
                monitor.note(f"nothing to resume in {run_dir}: starting at step 0")
            set_seed(cfg.seed, device_specific=True)  # different noise on each process
        self.loader_seed = torch.Generator()  # the DataLoader's base seed: not drawn from the training RNG
        monitor.update(model=self.dit.to_dict(), stage=cfg.stage.name, load_report=report, data=self.stats())

    def stats(self) -> dict[str, int]:
        return self.features.stats()

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the saved position on, epoch after epoch; the position advances as they are used."""
        st = self.state
        while True:
            self.sampler.set_epoch(st.epoch, st.batch_in_epoch)
            self.features.dataset.set_epoch(st.epoch)
            self.loader_seed.manual_seed(self.cfg.seed + st.epoch)
            loader = DataLoader(self.features.dataset, batch_sampler=self.sampler, collate_fn=self.features.collate,
                                num_workers=self.cfg.data.num_workers, generator=self.loader_seed)
            for batch in loader:
                st.batch_in_epoch += 1
                yield batch
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0

    def micro_step(self, batch: dict[str, Any], sync: bool) -> Tensor:
        """Forward + backward of one micro-batch; returns its (loss, mse, vb) means."""
        acc, dev = self.acc, self.acc.device
        x0, y, mask = self.features.batch_to_training(batch, dev)  # (B, C, h, w), (B, L, C_text), (B, L)
        if self.distiller is not None:
            return self.consistency_step(x0, y, mask, sync)
        y, mask = drop_captions(y, mask, *self.null, self.cfg.caption_dropout)
        t = self.diffusion.sample_timesteps(x0.shape[0], dev)
        noise = torch.randn_like(x0)
        xt = self.diffusion.q_sample(x0, t, noise)
        with nullcontext() if sync else acc.no_sync(self.model), attention_kernels(dev, self.cfg.mixed_precision):
            control = {"control": self.features.control_latents(batch, dev)} if self.control else {}
            out = self.model(xt, t, y, mask, **micro_kwargs(self.dit, x0), **control)
            terms = self.diffusion.training_losses(out, x0, xt, t, noise)
            acc.backward(terms["loss"].mean() / self.cfg.grad_accum)
        return torch.stack([terms["loss"].mean(), terms["mse"].mean(), terms["vb"].mean()]).detach()

    def consistency_step(self, x0: Tensor, y: Tensor, mask: Tensor, sync: bool) -> Tensor:
        """The consistency stage's micro-step (train/consistency.py): its (loss, mse, vb = 0) means."""
        acc, dev = self.acc, self.acc.device
        with nullcontext() if sync else acc.no_sync(self.model), attention_kernels(dev, self.cfg.mixed_precision), \
                acc.autocast():
            terms = self.distiller.losses(self.model, x0, y, mask, *self.null, micro_kwargs(self.dit, x0))
            acc.backward(terms["loss"].mean() / self.cfg.grad_accum)
        return torch.stack([terms["loss"].mean(), terms["mse"].mean(), torch.zeros_like(terms["mse"].mean())]).detach()

    def optimizer_step(self) -> Tensor | None:
        cfg, acc = self.cfg, self.acc
        norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip else None
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # an fp16 overflow step does not advance the schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unwrapped)
        if self.distiller is not None:
            self.distiller.update_target()
        return norm.detach().float() if norm is not None else None  # on the device: flush() reads it

    def validate(self, step: int) -> None:
        """Validation images into ``RUN/samples`` (main process; the others wait)."""
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            net = self.unwrapped
            if self.ema is not None:
                net = PixArtDiT(self.dit).to(acc.device)
                net.load_state_dict(self.ema.shadow)
            net.eval()
            res = self.dit.resolution
            with acc.autocast():
                lat = generate_latents(net, *self.prompts, *self.null, (res, res), cfg.sample_steps, cfg.seed)
            pixels = self.features.decode(lat) if self.features.decode else latent_rgb(lat)
            folder = cfg.run_dir / SAMPLES
            folder.mkdir(exist_ok=True)
            paths = []
            for i, (img, prompt) in enumerate(zip(to_pil(pixels), cfg.sample_prompts)):
                path = folder / sample_name(step, i)
                save_png(img, path, {"prompt": prompt, "step": step, "seed": cfg.seed, "stage": cfg.stage.name})
                paths.append(str(path))
            net.train()
            self.monitor.update(samples=paths)
        acc.wait_for_everyone()

    def stop_vote(self) -> bool:
        """Whether any process was asked to stop (the stop file). One process reads it on the host; several
        must agree through a collective, which waits for the device, so they vote only when logging."""
        if self.acc.num_processes == 1:
            return self.monitor.stop_requested()
        flag = torch.tensor([float(self.monitor.stop_requested())], device=self.acc.device)
        return bool(self.acc.reduce(flag, "sum").item())

    def flush(self, pending: list[dict[str, Any]]) -> None:
        """Log the steps in ``pending`` (their losses and grad norms still on the device) with one device
        sync and one gather for all of them.

        Per step, a ``.tolist()`` of the loss and a ``float`` of the grad norm would each wait for the device:
        on a GPU a small model's step is mostly such waits, so they are paid once a ``log_every`` window (and
        at checkpoints, stops and the end) instead; every step still gets its own row."""
        if not pending:
            return
        terms = self.acc.reduce(torch.stack([p["terms"] for p in pending]), "mean").tolist()  # (n, 3)
        norms = [p["norm"] for p in pending]
        norms = torch.stack(norms).tolist() if all(n is not None for n in norms) else norms  # None: no clipping
        indices = gather_object([[p["seen"] for p in pending]])  # every process's sample indices, per step
        for k, (p, (loss, mse, vb), norm) in enumerate(zip(pending, terms, norms)):
            self.monitor.log(p["step"], {"loss": loss, "mse": mse, "vb": vb, "lr": p["lr"], "grad_norm": norm,
                                         "epoch": p["epoch"], "indices": [rank[k] for rank in indices]},
                             write_status_file=k == len(pending) - 1)
        pending.clear()

    def run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        it = self.batches()
        self.monitor.start(st.step)
        stopped = False
        pending: list[dict[str, Any]] = []  # steps not yet logged (see flush)
        while st.step < cfg.steps and not stopped:
            self.model.train()
            terms, seen = [], []
            for micro in range(cfg.grad_accum):
                batch = next(it)
                seen.append(batch["index"].tolist())  # the loader's CPU tensor: no device wait
                terms.append(self.micro_step(batch, sync=micro == cfg.grad_accum - 1))
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            norm = self.optimizer_step()
            st.step += 1
            pending.append({"step": st.step, "terms": torch.stack(terms).mean(0), "norm": norm, "lr": lr,
                            "epoch": st.epoch, "seen": seen})
            save = st.step % cfg.save_every == 0 or st.step == cfg.steps
            sample = bool(cfg.sample_every) and (st.step % cfg.sample_every == 0 or st.step == cfg.steps)
            window = st.step % cfg.log_every == 0
            if self.acc.num_processes == 1 or window or save or sample:
                stopped = self.stop_vote()
            if stopped or window or save or sample:
                self.flush(pending)
            if stopped or save:
                save_checkpoint(self.acc, cfg.run_dir, st.step, self.dit, cfg.keep_last)
            if sample:
                self.validate(st.step)
        exports = {}
        if not stopped:
            extra = {"stage": cfg.stage.name, "step": st.step, "ema": self.ema is not None, "train": cfg.to_dict()}
            if cfg.lora is not None:
                exports = export_lora(self.acc, self.model, self.dit, cfg.lora, cfg.run_dir, cfg.stage.load_from)
            else:
                export = export_controlnet if self.control else export_final
                exports = export(self.acc, self.model, self.ema, self.dit, cfg.run_dir, extra)
            if self.distiller is not None and self.acc.is_main_process:
                # the distilled weights carry how they sample: `--lora RUN/final` alone runs 4 LCM steps, no CFG
                SamplingDefaults(**FEW_STEP_SAMPLING).write(Path(exports[FINAL]))
        state = "stopped" if stopped else "finished"
        self.monitor.close(state, step=st.step, data=self.stats(), exports=exports)
        return {"state": state, "step": st.step, "run_dir": str(cfg.run_dir), "exports": exports}


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or ``resume``) one training run; returns ``{state, step, run_dir, exports}``."""
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    # the run folder is this trainer's until it returns: a second trainer there is refused before writing anything
    lease = acquire(cfg.run_dir, doing="training") if accelerator.is_main_process else None
    monitor = Monitor(Path(cfg.run_dir), cfg.steps, accelerator.is_main_process)
    try:
        return Trainer(cfg, accelerator, monitor, resume).run()
    except KeyboardInterrupt:
        monitor.close("stopped", error="interrupted: resume continues from the last checkpoint")
        raise
    except BaseException as e:
        monitor.close("error", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if lease is not None:
            lease.release()
