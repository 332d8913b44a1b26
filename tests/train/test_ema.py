"""EMA: diffusers' EMAModel math, a file beside every checkpoint, and an exact resume."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from tests.train.conftest import write_run
from tunelab.config import EmaSection
from tunelab.train.ema import EmaCallback, ema_decay


class _Ctx:  # the few LoopContext fields the EMA reads
    def __init__(self, comps, step):
        self.comps, self.progress = comps, type("P", (), {"step": step})()


def test_ema_matches_diffusers_ema_model(toy):
    from diffusers.training_utils import EMAModel

    params = [p for p in toy.unet.parameters()][:4]
    for p in params:
        p.requires_grad_(True)
    theirs = EMAModel([p.detach().clone() for p in params], decay=0.95)
    ours = EmaCallback(EmaSection(enabled=True, decay=0.95))
    saved = [p.detach().clone() for p in params]
    ours.on_start(_Ctx(toy, 0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(1, 40):
            for p in toy.unet.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
            ours.on_step(_Ctx(toy, step))
            theirs.step([p for p in toy.unet.parameters() if p.requires_grad][:4])
        mine = {n: s for n, s in zip(ours.names, ours.shadow)}
        trained = [n for n, p in (("unet." + n, p) for n, p in toy.unet.named_parameters()) if p.requires_grad][:4]
        for name, ref in zip(trained, theirs.shadow_params):
            torch.testing.assert_close(mine[name], ref.float(), rtol=0, atol=1e-6)
        for p, s in zip(params, saved):
            p.copy_(s)
    assert [round(ema_decay(0.9999, n), 6) for n in (0, 1, 10, 10_000)] == [0.0, 0.181818, 0.55, 0.999101]


def test_ema_is_saved_beside_checkpoints_and_resumes_exactly(tmp_path, world):
    from tunelab.train.trainer import train

    sections = dict(train={"max_steps": 4}, save={"every_n_steps": 2, "dtype": "fp32"},
                    ema={"enabled": True, "decay": 0.9, "every_n_steps": 1})
    whole = write_run(tmp_path / "whole.toml", world, tmp_path / "whole", **sections)
    train(whole)
    ema_dir = tmp_path / "whole" / "checkpoints" / "ema"
    assert sorted(p.name for p in ema_dir.iterdir()) == ["last.safetensors", "step-00000002.safetensors"]
    final, live = load_file(ema_dir / "last.safetensors"), load_file(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    moved = [k for k in final if not torch.equal(final[k], live[k])]
    assert moved and all(k.startswith(("model.diffusion_model.", "conditioner.")) for k in moved)
    # the same run, stopped after step 2's state (as a kill would leave it), then run again
    cut = write_run(tmp_path / "cut.toml", world, tmp_path / "cut", **sections)
    train(cut)
    run = tmp_path / "cut"
    for p in (run / "checkpoints" / "last.safetensors", run / "checkpoints" / "ema" / "last.safetensors"):
        p.unlink()
    shutil.rmtree(run / "state" / "step-00000004")
    train(cut)  # resumes from step 2: its weights, optimizer, schedule and EMA
    again = load_file(run / "checkpoints" / "ema" / "last.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_the_banner_states_memory_per_trained_parameter():
    from tunelab.config import RunConfig
    from tunelab.train.trainer import memory_line

    n = 2_567_463_684  # SDXL's UNet
    assert "= 16 B on the device" in memory_line(RunConfig(), n) and "38.26 GiB" in memory_line(RunConfig(), n)
    bf16 = RunConfig.model_validate({"train": {"full_bf16": True, "mixed_precision": "bf16", "bf16_update": "kahan"},
                                     "ema": {"enabled": True}})
    line = memory_line(bf16, n)
    assert "weights 2 + gradients 2 + adamw states 8 + Kahan 2 = 14 B" in line and "EMA 4 B on the CPU" in line
    eight = RunConfig.model_validate({"optim": {"name": "adamw8bit"}, "ema": {"enabled": True, "device": "same"}})
    assert "adamw8bit states 2 + EMA 4 = 14 B" in memory_line(eight, n)


def test_grid_or_probes_on_the_ema_need_one():
    import pytest
    from pydantic import ValidationError

    from tunelab.config import RunConfig

    with pytest.raises(ValidationError, match=r"grid.weights = 'both' and probe.weights = 'ema' need an EMA; set \[ema\] enabled"):
        RunConfig.model_validate({"grid": {"weights": "both"}, "probe": {"weights": "ema"}})
    RunConfig.model_validate({"grid": {"weights": "ema"}, "ema": {"enabled": True}})


def test_swapped_in_puts_the_live_weights_back_even_on_error(toy):
    import pytest

    ema = EmaCallback(EmaSection(enabled=True, decay=0.5))
    for p in toy.unet.parameters():
        p.requires_grad_(True)
    ema.on_start(_Ctx(toy, 0))
    with torch.no_grad():
        for p in toy.unet.parameters():
            p.add_(1.0)
    live = [p.detach().clone() for p in toy.unet.parameters()]
    with pytest.raises(KeyError):
        with ema.swapped_in(toy):
            assert all(torch.equal(p, s) for p, s in zip(toy.unet.parameters(), ema.shadow))
            raise KeyError("inside")
    assert all(torch.equal(p, k) for p, k in zip(toy.unet.parameters(), live))


def test_the_ema_of_an_exact_bf16_run_averages_the_whole_weights(toy):
    """bf16_update = 'exact': the EMA follows the fp32 weights, not their bf16 halves (which move
    only by whole bf16 steps at small LRs)."""
    from tunelab.train.lowprec import LowPrecisionAdamW

    params = [p for p in toy.unet.parameters()][:3]
    for p in toy.unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.data = p.data.to(torch.bfloat16)
        p.requires_grad_(True)
    opt = LowPrecisionAdamW(params, lr=1e-5, weight_decay=0.0, update="exact")
    ema = EmaCallback(EmaSection(enabled=True, decay=0.5))
    ctx = _Ctx(toy, 0)
    ctx.optimizer = opt
    ema.on_start(ctx)
    ref = [p.detach().float().clone() for p in params]  # the EMA by hand, from the whole weights
    for step in range(1, 6):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        ctx.progress.step = step
        ema.on_step(ctx)
        one_minus = 1.0 - ema_decay(0.5, step - 1)
        ref = [r - (r - opt.master_weight(p)) * one_minus for r, p in zip(ref, params)]
    assert any(not torch.equal(opt.master_weight(p), p.detach().float()) for p in params)  # the halves lag
    for s, r in zip(ema.shadow, ref):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-7)
