"""The consistency stage (train/consistency.py): its loss by hand, its config, and a short run that must bring the
student's 1-step image closer to the teacher's many-step one."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import TINY_DIT, make_encoders, make_images, random_dit, write_config
from torch import nn

from pixsigma.sampling import denoise, make_scheduler
from pixsigma.weights import load_dit, save_dit
from train.config import load_config
from train.consistency import ConsistencyDistiller, ConsistencyStage, boundary_scalings, ddim_grid, pseudo_huber
from train.diffusion import GaussianDiffusion
from train.loop import train


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
