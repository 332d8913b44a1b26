"""The LR schedules against transformers' own functions (the definitions the field's trainers use)."""

from __future__ import annotations

import pytest
import torch
from transformers import optimization as hf

from tunelab.train.optim import ScheduleMultiplier


def _theirs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind,make,kw", [
    ("cosine", lambda o: hf.get_cosine_schedule_with_warmup(o, 10, 100), {}),
    ("linear", lambda o: hf.get_linear_schedule_with_warmup(o, 10, 100), {}),
    ("cosine_with_restarts", lambda o: hf.get_cosine_with_hard_restarts_schedule_with_warmup(o, 10, 100, num_cycles=3),
     {"num_cycles": 3}),
    ("polynomial", lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, 10, 100, lr_end=0.0, power=2.0),
     {"power": 2.0}),
    ("cosine", lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, 10, 100, min_lr_rate=0.1),
     {"min_ratio": 0.1}),
    ("warmup_stable_decay", lambda o: hf.get_wsd_schedule(o, 10, 20, num_training_steps=100, num_stable_steps=70),
     {"decay_steps": 20}),
])
def test_schedules_match_transformers(kind, make, kw):
    ours = [ScheduleMultiplier(kind, 10, 100, **kw)(s) for s in range(100)]
    assert ours == pytest.approx(_theirs(make, 100), abs=1e-9)


def test_min_ratio_floors_every_decaying_schedule_and_restarts_restart():
    for kind in ("linear", "polynomial", "cosine_with_restarts", "warmup_stable_decay"):
        m = ScheduleMultiplier(kind, 0, 50, min_ratio=0.2)
        assert min(m(s) for s in range(60)) == pytest.approx(0.2) and m(0) == 1.0
    r = ScheduleMultiplier("cosine_with_restarts", 0, 90, num_cycles=3)
    assert r(30) == pytest.approx(1.0) and r(60) == pytest.approx(1.0) and r(15) == pytest.approx(0.5)
