"""The fused backward pass (`train.fused_backward`): each parameter steps from its gradient hook
inside backward and its gradient is freed there. Checked: one parameter's step is the whole step's
arithmetic for every optimizer it accepts (bit for bit); the toy trainer reaches the same weights
fused and unfused (AdamW, bf16 weights with stochastic rounding, Adafactor with kohya's
per-parameter clipping); no gradient outlives a step; a NaN loss steps no parameter; a fused run
resumes exactly; what it cannot honour is refused before anything runs, naming the fix.

kohya's reference: sd-scripts `sdxl_train.py` (`--fused_backward_pass`: a
`register_post_accumulate_grad_hook` per parameter that clips the one gradient with
`accelerator.clip_grad_norm_(tensor, max_grad_norm)`, calls `optimizer.step_param` and sets
`tensor.grad = None`) and `library/adafactor_fused.py` (`adafactor_step_param`: transformers'
Adafactor step for one parameter). In-process toy runs (a few seconds each)."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import write_run
from tunelab.config import load_config, parse_config
from tunelab.errors import TunelabError
from tunelab.train.fused import FusedBackward


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """accelerate fixes one precision per process; the bf16 arm needs another."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# --- one parameter's step is the whole step ---------------------------------------------------------------


def _net(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    return net.to(dtype)


def _groups(net) -> list[dict]:
    ps = list(net.parameters())
    return [{"params": ps[:2], "lr": 1e-2, "name": "unet"}, {"params": ps[2:], "lr": 3e-3, "name": "te"}]


def _optimizers():
    from came_pytorch import CAME
    from transformers.optimization import Adafactor

    from tunelab.train.lowprec import LowPrecisionAdamW, LowPrecisionLion
    from tunelab.train.optim import Lion

    return {
        "adamw": (lambda g: torch.optim.AdamW(g, weight_decay=0.1, foreach=True), torch.float32),
        "lion": (lambda g: Lion(g, lr=1e-3, weight_decay=0.1), torch.float32),
        "adamw bf16 stochastic": (lambda g: LowPrecisionAdamW(g, update="stochastic", seed=5), torch.bfloat16),
        "lion bf16 kahan": (lambda g: LowPrecisionLion(g, update="kahan"), torch.bfloat16),
        "adafactor": (lambda g: Adafactor(g, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False,
                                          weight_decay=0.1), torch.float32),
        "adafactor relative step": (lambda g: Adafactor(g, lr=None, relative_step=True, scale_parameter=True,
                                                        warmup_init=True), torch.float32),
        "came": (lambda g: CAME(g, lr=1e-3, weight_decay=0.1), torch.float32),
        "torch.optim.RAdam": (lambda g: torch.optim.RAdam(g, lr=1e-3), torch.float32),
        "torch.optim.SGD": (lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True), torch.float32),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_one_parameter_at_a_time_is_the_whole_step_bit_for_bit(name):
    """Four steps under a decaying LR (LambdaLR, as the trainer's): the weights, the optimizer's
    state dict and the logged gradient norm of the fused side against the unfused one."""
    make, dtype = _optimizers()[name]
    a, b = _net(dtype), _net(dtype)
    whole, fused = make(_groups(a)), make(_groups(b))
    sched_a = torch.optim.lr_scheduler.LambdaLR(whole, lambda s: 1 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(fused, lambda s: 1 / (1 + s))
    hooks = FusedBackward(fused, list(b.parameters()))
    for step in range(4):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
        a(x).float().pow(2).mean().backward()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in a.parameters()]))
        whole.step()
        whole.zero_grad(set_to_none=True)
        sched_a.step()
        with hooks.stepping():
            b(x).float().pow(2).mean().backward()
        sched_b.step()
        assert all(p.grad is None for p in b.parameters())  # freed inside backward
        assert hooks.stepped == 6
        assert hooks.grad_norm() == pytest.approx(norm, rel=1e-6)  # stacked per-tensor norms, as get_total_norm
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    sa, sb = whole.state_dict(), fused.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][i][key])), (i, key)


