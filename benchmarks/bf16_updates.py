"""What bf16 weights keep of their updates: fp32 master weights vs full_bf16 nearest / stochastic / kahan.

Part 1, isolated (no model): one fixed gradient stream (a constant signal plus noise, N(1, 1) per
element, so Adam's update is ~lr) through `LowPrecisionAdamW` on 1 M weights with SDXL-like sizes
(|w| log-uniform over 1e-4 .. 0.3), at LR 1.5e-6 / 1e-5 / 1e-4, 300 steps (arms fp32, nearest,
stochastic, kahan, exact): the share of
(step, weight) pairs where the stored weight did not move (for stochastic rounding most of those
are its unbiased "not this time"), and the progress along the signal relative to fp32 (summed
displacement / fp32's; kahan counts its compensation, exact its low bits), in bands of |w|.

Part 2, the real trainer on the toy (`tunelab train` subprocesses, 96 toy images, batch 4, text
encoders on, UNet 1.5e-6 / TE 1.2e-5, `--steps` steps): the share of UNet elements that changed
from the start, and the progress (projection of each arm's displacement onto fp32 master's,
over fp32's squared length).

With `--every K` part 2 also saves every K steps and prints how the share of changed elements
grows with the steps (`--arms fp32,stochastic` picks the arms, `--skip-isolated` skips part 1).

    .venv/bin/python benchmarks/bf16_updates.py [--steps 300] [--skip-trainer]
    .venv/bin/python benchmarks/bf16_updates.py --skip-isolated --steps 3000 --every 250 --arms fp32,stochastic
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ARMS = ("fp32", "nearest", "stochastic", "kahan", "exact")
BANDS = ((1e-4, 3e-3), (3e-3, 3e-2), (3e-2, 0.3))


def isolated(lr: float, steps: int, n: int = 1_000_000) -> dict[str, dict]:
    from tunelab.train.lowprec import LowPrecisionAdamW

    gen = torch.Generator().manual_seed(0)
    w0 = torch.exp(torch.empty(n).uniform_(torch.log(torch.tensor(1e-4)).item(), torch.log(torch.tensor(0.3)).item(),
                                           generator=gen))
    w0 = (w0 * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).to(torch.bfloat16).float()  # bf16 values
    out = {}
    for arm in ARMS:
        p = w0.clone().to(torch.float32 if arm == "fp32" else torch.bfloat16).requires_grad_()
        opt = LowPrecisionAdamW([p], lr=lr, weight_decay=0.0, update="nearest" if arm in ("fp32", "nearest") else arm,
                                seed=1)
        g_gen = torch.Generator().manual_seed(2)
        vanished = 0
        for _ in range(steps):
            before = p.detach().clone()
            p.grad = (1 + torch.randn(n, generator=g_gen)).to(p.dtype)
            opt.step()
            vanished += int((p.detach() == before).sum())
        held = p.detach().float()
        if arm == "kahan":
            held = held + opt.state[p]["compensation"].float()
        if arm == "exact":
            held = opt.master_weight(p)  # the bf16 half + its low bits: the whole weight
        out[arm] = {"moved": w0 - held, "vanished": vanished / (steps * n)}
    ref = out["fp32"]["moved"]
    for arm in ARMS:
        moved = out[arm]["moved"]
        out[arm]["progress"] = float(moved.double().sum() / ref.double().sum())
        out[arm]["bands"] = [float(moved[(w0.abs() >= lo) & (w0.abs() < hi)].double().sum()
                                   / ref[(w0.abs() >= lo) & (w0.abs() < hi)].double().sum()) for lo, hi in BANDS]
    return out


def trainer(steps: int, root: Path, arms: tuple[str, ...] = ARMS, every: int = 0) -> dict[str, dict]:
    from safetensors.torch import load_file

    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.models.arch import build_components
    from tunelab.models.checkpoint import save_checkpoint
    from tunelab.toy.world import make_world

    make_world(root / "images", n=96, seed=0)
    build_index([f"folder:{root / 'images'}"], root / "index.parquet",
                IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32)))
    save_checkpoint(build_components("toy", seed=0), root / "base.safetensors", dtype="fp32")
    base = {k: v for k, v in load_file(root / "base.safetensors").items() if k.startswith("model.diffusion_model.")}
    settings = {"fp32": 'full_bf16 = false', "nearest": 'full_bf16 = true\nbf16_update = "nearest"',
                "stochastic": 'full_bf16 = true\nbf16_update = "stochastic"', "kahan": 'full_bf16 = true\nbf16_update = "kahan"',
                "exact": 'full_bf16 = true\nbf16_update = "exact"'}
    moved, curves = {}, {}
    for arm in arms:
        lines = settings[arm]
        run = root / arm
        (root / f"{arm}.toml").write_text(f"""
