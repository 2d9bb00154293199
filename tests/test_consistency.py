"""The consistency stage (train/consistency.py): its loss by hand, its config, and a short run that must bring the
student's 1-step image closer to the teacher's many-step one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import make_encoders, make_images, write_config
from torch import nn

from pixsigma.lora import LoraStack, parse_loras
from pixsigma.sampling import denoise, make_scheduler
from pixsigma.weights import load_dit
from train.config import load_config
from train.consistency import ConsistencyDistiller, ConsistencyStage, boundary_scalings, ddim_grid, pseudo_huber
from train.diffusion import GaussianDiffusion
from train.extract import extract
from train.features import open_features
from train.loop import Trainer, train
from train.sample import pad_tokens


class Toy(nn.Module):
    """out = a·x + mean(y) (ε-prediction): small enough to follow the loss by hand."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t, y, mask, **extra):
        return self.a * x + y.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_grid_scalings_and_huber_by_hand():
    assert ddim_grid(50)[:3].tolist() == [19, 39, 59] and ddim_grid(50)[-1] == 999
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19]))
    assert (c_skip[0], c_out[0]) == (1.0, 0.0)  # the identity at t = 0
    assert c_skip[1].item() == pytest.approx(0.25 / (190 ** 2 + 0.25))
    assert c_out[1].item() == pytest.approx(190 / math.sqrt(190 ** 2 + 0.25))
    got = pseudo_huber(torch.tensor([[0.3, -0.4]]), torch.zeros(1, 2), 0.001)
    assert got.item() == pytest.approx(((math.sqrt(0.09 + 1e-6) - 0.001) + (math.sqrt(0.16 + 1e-6) - 0.001)) / 2)


def test_loss_matches_a_hand_computed_step(monkeypatch):
    ac = GaussianDiffusion().tables["sqrt_ac"] ** 2
    cfg = ConsistencyStage(huber_c=0.001, ddim_timesteps=2, guidance=(3.0, 3.0), target_ema=0.5)
    student, teacher = Toy(0.2), Toy(0.5)
    dist = ConsistencyDistiller(student, ac, cfg, "epsilon", teacher)
    dist.shadow["a"].fill_(0.1)  # the target's EMA weight differs from the student's
    monkeypatch.setattr(dist, "sample_points", lambda b, d: (torch.tensor([999]), torch.tensor([499]),
                                                            torch.tensor([3.0])))
    x0 = torch.full((1, 1, 1, 2), 0.6)
    y, mask = torch.full((1, 1, 1), 0.4), torch.ones(1, 1)
    y0, m0 = torch.zeros(1, 1, 1), torch.ones(1, 1)
    torch.manual_seed(3)
    loss = dist.losses(student, x0, y, mask, y0, m0, {})
    torch.manual_seed(3)
    noise = torch.randn(1, 1, 1, 2)

    a_s, a_e = ac[999].item(), ac[499].item()
    x_s = math.sqrt(a_s) * 0.6 + math.sqrt(1 - a_s) * noise  # noised to t_start
    eps_c, eps_u = 0.5 * x_s + 0.4, 0.5 * x_s  # the teacher, with and without the caption
    eps_g = eps_u + 3.0 * (eps_c - eps_u)
    x0_g = (x_s - math.sqrt(1 - a_s) * eps_g) / math.sqrt(a_s)
    x_e = math.sqrt(a_e) * x0_g + math.sqrt(1 - a_e) * eps_g  # one DDIM step to t_end
    eps_t = 0.1 * x_e + 0.4  # the EMA target's weight
    cs_e, co_e = 0.25 / ((4990) ** 2 + 0.25), 4990 / math.sqrt(4990 ** 2 + 0.25)
    target = cs_e * x_e + co_e * (x_e - math.sqrt(1 - a_e) * eps_t) / math.sqrt(a_e)
    eps_p = 0.2 * x_s + 0.4
    cs_s, co_s = 0.25 / (9990 ** 2 + 0.25), 9990 / math.sqrt(9990 ** 2 + 0.25)
    pred = cs_s * x_s + co_s * (x_s - math.sqrt(1 - a_s) * eps_p) / math.sqrt(a_s)
    want = (((pred - target) ** 2 + 1e-6).sqrt() - 0.001).mean()
    assert loss["loss"].item() == pytest.approx(want.item(), rel=1e-4)
    assert student.a.item() == pytest.approx(0.2)  # the target's weights were swapped back
    loss["loss"].sum().backward()
    assert student.a.grad is not None and teacher.a.grad is None

    dist.update_target()  # EMA: 0.5·0.1 + 0.5·0.2
    assert dist.shadow["a"].item() == pytest.approx(0.15)


def test_config_mistakes_are_named():
    with pytest.raises(ValueError, match=r"guidance must be \[low, high\]"):
        ConsistencyStage(guidance=(5.0, 2.0))
    with pytest.raises(ValueError, match="huber_c must be a number >= 0"):
        ConsistencyStage(huber_c=-1)
    with pytest.raises(ValueError, match="target_ema must be in"):
        ConsistencyStage(target_ema=1.0)
    with pytest.raises(ValueError, match="without LoRA layers needs its own frozen teacher"):
        ConsistencyDistiller(Toy(0.1), torch.ones(1000), ConsistencyStage(), "epsilon")