def test_per_parameter_clipping_is_kohyas_and_the_same_fused_and_unfused():
    """`max_grad_norm_scope = "per_parameter"`: each gradient scaled to at most max_norm on its own
    (kohya's fused hook: `accelerator.clip_grad_norm_(tensor, max_grad_norm)`), before its step;
    the unfused side clips the same way (trainer `_clip`), so both give the same weights."""
    from tunelab.train.fused import clip_one

    a, b = _net(), _net()
    whole, fused = torch.optim.AdamW(_groups(a), foreach=True), torch.optim.AdamW(_groups(b), foreach=True)
    hooks = FusedBackward(fused, list(b.parameters()), max_norm_per_parameter=0.3)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    a(x).pow(2).mean().backward()
    raw = [float(p.grad.norm()) for p in a.parameters()]
    assert min(raw) < 0.3 < max(raw)  # the clip acts on some tensors and leaves others
    norms = [float(clip_one(p, 0.3)) for p in a.parameters()]
    assert norms == pytest.approx(raw, rel=1e-6)  # the norm before clipping is returned (logged)
    clipped = [float(p.grad.norm()) for p in a.parameters()]
    assert clipped == pytest.approx([min(r, 0.3) for r in raw], rel=1e-4)
    whole.step()
    with hooks.stepping():
        b(x).pow(2).mean().backward()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unarmed_hooks_leave_gradients_alone_and_a_part_gradient_is_refused():
    """Outside `stepping()` a backward keeps its gradients (a probe, a user's own backward). A
    parameter that receives its gradient in two parts — used twice under reentrant checkpointing —
    would be stepped twice: refused with the fix."""
    lin = torch.nn.Linear(4, 4)
    hooks = FusedBackward(torch.optim.SGD(lin.parameters(), lr=0.1), list(lin.parameters()))
    before = lin.weight.detach().clone()
    x = torch.randn(2, 4, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and torch.equal(lin.weight, before)
    lin.zero_grad(set_to_none=True)
    with pytest.raises(TunelabError, match="two parts.*gradient_checkpointing = false"):
        with hooks.stepping():
            y = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=True)
            torch.utils.checkpoint.checkpoint(lin, y, use_reentrant=True).sum().backward()
    hooks.remove()


def test_an_optimizer_with_shared_state_is_not_stepped_one_parameter_at_a_time():
    from prodigyopt import Prodigy

    lin = torch.nn.Linear(2, 2)
    with pytest.raises(TunelabError, match="cannot step prodigyopt.*one parameter at a time"):
        FusedBackward(Prodigy(lin.parameters()), list(lin.parameters()))


# --- the trainer --------------------------------------------------------------------------------------------


def _run(tmp_path, world, name: str, fused: bool, **sections):
    sections.setdefault("optim", {})
    sections["optim"] = {"schedule": "linear", "warmup_steps": 1, **sections["optim"]}  # the LR moves every step
    train = {"max_steps": 3, "fused_backward": fused, **sections.pop("train", {})}
    return write_run(tmp_path / f"{name}.toml", world, tmp_path / name, train=train,
                     save={"every_n_steps": 0}, report={"enabled": False}, **sections)


def _trained(tmp_path, world, name: str, fused: bool, **sections) -> tuple[dict, list[dict]]:
    from tunelab.train.trainer import train

    train(load_config(_run(tmp_path, world, name, fused, **sections)))
    rows = pq.read_table(tmp_path / name / "metrics.parquet").to_pylist()
    return load_file(tmp_path / name / "checkpoints" / "last.safetensors"), rows


def _scalar(rows: list[dict], tag: str) -> list[float]:
    return [r["value"] for r in rows if r["tag"] == tag]


