"""The consistency stage (train/consistency.py): its loss by hand, its config, and a short run that must bring the
student's 1-step image closer to the teacher's many-step one."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures import make_encoders, make_images, random_dit, write_config
from torch import nn

from pixsigma.config import PRESETS
from pixsigma.lora import LoraStack, parse_loras
from pixsigma.sampling import denoise, make_scheduler
from pixsigma.weights import load_dit, save_dit
from shapes import DEMO_SIGMA
from shapes.world import make_dataset
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


PROBES = ["a red star above a blue ring", "a large green circle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random tiny v-prediction teacher and a feature cache of the fixture images (the resume test)."""
    root = tmp_path_factory.mktemp("consistency")
    save_dit(random_dit(replace(PRESETS["tiny"], prediction_type="v_prediction"), seed=4), root / "teacher")
    enc = make_encoders(root / "enc")
    data = {"source": str(make_images(root / "imgs")), "cache": str(root / "cache"), "text_encoder": str(enc),
            "vae": str(enc)}
    extract(_cfg({"root": root, "data": data, "teacher": root / "teacher"}, "extract"))
    return {"root": root, "data": data, "teacher": root / "teacher"}


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """The shipped demo Σ as the teacher (a model with a real ODE to distil) and 8 world scenes' features."""
    root = tmp_path_factory.mktemp("consistency_demo")
    make_dataset(root / "imgs", 8, seed=3, sizes=((256, 256),), short="complete")
    data = {"source": str(root / "imgs"), "cache": str(root / "cache"), "text_encoder": str(DEMO_SIGMA),
            "vae": str(DEMO_SIGMA), "long_caption_ratio": 1.0}
    world = {"root": root, "data": data, "teacher": DEMO_SIGMA}
    extract(_cfg(world, "extract", sample_prompts=PROBES))
    return world


def _cfg(world, name, **over):
    base = dict(stage={"name": "consistency", "load_from": str(world["teacher"]),
                       "consistency": {"guidance": [2.0, 2.0], "ddim_timesteps": 10}},
                output_dir=str(world["root"] / name), data=world["data"], batch_size=4)
    return load_config(write_config(world["root"] / f"{name}.yaml", **{**base, **over}))


def _gaps(world, student: torch.nn.Module, guidance: float, teacher_steps: tuple[int, ...]) -> list[float]:
    """Mean squared distance between the student's 1-step LCM latents (guidance 1) and the teacher's DDIM latents
    at ``guidance`` after each of ``teacher_steps`` steps, over the probe captions and 2 seeds each."""
    cfg = _cfg(world, "probe", sample_prompts=PROBES)
    teacher = load_dit(world["teacher"]).eval()
    feats = open_features(cfg, teacher.config, torch.device("cpu"))
    y, mask = feats.prompts(PROBES)
    y, mask = y.repeat(2, 1, 1), mask.repeat(2, 1)
    yn, mn = (t.expand(y.shape[0], *t.shape[1:]) for t in feats.null_caption())
    yn, mn = pad_tokens(yn, mn, y.shape[1])
    y, mask = pad_tokens(y, mask, yn.shape[1])
    side = teacher.config.sample_size
    noise = torch.randn((y.shape[0], 4, side, side), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = denoise(lambda x, t: student(x, t, y, mask), make_scheduler("lcm", prediction_type="v_prediction"),
                      noise.clone(), 1, 1.0, torch.Generator().manual_seed(0))
        out = []
        for steps in teacher_steps:
            ddim = make_scheduler("ddim", prediction_type="v_prediction")
            ddim.register_to_config(timestep_spacing="trailing")  # from t = 999, as the 1-step sampler starts
            many = denoise(lambda x, t: teacher(x, t, torch.cat([yn, y]), torch.cat([mn, mask])), ddim,
                           noise.clone(), steps, guidance)
            out.append(float(((one - many) ** 2).mean()))
    return out


def test_a_short_run_brings_the_one_step_image_toward_the_teachers(demo_world):
    """20 steps of the stage on the demo Σ (a 1-point solver grid: the shortest run in which it shows) bring the
    student's 1-step image toward the guided teacher's, its 1-step and its 20-step one both (measured before:
    0.063 and 0.82; after: 0.028 and 0.70)."""
    teacher = load_dit(DEMO_SIGMA).eval()
    before = _gaps(demo_world, teacher, 2.0, (1, 20))
    cfg = _cfg(demo_world, "lcm", steps=20, lora={"rank": 8}, optim={"lr": 1e-4, "warmup_steps": 0},
               stage={"name": "consistency", "load_from": str(DEMO_SIGMA),
                      "consistency": {"guidance": [2.0, 2.0], "ddim_timesteps": 1}})
    final = Path(train(cfg)["exports"]["final"])
    assert json.loads((final / "sampling.json").read_text()) == {"steps": 4, "guidance": 1.0, "prompt_expander": None,
                                                                  "sampler": "lcm"}
    LoraStack(teacher).set(parse_loras(str(final)))
    after = _gaps(demo_world, teacher, 2.0, (1, 20))
    assert after[0] < 0.7 * before[0] and after[1] < 0.95 * before[1], (before, after)


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


def test_lab_chains_end_with_a_whole_dit_consistency_stage():
    from shapes.plan import FEW_STEP_SETS, lab_plan

    for preset in ("quick-fast", "full"):
        last = lab_plan(preset).plan[-1]
        assert last.sets == FEW_STEP_SETS and last.resolution == 256
        cfg = load_config(f"configs/{last.config}", [*last.sets, "stage.load_from=runs/sigma_kv"])
        assert cfg.stage.name == "consistency" and cfg.lora is None and cfg.optim.ema_decay is None
    assert all(st.config != "shapes_sigma_lcm.yaml" for st in lab_plan("quick").plan)
