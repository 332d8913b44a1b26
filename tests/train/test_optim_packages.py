"""The optimizers from packages with their own rules: schedule-free AdamW (`schedulefree`: train /
eval weights, a constant schedule, checkpoints and states in eval mode, exact resume) and
torch-optimi's (`optimi_*`: Kahan summation as their bf16 remedy), over tunelab's named groups."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.train.conftest import write_run
from tunelab.config import OptimSection, RunConfig, parse_config
from tunelab.errors import TunelabError
from tunelab.train import optim as O
from tunelab.train.parts import TrainablePlan

schedulefree = pytest.importorskip("schedulefree")
optimi = pytest.importorskip("optimi")

_CLASSES = {"adamw_schedulefree": schedulefree.AdamWScheduleFree, "optimi_adamw": optimi.AdamW,
            "optimi_lion": optimi.Lion, "optimi_stableadamw": optimi.StableAdamW, "optimi_adan": optimi.Adan}
# one keyword per optimizer that optim.args hands through, and where the group shows it
_ARGS = {"adamw_schedulefree": {"weight_lr_power": 1.0}, "optimi_adamw": {"foreach": False},
         "optimi_lion": {"foreach": False}, "optimi_stableadamw": {"foreach": False}, "optimi_adan": {"adam_wd": True}}


def _plan(dtype: torch.dtype = torch.float32) -> TrainablePlan:
    """Two UNet blocks with block LRs (x0.5, x2) and both text encoders: four named groups."""
    g = torch.Generator().manual_seed(0)
    p = {k: torch.nn.Parameter(torch.randn(6, 5, generator=g).to(dtype)) for k in ("IN04", "OUT08", "te1", "te2")}
    return TrainablePlan(components={}, param_groups={"unet": [p["IN04"], p["OUT08"]], "text_encoder_1": [p["te1"]],
                                                      "text_encoder_2": [p["te2"]]},
                         unet_blocks={"IN04": [p["IN04"]], "OUT08": [p["OUT08"]]},
                         block_multipliers={"IN04": 0.5, "OUT08": 2.0})


def _section(name: str, **kw) -> OptimSection:
    betas = (0.98, 0.92, 0.99) if name == "optimi_adan" else (0.9, 0.999)
    return OptimSection(name=name, lr_unet=1e-2, lr_text_encoder_1=2e-3, lr_text_encoder_2=3e-3, weight_decay=0.05,
                        betas=betas, **kw)


@pytest.mark.parametrize("name", list(_CLASSES))
def test_each_optimizer_gets_the_named_groups_and_moves_every_one(name):
    """Group names, each group's lr (block multipliers applied) and weight decay as set, optim.args
    passed through (schedulefree's AdamWScheduleFree / optimi's constructors take them by these
    names: schedulefree/adamw_schedulefree.py, optimi/adamw.py, lion.py, stableadamw.py, adan.py)."""
    plan = _plan()
    opt = O.build_optimizer(plan, _section(name, args=_ARGS[name], warmup_steps=3))
    assert type(opt) is _CLASSES[name]
    groups = opt.param_groups
    assert [g["name"] for g in groups] == ["unet/IN04", "unet/OUT08", "text_encoder_1", "text_encoder_2"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-3, 2e-2, 2e-3, 3e-3], rel=1e-12)
    assert all(g["weight_decay"] == 0.05 for g in groups)
    key, value = next(iter(_ARGS[name].items()))
    assert all(g[key] == value for g in groups)
    if name == "adamw_schedulefree":
        assert all(g["warmup_steps"] == 3 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in groups)
        opt.train()  # schedule-free steps only in train mode (the trainer's eval_weights keeps it there)
    elif name == "optimi_adan":
        assert all((g["beta1"], g["beta2"], g["beta3"]) == (0.98, 0.92, 0.99) for g in groups)
    else:
        assert all((g["beta1"], g["beta2"]) == (0.9, 0.999) for g in groups)
        assert name == "optimi_lion" or all(g["eps"] == 1e-8 for g in groups)
    params = [p for g in groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    sum((p * torch.linspace(-1, 1, p.numel()).view_as(p)).sum() for p in params).backward()
    opt.step()
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert all(moved)


def test_optimi_kahan_sum_follows_train_bf16_update():
    """bf16 weights: 'kahan' -> kahan_sum=True, 'nearest' -> False, 'stochastic' refused with the fix;
    fp32 weights keep optimi's own default (None: it compensates low-precision weights only; Adan
    False), optimi/adamw.py and adan.py signatures."""
    for update, expected in (("kahan", True), ("nearest", False)):
        opt = O.build_optimizer(_plan(torch.bfloat16), _section("optimi_adamw"), bf16_update=update)
        assert all(g["kahan_sum"] is expected for g in opt.param_groups)
    with pytest.raises(TunelabError, match="train.bf16_update = 'kahan'.*optim.name = 'adamw' / 'lion'"):
        O.build_optimizer(_plan(torch.bfloat16), _section("optimi_lion"), bf16_update="stochastic")
    assert all(g["kahan_sum"] is None for g in O.build_optimizer(_plan(), _section("optimi_adamw")).param_groups)
    assert all(g["kahan_sum"] is False for g in O.build_optimizer(_plan(), _section("optimi_adan")).param_groups)
    with pytest.raises(TunelabError, match=r"optim.betas = \[0.98, 0.92, 0.99\]"):
        O.build_optimizer(_plan(), OptimSection(name="optimi_adan"))


def test_optimi_kahan_recovers_the_fp32_sum_that_nearest_loses():
    """optimi's Lion on bf16 weights (optimi/lion.py `_single_param_lion`), a constant gradient of 1:
    every step moves the weight by exactly -lr, lr = 2^-10. From w = 1.0, 100 steps sum to
    1 - 100 * 2^-10 = 0.90234375 (a bf16 value: 231 * 2^-8). Below 1.0 bf16's spacing is 2^-8, so
    1 - 2^-10 rounds back to 1.0: nearest never moves. Kahan keeps the lost 2^-10s in its buffer:
    weight + buffer is the fp32 sum exactly, the weight itself within half a spacing (2^-9)."""
    lr, steps, expected = 2.0**-10, 100, 1.0 - 100 * 2.0**-10
    assert expected == 0.90234375
    ends = {}
    for update in ("kahan", "nearest"):
        w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        plan = TrainablePlan(components={}, param_groups={"unet": [w], "text_encoder_1": [], "text_encoder_2": []})
        opt = O.build_optimizer(plan, OptimSection(name="optimi_lion", lr_unet=lr, weight_decay=0.0), bf16_update=update)
        for _ in range(steps):
            w.grad = torch.ones_like(w)  # optimi's Kahan path uses the gradient as scratch: a fresh one each step
            opt.step()
        comp = opt.state[w]["kahan_comp"]
        ends[update] = (w.detach().double(), None if comp is None else comp.double())
    kahan, buffer = ends["kahan"]
    assert torch.equal(kahan + buffer, torch.full((4,), expected, dtype=torch.float64))
    assert float((kahan - expected).abs().max()) <= 2.0**-9
    nearest, _ = ends["nearest"]
    assert torch.equal(nearest, torch.ones(4, dtype=torch.float64))  # lost all 0.0977 of the move


def test_eval_weights_shows_schedule_free_x_and_trains_on_y():
    """Two steps of schedule-free AdamW by hand (schedulefree/adamw_schedulefree.py `step`, `eval`):
    w = 1, gradient 0.5, lr 0.1, beta1 0.9, no decay. v-hat = g^2 so every normalised gradient is 1.
    Step 1: c = 1, z = 0.9, y = 0.9. Step 2: c = 0.5 (weights lr_max^2 each), y = lerp(0.9, z=0.9, 0.5)
    + 0.1 (0.9 * 0.5 - 1) = 0.845, z = 0.8. Eval: x = y + (1 - 1/beta1)(z - y) = 0.85, the average of
    z1 = 0.9 and z2 = 0.8. Other optimizers: eval_weights changes nothing."""
    w = torch.nn.Parameter(torch.ones(3))
    plan = TrainablePlan(components={}, param_groups={"unet": [w], "text_encoder_1": [], "text_encoder_2": []})
    opt = O.build_optimizer(plan, OptimSection(name="adamw_schedulefree", lr_unet=0.1, weight_decay=0.0))
    assert O.is_schedule_free(opt)
    with O.eval_weights(opt):
        pass  # the trainer's START: a fresh optimizer leaves it in train mode
    for _ in range(2):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.845), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[w]["z"], torch.full((3,), 0.8), rtol=0, atol=1e-6)
    with O.eval_weights(opt):
        torch.testing.assert_close(w.detach(), torch.full((3,), 0.85), rtol=0, atol=1e-6)
        assert opt.param_groups[0]["train_mode"] is False
    assert opt.param_groups[0]["train_mode"] is True
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.845), rtol=0, atol=1e-6)
    with O.eval_weights(opt, enabled=False):
        assert opt.param_groups[0]["train_mode"] is True
    plain = torch.nn.Parameter(torch.ones(3))
    adamw = O.build_optimizer(TrainablePlan(components={}, param_groups={"unet": [plain], "text_encoder_1": [],
                                                                         "text_encoder_2": []}), OptimSection())
    assert not O.is_schedule_free(adamw)
    with O.eval_weights(adamw):
        assert torch.equal(plain.detach(), torch.ones(3))


_SF = dict(train={"max_steps": 4}, save={"every_n_steps": 2, "dtype": "fp32"},
           optim={"name": "adamw_schedulefree", "lr_unet": 1e-3, "lr_text_encoder_1": 1e-4, "lr_text_encoder_2": 1e-4,
                  "warmup_steps": 2})


def test_schedule_free_checkpoints_hold_the_evaluation_weights(tmp_path, world):
    """Every checkpoint, EMA twin and training state holds x, the weights optimizer.eval() makes of
    the train-mode weights y (what schedule-free ships; kohya's train_network.py calls eval() before
    saving and sampling); its own warm-up shows in lr/unet; the state is saved in eval mode."""
    from tunelab.config import load_config
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.train.ema import trained_parameters
    from tunelab.train.trainer import loop, setup

    cfg = write_run(tmp_path / "sf.toml", world, tmp_path / "sf", **_SF, ema={"enabled": True, "update_after_step": 3})
    s = setup(load_config(cfg))
    inner = s.training.optimizer.optimizer  # accelerate's wrapper forwards eval() to it
    real_eval, seen = inner.eval, {}

    def recording_eval():  # the real eval(), with the weights before (y) and after (x) kept per step
        y = {n: p.detach().clone() for n, p in trained_parameters(s.comps)}
        real_eval()
        seen[s.progress.step] = (y, {n: p.detach().clone() for n, p in trained_parameters(s.comps)})

    inner.eval = recording_eval
    loop(s)
    assert sorted(seen) == [0, 1, 2, 3, 4]  # START, the EMA's steps and the saves
    for step, name in ((2, "step-00000002"), (4, "last")):
        y, x = seen[step]
        saved = dict(trained_parameters(load_checkpoint(tmp_path / "sf" / "checkpoints" / f"{name}.safetensors",
                                                        dtype=torch.float32)))
        assert all(torch.equal(saved[n], x[n]) for n in x)  # the file is eval()'s x, bit for bit
        assert sum(not torch.equal(x[n], y[n]) for n in x) > 0.9 * len(x)  # and not the train-mode y
    y4, x4 = seen[4]
    ema = dict(trained_parameters(load_checkpoint(tmp_path / "sf" / "checkpoints" / "ema" / "last.safetensors",
                                                  dtype=torch.float32)))
    assert all(torch.allclose(ema[n], x4[n], rtol=0, atol=1e-7) for n in x4)  # its one update copied x
    state = tmp_path / "sf" / "state" / "step-00000002"
    groups = torch.load(state / "optimizer.bin", weights_only=False)["param_groups"]
    assert [g["train_mode"] for g in groups] == [False, False, False]  # saved in eval mode ...
    unet = load_file(state / "model.safetensors")
    assert all(torch.equal(unet[k], seen[2][1][f"unet.{k}"]) for k in unet)  # ... with the weights x
    rows = pq.read_table(tmp_path / "sf" / "metrics.parquet").to_pylist()
    assert [r["value"] for r in rows if r["tag"] == "lr/unet"] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one AcceleratorState per process, fixed at the first precision it saw."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


_KAHAN = dict(train={"max_steps": 4, "mixed_precision": "bf16", "full_bf16": True, "bf16_update": "kahan"},
              save={"every_n_steps": 2, "dtype": "fp32"}, optim={"name": "optimi_adamw"})


@pytest.mark.parametrize("sections", [_SF, _KAHAN], ids=["adamw_schedulefree", "optimi_adamw-bf16-kahan"])
def test_resume_is_bitwise_identical(tmp_path, world, fresh_accelerator, sections):
    """A run cut after step 2's state (as a kill leaves it) and run again ends bit for bit where the
    uninterrupted run does (the pattern of test_ema.py). Schedule-free: the state holds x and eval
    mode, and the resumed run's first train() repeats the one the uninterrupted run made after
    saving it. optimi on bf16 weights: the Kahan buffers are part of the state."""
    from tunelab.train.trainer import train

    whole = write_run(tmp_path / "whole.toml", world, tmp_path / "whole", **sections)
    train(whole)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    (cut / "checkpoints" / "last.safetensors").unlink()
    shutil.rmtree(cut / "state" / "step-00000004")
    train(write_run(tmp_path / "cut.toml", world, cut, **sections))  # resumes from step 2
    final, again = (load_file(d / "checkpoints" / "last.safetensors") for d in (tmp_path / "whole", cut))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    step2 = load_file(cut / "checkpoints" / "step-00000002.safetensors")
    assert any(not torch.equal(step2[k], final[k]) for k in final)  # steps 3-4 did train


@pytest.mark.parametrize("settings, fix", [
    ({"optim": {"name": "adamw_schedulefree", "schedule": "cosine"}}, "optim.schedule must be 'constant'"),
    ({"optim": {"name": "adamw_schedulefree"}, "train": {"full_bf16": True, "mixed_precision": "bf16"}},
     "set train.bf16_update = 'nearest'"),
    ({"optim": {"name": "optimi_adamw"}, "train": {"full_bf16": True, "mixed_precision": "bf16"}},
     "set train.bf16_update = 'kahan'"),
    ({"optim": {"name": "optimi_adan"}}, r"set optim.betas = \[0.98, 0.92, 0.99\]"),
    ({"optim": {"name": "lion", "betas": [0.9, 0.99, 0.9]}}, "only optim.name = 'optimi_adan' takes"),
])
def test_config_check_refuses_what_they_cannot_do(settings, fix):
    with pytest.raises(TunelabError, match=fix):
        parse_config(settings)


def test_config_check_accepts_their_working_forms_and_names_a_missing_package(tmp_path, world, monkeypatch):
    import importlib.util

    from tunelab.config import check_installed

    bf16 = {"full_bf16": True, "mixed_precision": "bf16"}
    parse_config({"optim": {"name": "adamw_schedulefree", "warmup_steps": 100}, "train": bf16 | {"bf16_update": "nearest"}})
    parse_config({"optim": {"name": "optimi_lion"}, "train": bf16 | {"bf16_update": "kahan"}})
    parse_config({"optim": {"name": "optimi_adan", "betas": [0.98, 0.92, 0.99]}})
    refused = write_run(tmp_path / "r.toml", world, tmp_path / "r", optim={"name": "adamw_schedulefree",
                                                                             "schedule": "linear"})
    proc = run_cli("config", "check", refused, check=False)
    assert proc.returncode == 2 and "optim.schedule must be 'constant'" in proc.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optimi" else real(name, *a))
    with pytest.raises(TunelabError, match="pip install torch-optimi"):
        check_installed(RunConfig.model_validate({"optim": {"name": "optimi_stableadamw"}}))


def test_the_banner_counts_their_states_in_the_weights_dtype():
    """Bytes per trained parameter: schedule-free keeps z and the second moment (schedulefree's
    `step`: state['z'], state['exp_avg_sq'], clones of the weight); optimi its moments as
    zeros_like(weight) (Adan four: exp_avg, exp_avg_diff, exp_avg_sq, prev_grad), + its Kahan buffer."""
    from tunelab.train.trainer import memory_line

    n = 2_567_463_684
    bf16 = {"full_bf16": True, "mixed_precision": "bf16"}

    def line(optim: dict, train: dict | None = None) -> str:
        return memory_line(RunConfig.model_validate({"optim": optim, "train": train or {}}), n)

    assert "weights 4 + gradients 4 + adamw_schedulefree states 8 = 16 B" in line({"name": "adamw_schedulefree"})
    assert "weights 2 + gradients 2 + adamw_schedulefree states 4 = 8 B" in line(
        {"name": "adamw_schedulefree"}, bf16 | {"bf16_update": "nearest"})
    assert "optimi_adamw states 4 + Kahan 2 = 10 B" in line({"name": "optimi_adamw"}, bf16 | {"bf16_update": "kahan"})
    assert "weights 4 + gradients 4 + optimi_lion states 4 = 12 B" in line({"name": "optimi_lion"})
    assert "optimi_stableadamw states 8 = 16 B" in line({"name": "optimi_stableadamw"})
    assert "optimi_adan states 16 = 24 B" in line({"name": "optimi_adan", "betas": [0.98, 0.92, 0.99]})
    assert "optimi_adan states 8 + Kahan 2 = 14 B" in line({"name": "optimi_adan", "betas": [0.98, 0.92, 0.99]},
                                                           bf16 | {"bf16_update": "kahan"})
    # torch's AdamW on bf16 weights (nearest) keeps bf16 moments; tunelab's remedies keep fp32 ones
    assert "adamw states 4 = 8 B" in line({}, bf16 | {"bf16_update": "nearest"})
    assert "adamw states 8 + Kahan 2 = 14 B" in line({}, bf16 | {"bf16_update": "kahan"})


def test_kohyas_adamw_schedule_free_maps_with_a_constant_schedule():
    """kohya (library/train_util.py `get_optimizer`: names ending in 'schedulefree' ->
    schedulefree.AdamWScheduleFree; `get_scheduler_fix` -> a dummy scheduler) ignores
    --lr_scheduler with it; its warm-up is the optimizer's warmup_steps argument."""
    import tomllib

    from tunelab.kohya.convert import convert
    from tunelab.kohya.shell import parse_words

    line = ("sdxl_train.py --pretrained_model_name_or_path=b.safetensors --optimizer_type=AdamWScheduleFree "
            "--optimizer_args warmup_steps=50 weight_lr_power=1.0 --lr_scheduler=cosine --full_bf16 "
            "--mixed_precision=bf16 --max_train_steps=100")
    result = convert(parse_words(line.split()), "idx.parquet")
    doc = tomllib.loads(result.text)
    assert doc["optim"]["name"] == "adamw_schedulefree" and doc["optim"]["schedule"] == "constant"
    assert doc["optim"]["warmup_steps"] == 50 and doc["optim"]["args"] == {"weight_lr_power": 1.0}
    assert doc["train"]["bf16_update"] == "nearest"
    parse_config(doc)  # config check accepts what it wrote