ARMS = {
    "adamw": {},
    "adamw, gradient checkpointing": {"train": {"gradient_checkpointing": True}},
    "adamw bf16 stochastic": {"train": {"mixed_precision": "bf16", "full_bf16": True, "bf16_update": "stochastic"}},
    "adamw bf16 exact": {"train": {"mixed_precision": "bf16", "full_bf16": True}},
    "adafactor, per-parameter clipping": {"optim": {"name": "adafactor"},
                                          "train": {"max_grad_norm": 0.05, "max_grad_norm_scope": "per_parameter"}},
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_the_toy_trains_to_the_same_weights_fused_and_unfused(tmp_path, world, arm):
    """UNet and both text encoders, 3 steps, a linear LR schedule: every tensor of the last
    checkpoint bit for bit, the same loss and LR each step, the gradient norm to float rounding
    (the fused side stacks per-tensor norms as torch's get_total_norm does)."""
    off, off_rows = _trained(tmp_path, world, "unfused", False, **ARMS[arm])
    on, on_rows = _trained(tmp_path, world, "fused", True, **ARMS[arm])
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    assert len(set(_scalar(off_rows, "lr/unet"))) == 3 and min(_scalar(off_rows, "grad_norm")) > 0
    for tag in ("loss", "lr/unet", "lr/text_encoder_1", "nonfinite_skipped"):
        assert _scalar(off_rows, tag) == _scalar(on_rows, tag), tag
    assert _scalar(on_rows, "grad_norm") == pytest.approx(_scalar(off_rows, "grad_norm"), rel=1e-5)


def test_a_fused_step_frees_every_gradient_and_a_nan_loss_moves_nothing(tmp_path, world, monkeypatch):
    """`optimizer_step` itself: a step steps every trainable parameter inside backward and leaves
    no gradient; a forced NaN loss (faults.py) is known before backward, so no parameter and no
    optimizer state moves, and the loop still counts it as skipped."""
    from tunelab import faults
    from tunelab.train.trainer import batches, optimizer_step, setup

    s = setup(load_config(_run(tmp_path, world, "nan", True)))
    try:
        t, data = s.training, batches(s, 0, 0)
        first = optimizer_step(s, data)
        assert first.finite and t.fused.stepped == len(t.params) and all(p.grad is None for p in t.params)
        weights = [p.detach().clone() for p in t.params]
        inner = t.optimizer.optimizer
        steps = [int(inner.state[p]["step"]) for p in t.params]
        lr = t.optimizer.param_groups[0]["lr"]
        monkeypatch.setenv(faults.ENV, "loss.nonfinite:1")
        faults._hits.clear()
        bad = optimizer_step(s, data)
        assert not bad.finite and bad.grad_norm != bad.grad_norm  # NaN, as unfused logs it
        assert all(torch.equal(p, w) for p, w in zip(t.params, weights))
        assert [int(inner.state[p]["step"]) for p in t.params] == steps
        assert t.optimizer.param_groups[0]["lr"] == lr and all(p.grad is None for p in t.params)
        monkeypatch.delenv(faults.ENV)
        good = optimizer_step(s, data)
        assert good.finite and t.fused.stepped == len(t.params)
        assert all(not torch.equal(p, w) for p, w in zip(t.params, weights))  # every tensor moved
    finally:
        s.lock.release()


def test_a_nan_step_is_skipped_and_counted_as_unfused(tmp_path, world, monkeypatch):
    from tunelab import faults

    out = {}
    for fused in (False, True):
        monkeypatch.setenv(faults.ENV, "loss.nonfinite:2")
        faults._hits.clear()
        out[fused] = _trained(tmp_path, world, f"nan-{fused}", fused)
    (off, off_rows), (on, on_rows) = out[False], out[True]
    assert all(torch.equal(off[k], on[k]) for k in off)
    assert _scalar(on_rows, "nonfinite_skipped") == _scalar(off_rows, "nonfinite_skipped") == [0.0, 1.0, 1.0]


def test_a_cut_fused_run_resumes_exactly_and_may_resume_unfused(tmp_path, world):
    """The straight fused run against one cut after its step-2 state and trained again, twice: fused
    both times, and resumed with fused_backward off (the setting is not part of the resume
    fingerprint: the steps are the same)."""
    from tunelab.train.trainer import train

    sections = {"train": {"max_steps": 4}, "save": {"every_n_steps": 2}}
    straight = write_run(tmp_path / "a.toml", world, tmp_path / "a", report={"enabled": False},
                         optim={"schedule": "cosine", "warmup_steps": 1},
                         **{**sections, "train": {**sections["train"], "fused_backward": True}})
    train(load_config(straight))
    final = load_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    for resumed_fused in (True, False):
        cut = tmp_path / f"cut-{resumed_fused}"
        shutil.copytree(tmp_path / "a", cut)
        (cut / "checkpoints" / "last.safetensors").unlink()
        shutil.rmtree(cut / "state" / "step-00000004")
        again = write_run(tmp_path / f"cut-{resumed_fused}.toml", world, cut, report={"enabled": False},
                          optim={"schedule": "cosine", "warmup_steps": 1},
                          **{**sections, "train": {**sections["train"], "fused_backward": resumed_fused}})
        result = train(load_config(again))  # resumes from step 2: weights, optimizer states, schedule
        assert result.steps == 4
        resumed = load_file(cut / "checkpoints" / "last.safetensors")
        assert all(torch.equal(resumed[k], final[k]) for k in final), resumed_fused


# --- what cannot be honoured is refused before anything runs --------------------------------------------


def _problems(**sections) -> str:
    with pytest.raises(TunelabError) as err:
        parse_config({"train": {"fused_backward": True, **sections.pop("train", {})}, **sections})
    return str(err.value)


def test_config_check_refuses_what_the_fused_pass_cannot_honour():
    assert "Prodigy estimates its step size d" in _problems(optim={"name": "prodigy"})
    assert "schedule-free" in _problems(optim={"name": "adamw_schedulefree"})
    assert "bitsandbytes" in _problems(optim={"name": "adamw8bit"})
    assert "class_path = 'torch.optim.LBFGS'" in _problems(optim={"name": "class", "class_path": "torch.optim.LBFGS"})
    clip = _problems(train={"max_grad_norm": 1.0})
    assert "train.max_grad_norm_scope = 'per_parameter'" in clip and "train.max_grad_norm = 0" in clip
    assert "not 4" in _problems(train={"grad_accumulation": 4})
    assert "not 4" in _problems(train={"target_effective_batch": 8, "batch_size": 2})
    assert "one process, not 2" in _problems(train={"expect_world_size": 2})
    assert "mixed_precision = 'bf16' or 'no'" in _problems(train={"mixed_precision": "fp16"})
    every = _problems(train={"max_grad_norm": 1.0, "grad_accumulation": 2}, optim={"name": "prodigy"})
    assert "3 problem(s)" in every and every.count("or set train.fused_backward = false") == 3
    # what it can do passes
    for ok in ({"optim": {"name": "adafactor"}}, {"optim": {"name": "came"}}, {"optim": {"name": "lion"}},
               {"optim": {"name": "class", "class_path": "torch.optim.RAdam"}},
               {"train": {"fused_backward": True, "max_grad_norm": 1.0, "max_grad_norm_scope": "per_parameter"}},
               {"train": {"fused_backward": True, "full_bf16": True, "mixed_precision": "bf16", "bf16_update": "kahan"}}):
        parse_config({"train": {"fused_backward": True, **ok.pop("train", {})}, **ok})


def test_launch_refuses_more_processes_and_accumulation(tmp_path, world):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.train.fused import check_launch

    run_file = _run(tmp_path, world, "launch", True)
    res = CliRunner().invoke(app, ["config", "check", str(run_file), "--world-size", "2"])
    assert isinstance(res.exception, TunelabError) and "one process, not 2" in str(res.exception)
    assert CliRunner().invoke(app, ["config", "check", str(run_file)]).exit_code == 0
    cfg = load_config(run_file)
    with pytest.raises(TunelabError, match="not 2 .*grad_accumulation = 1"):
        check_launch(cfg, 1, 2)
    with pytest.raises(TunelabError, match="MULTI_GPU"):
        check_launch(cfg, 1, 1, "MULTI_GPU")
    check_launch(cfg, 1, 1)


def test_the_banner_counts_no_gradients_under_fused_backward():
    from tunelab.config import RunConfig
    from tunelab.train.trainer import memory_line

    n = 2_567_463_684  # SDXL's UNet
    line = memory_line(RunConfig.model_validate({"train": {"fused_backward": True}}), n, 13_107_200)
    assert "weights 4 + gradients ~0 (fused backward: one parameter's at a time, the largest 13,107,200 x 4 B = 50 MiB)" \
        " + adamw states 8 = 12 B" in line and "28.69 GiB" in line
    assert "gradients 4" in memory_line(RunConfig(), n)
