"""Optimizers over the plan's groups (frozen parameters never reach them), Lion's math, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config import OptimSection, PartsSection
from tunelab.errors import TunelabError
from tunelab.train import optim as O
from tunelab.train.parts import BLOCK_LR_NAMES, TrainablePlan, select_trainable


def _plan(params: list[torch.nn.Parameter]) -> TrainablePlan:
    return TrainablePlan(components={}, param_groups={"unet": params, "text_encoder_1": [], "text_encoder_2": []})


def test_groups_hold_only_trainable_parameters(toy):
    plan = select_trainable(toy, PartsSection(text_encoder="on", unet="unet63"))
    opt = O.build_optimizer(plan, OptimSection(lr_unet=1e-5, lr_text_encoder_1=2e-5, lr_text_encoder_2=3e-5))
    assert O.group_lrs(opt) == {"unet": 1e-5, "text_encoder_1": 2e-5, "text_encoder_2": 3e-5}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for m in toy.modules().values() for p in m.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in in_opt for p in frozen)
    trainable = [p for m in toy.modules().values() for p in m.parameters() if p.requires_grad]
    assert len(in_opt) == len(trainable)


def test_block_lr_groups(toy):
    lrs = [1.0] * 23
    lrs[BLOCK_LR_NAMES.index("IN04")] = 0.5
    lrs[BLOCK_LR_NAMES.index("OUT08")] = 0.0
    plan = select_trainable(toy, PartsSection(block_lrs=lrs))
    opt = O.build_optimizer(plan, OptimSection(lr_unet=1e-4))
    lr = O.group_lrs(opt)
    assert lr["unet/IN04"] == pytest.approx(5e-5) and lr["unet/BASE"] == 1e-4 and "unet/OUT08" not in lr
    assert "unet" not in lr and len(lr) == 22


def test_nothing_trains_is_an_error(toy):
    plan = _plan([])
    with pytest.raises(TunelabError, match="nothing trains"):
        O.build_optimizer(plan, OptimSection())


@pytest.mark.parametrize("name,extra", [("adamw", {}), ("adafactor", {}), ("lion", {}), ("prodigy", {"d_coef": 0.5}),
                                        ("came", {}), ("class", {"class_path": "torch.optim.RAdam"}),
                                        ("adafactor", {"args": {"relative_step": True}})])
def test_optimizers_take_a_step(name, extra):
    pytest.importorskip({"prodigy": "prodigyopt", "came": "came_pytorch"}.get(name, "torch"))
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    args = extra.pop("args", {}) | ({"d_coef": extra.pop("d_coef")} if "d_coef" in extra else {})
    opt = O.build_optimizer(_plan([w]), OptimSection(name=name, lr_unet=1.0 if name == "prodigy" else 1e-2, args=args,
                                                     **extra))
    if name == "prodigy":
        assert opt.param_groups[0]["d_coef"] == 0.5  # optim.args reach the optimizer
    before = w.detach().clone()
    (w.sum() ** 2 + (frozen * 0).sum()).backward()
    opt.step()
    assert not torch.equal(before, w.detach())
    assert opt.param_groups[0]["name"] == "unet"
    assert {"state", "param_groups"} <= set(opt.state_dict())


def test_optimizer_arguments_that_do_not_fit_are_named():
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TunelabError, match="do not fit torch.optim.adamw.AdamW"):
        O.build_optimizer(_plan([w]), OptimSection(args={"relative_step": False}))
    with pytest.raises(TunelabError, match="pip install nopackage"):
        O.build_optimizer(_plan([w]), OptimSection(name="class", class_path="nopackage.Opt"))


def test_adamw8bit_without_cuda_says_what_to_change(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TunelabError, match="optim.name = 'adamw'"):
        O.build_optimizer(_plan([w]), OptimSection(name="adamw8bit"))


def test_lion_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = O.Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    grads = [torch.tensor([0.2, -0.3, 0.0]), torch.tensor([-1.0, -0.3, 0.4])]
    # step 1: m = 0 -> u = sign(0.1 g) = (1, -1, 0); p = p * (1 - 0.05) - 0.1 u
    #         = (0.95 - 0.1, -1.9 + 0.1, 0.475) = (0.85, -1.8, 0.475); m = 0.01 g = (0.002, -0.003, 0)
    # step 2: 0.9 m + 0.1 g = (0.0018 - 0.1, -0.0027 - 0.03, 0.04) -> u = (-1, -1, 1)
    #         p = (0.85*0.95 + 0.1, -1.8*0.95 + 0.1, 0.475*0.95 - 0.1) = (0.9075, -1.61, 0.35125)
    #         m = 0.99 m + 0.01 g = (0.00198 - 0.01, -0.00297 - 0.003, 0.004)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        if g is grads[0]:
            torch.testing.assert_close(w.detach(), torch.tensor([0.85, -1.8, 0.475]))
    torch.testing.assert_close(w.detach(), torch.tensor([0.9075, -1.61, 0.35125]))
    torch.testing.assert_close(opt.state[w]["exp_avg"], torch.tensor([-0.00802, -0.00597, 0.004]))


def _lrs(schedule: str, steps: list[int], warmup: int = 4, total: int = 12) -> list[float]:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = O.build_optimizer(_plan([w]), OptimSection(lr_unet=1.0, schedule=schedule, warmup_steps=warmup))
    sched = O.build_scheduler(opt, OptimSection(lr_unet=1.0, schedule=schedule, warmup_steps=warmup), total)
    seen = {}
    for s in range(total + 1):
        seen[s] = O.group_lrs(opt)["unet"]
        opt.step()
        sched.step()
    return [seen[s] for s in steps]


def test_schedules():
    assert _lrs("constant", [0, 5, 12]) == [1.0, 1.0, 1.0]
    assert _lrs("constant_with_warmup", [0, 1, 2, 4, 12]) == [0.0, 0.25, 0.5, 1.0, 1.0]
    # cosine after 4 warm-up steps over 8: step 6 -> p = 0.25: 0.5 (1 + cos(pi/4)); step 8 -> 0.5; 12 -> 0
    cos = _lrs("cosine", [2, 4, 6, 8, 12])
    assert cos == pytest.approx([0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0])
    assert _lrs("linear", [2, 4, 6, 10, 12]) == pytest.approx([0.5, 1.0, 0.75, 0.25, 0.0])


def test_scheduler_state_round_trips():
    w = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimSection(lr_unet=1.0, schedule="cosine", warmup_steps=2)
    opt = O.build_optimizer(_plan([w]), cfg)
    sched = O.build_scheduler(opt, cfg, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = O.build_optimizer(_plan([torch.nn.Parameter(torch.zeros(1))]), cfg)
    sched2 = O.build_scheduler(opt2, cfg, 10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5 and sched2.get_last_lr() == sched.get_last_lr()


def test_decay_schedule_longer_than_run_is_refused():
    w = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimSection(schedule="linear", warmup_steps=10)
    with pytest.raises(TunelabError, match="warmup_steps"):
        O.build_scheduler(O.build_optimizer(_plan([w]), cfg), cfg, 10)