def test_kohyas_optimi_classes_map_with_optimis_defaults():
    """`--optimizer_type optimi.AdamW` is optimi's class, not tunelab's adamw: kohya constructs it with
    optimi's defaults (optimi/adamw.py: betas (0.9, 0.99), eps 1e-6; adan.py: three betas, weight
    decay 2e-2), and optimi turns on Kahan summation for bf16 weights by itself (kahan_sum=None)."""
    import tomllib

    from tunelab.kohya.convert import convert
    from tunelab.kohya.shell import parse_words

    def run_file(args: str) -> dict:
        line = f"sdxl_train.py --pretrained_model_name_or_path=b.safetensors --max_train_steps=100 {args}"
        doc = tomllib.loads(convert(parse_words(line.split()), "idx.parquet").text)
        parse_config(doc)  # config check accepts what it wrote
        return doc

    doc = run_file("--optimizer_type=optimi.AdamW --full_bf16 --mixed_precision=bf16")
    assert {"name": "optimi_adamw", "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}.items() <= doc["optim"].items()
    assert doc["train"]["bf16_update"] == "kahan"
    adan = run_file("--optimizer_type=optimi.Adan --optimizer_args weight_decay=0.05")["optim"]
    assert (adan["name"], adan["betas"], adan["weight_decay"]) == ("optimi_adan", [0.98, 0.92, 0.99], 0.05)