[run]
output_dir = "{run}"
[model]
base = "{root / 'base.safetensors'}"
max_chunks = 1
[data]
index = "{root / 'index.parquet'}"
[train]
batch_size = 4
grad_accumulation = 1
max_steps = {steps}
mixed_precision = "bf16"
gradient_checkpointing = false
{lines}
[optim]
lr_unet = 1.5e-6
lr_text_encoder_1 = 1.2e-5
lr_text_encoder_2 = 1.2e-5
[save]
every_n_steps = {every}
every_n_epochs = 0
keep_last = 0
dtype = "fp32"
""")
        proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(root / f"{arm}.toml")], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        last = load_file(run / "checkpoints" / "last.safetensors")
        start = {k: (v if arm == "fp32" else v.to(torch.bfloat16).float()) for k, v in base.items()}
        moved[arm] = {k: last[k].float() - start[k].float() for k in base if base[k].is_floating_point()}
        curves[arm] = {}
        for ckpt in sorted((run / "checkpoints").glob("step-*.safetensors")):
            w = load_file(ckpt)
            curves[arm][int(ckpt.stem.split("-")[1])] = (sum(int((w[k].float() != start[k].float()).sum()) for k in start)
                                                         / sum(v.numel() for v in start.values()))
        curves[arm][steps] = sum(int((d != 0).sum()) for d in moved[arm].values()) / sum(v.numel() for v in start.values())
    ref = moved["fp32"] if "fp32" in moved else next(iter(moved.values()))
    ref_sq = sum(float(d.double().pow(2).sum()) for d in ref.values())
    total = sum(d.numel() for d in ref.values())
    out = {}
    for arm, d in moved.items():
        out[arm] = {"changed": sum(int((x != 0).sum()) for x in d.values()) / total,
                    "progress": sum(float((x.double() * ref[k].double()).sum()) for k, x in d.items()) / ref_sq,
                    "curve": curves[arm]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--skip-isolated", action="store_true")
    ap.add_argument("--every", type=int, default=0, help="part 2: also save every K steps and print the curve")
    ap.add_argument("--arms", default=",".join(ARMS), help="part 2's arms, comma-separated (fp32 first)")
    args = ap.parse_args()
    if not args.skip_isolated:
        part1(args.steps)
    if args.skip_trainer:
        return
    arms = tuple(args.arms.split(","))
    res = trainer(args.steps, Path(tempfile.mkdtemp(prefix="tunelab-bench-bf16-")), arms, args.every)
    print(f"\ntoy trainer, UNet 1.5e-6 / TE 1.2e-5, {args.steps} steps, batch 4 (UNet elements)")
    print("| arm | elements changed | changed vs fp32 | progress along fp32's move |")
    print("| --- | ---: | ---: | ---: |")
    first = res[arms[0]]["changed"]
    for arm, r in res.items():
        print(f"| {arm} | {100 * r['changed']:.2f} % | {r['changed'] / first:.3f} | {r['progress']:.3f} |")
    if args.every:
        steps = sorted(set().union(*(r["curve"] for r in res.values())))
        print("\nelements changed after N steps (share of the UNet's elements)")
        print("| steps | " + " | ".join(res) + " |")
        print("| ---: | " + " | ".join("---:" for _ in res) + " |")
        for n in steps:
            print(f"| {n} | " + " | ".join(f"{100 * r['curve'].get(n, float('nan')):.2f} %" for r in res.values()) + " |")


def part1(steps: int) -> None:
    print(f"isolated AdamW, 1 M weights, |w| log-uniform 1e-4..0.3, {steps} steps; progress = displacement / fp32's")
    print("| lr | arm | stored weight unchanged (per step) | progress | abs(w) < 3e-3 | 3e-3 to 3e-2 | 3e-2 to 0.3 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for lr in (1.5e-6, 1e-5, 1e-4):
        res = isolated(lr, steps)
        for arm in ARMS:
            r = res[arm]
            print(f"| {lr:g} | {arm} | {100 * r['vanished']:.1f} % | {r['progress']:.3f} | "
                  + " | ".join(f"{b:.3f}" for b in r["bands"]) + " |", flush=True)


if __name__ == "__main__":
    main()