def test_xl_recipe_reads_and_dry_runs_its_config():
    cfg = load_config("configs/sigma_xl_1024_lcm.yaml", ["stage.load_from=x"])
    c = cfg.stage.consistency
    assert (c.huber_c, c.ddim_timesteps, c.guidance, c.target_ema) == (0.001, 50, (4.0, 16.0), 0.95)
    assert cfg.lora is not None and cfg.caption_dropout == 0.0


TEACHER_STEPS = 150
PROBES = ["a red square", "a blue square", "a small green square in the middle of a white picture with a wide shape"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A v-prediction teacher at 64 px trained briefly from scratch on the fixture images (a random one has no
    smooth ODE to distil), and their feature cache."""
    root = tmp_path_factory.mktemp("consistency")
    enc = make_encoders(root / "enc")
    data = {"source": str(make_images(root / "imgs")), "cache": str(root / "cache"), "text_encoder": str(enc),
            "vae": str(enc)}
    cfg = load_config(write_config(root / "teacher.yaml", stage="from_scratch", data=data, sample_prompts=PROBES,
                                   output_dir=str(root / "teacher"), steps=TEACHER_STEPS, batch_size=4,
                                   model_args={"prediction_type": "v_prediction"},
                                   optim={"lr": 3e-3, "grad_clip": 1.0, "warmup_steps": 0}))
    extract(cfg)
    train(cfg)
    return {"root": root, "data": data, "teacher": root / "teacher" / "final"}


def _cfg(world, name, **over):
    base = dict(stage={"name": "consistency", "load_from": str(world["teacher"]),
                       "consistency": {"guidance": [2.0, 2.0], "ddim_timesteps": 10}},
                output_dir=str(world["root"] / name), data=world["data"], batch_size=4)
    return load_config(write_config(world["root"] / f"{name}.yaml", **{**base, **over}))


def _student(world, final: Path | None, lora: bool = True) -> torch.nn.Module:
    """The distilled model: the teacher with the run's LoRA applied, or the run's whole DiT; None: the teacher."""
    if final is not None and not lora:
        return load_dit(final).eval()
    dit = load_dit(world["teacher"]).eval()
    if final is not None:
        LoraStack(dit).set(parse_loras(str(final)))
    return dit


def _one_step_gap(world, student: torch.nn.Module, guidance: float, steps: int) -> float:
    """Mean squared distance between the student's 1-step LCM latents (guidance 1) and the teacher's ``steps``-step
    DDIM latents at ``guidance``, over the probe captions and 4 seeds each."""
    cfg = _cfg(world, "probe", sample_prompts=PROBES)
    teacher = load_dit(world["teacher"]).eval()
    feats = open_features(cfg, teacher.config, torch.device("cpu"))
    y, mask = feats.prompts(PROBES)
    y, mask = y.repeat(4, 1, 1), mask.repeat(4, 1)
    yn, mn = (t.expand(y.shape[0], *t.shape[1:]) for t in feats.null_caption())
    yn, mn = pad_tokens(yn, mn, y.shape[1])
    y, mask = pad_tokens(y, mask, yn.shape[1])
    both = (torch.cat([yn, y]), torch.cat([mn, mask])) if guidance > 1 else (y, mask)
    noise = torch.randn((y.shape[0], 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ddim = make_scheduler("ddim", prediction_type="v_prediction")
    ddim.register_to_config(timestep_spacing="trailing")  # from t = 999, as the 1-step sampler starts
    with torch.no_grad():
        many = denoise(lambda x, t: teacher(x, t, *both), ddim, noise.clone(), steps, guidance)
        one = denoise(lambda x, t: student(x, t, y, mask), make_scheduler("lcm", prediction_type="v_prediction"),
                      noise.clone(), 1, 1.0, torch.Generator().manual_seed(0))
    return float(((one - many) ** 2).mean())


def test_a_short_run_brings_the_one_step_image_toward_the_teachers(world):
    before = _one_step_gap(world, _student(world, None), 2.0)
    res = train(_cfg(world, "lcm_lora", steps=40, lora={"rank": 8}, optim={"lr": 1e-2, "warmup_steps": 0}))
    final = Path(res["exports"]["final"])
    assert json.loads((final / "sampling.json").read_text()) == {"steps": 4, "guidance": 1.0, "prompt_expander": None,
                                                                  "sampler": "lcm"}
    after = _one_step_gap(world, _student(world, final), 2.0)
    assert after < 0.8 * before, (before, after)


def test_a_resumed_whole_dit_run_equals_a_straight_one(world, monkeypatch):
    over = dict(steps=4, save_every=2, keep_last=3, lora=None, optim={"ema_decay": None})
    straight = train(_cfg(world, "full_straight", **over))
    cfg = _cfg(world, "full_killed", **over)
    real_step = Trainer.optimizer_step

    def dies_in_step_4(self):
        if self.state.step == 3:
            raise RuntimeError("killed")
        return real_step(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", dies_in_step_4)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    resumed = train(cfg, resume=True)
    assert straight["step"] == resumed["step"] == 4
    a = load_dit(Path(straight["exports"]["final"])).state_dict()
    b = load_dit(Path(resumed["exports"]["final"])).state_dict()
    teacher = load_dit(world["teacher"]).state_dict()
    assert any(not torch.equal(a[k], teacher[k]) for k in a)  # the whole DiT trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
