"""Trainer overhead: img/s of tunelab's optimizer step vs a bare PyTorch loop doing the same work.

Both sides run in this one process on the same toy model weights, the same cached latents
(`tunelab data cache`), the same prompts, batch size, AdamW settings and text-encoder training,
alternating A/B rounds so machine noise hits both alike. The bare loop is the minimum a hand
written script would do: scale latents, encode prompts (two CLIP encoders, penultimate states),
noise + timesteps, UNet forward, MSE, backward, optimizer step.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--rounds 3] [--batch 4]

Target (issue 4): tunelab / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: less sensitive to other load on the machine

import torch  # noqa: E402


def build_world(root: Path, n: int) -> tuple[Path, Path]:
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.data.latents import cache_latents
    from tunelab.models.arch import build_components
    from tunelab.toy.world import make_world

    make_world(root / "images", n=n, seed=0)
    index = root / "index.parquet"
    # one bucket (64x64) so every batch has the same shape on both sides
    opts = IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32))
    build_index([f"folder:{root / 'images'}"], index, opts)
    cache_latents(index, root / "latents", build_components("toy", seed=0).vae, progress=False)
    return index, root / "latents"


def write_run(root: Path, index: Path, latents: Path, batch: int, steps: int) -> Path:
    run = root / "run.toml"
    run.write_text(f"""
[run]
output_dir = "{root / 'run'}"
[model]
base = "toy"
[data]
index = "{index}"
latents = "{latents}"
[train]
batch_size = {batch}
grad_accumulation = 1
max_steps = {steps * 1000}
mixed_precision = "no"
gradient_checkpointing = false
[train.parts]
text_encoder = "on"
[optim]
lr_unet = 1e-4
lr_text_encoder_1 = 1e-5
lr_text_encoder_2 = 1e-5
""")
    return run


def tunelab_rate(setup, batches, steps: int, batch: int) -> float:
    from tunelab.train.trainer import optimizer_step

    optimizer_step(setup, batches)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        optimizer_step(setup, batches)
    return steps * batch / (time.perf_counter() - t)


def bare_rate(comps, tokenizers, data: list[dict], steps: int, batch: int) -> float:
    """The same forward (train/step.py's conditioning + predict), with nothing around it: fixed
    schedule, plain MSE, a bare AdamW; no accelerate, objective object, loss settings or logging."""
    from tunelab.train.objectives import NoisedBatch
    from tunelab.train.step import StepModels, TextSettings, conditioning, micro_conditioning, predict

    models = StepModels.of(comps, tokenizers)
    params = [p for m in (comps.unet, comps.text_encoder_1, comps.text_encoder_2) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)  # the same kernel as tunelab's
    ac = torch.linspace(0.9991, 0.0047, 1000)  # a fixed schedule: the bare loop needs no scheduler object
    gen = torch.Generator().manual_seed(0)
    text = TextSettings(trains=True)

    def step(b: dict) -> None:
        x0 = b["latents"] * comps.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        noised = NoisedBatch(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise, a.flatten())
        pred = predict(models.unet, noised, conditioning(models, b["prompt"], text), micro_conditioning(b, "cpu"))
        torch.nn.functional.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(data[0])
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[(i + 1) % len(data)])
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from tunelab.config import load_config
    from tunelab.models.arch import build_components
    from tunelab.models.text import load_tokenizers
    from tunelab.train.parts import select_trainable
    from tunelab.train.trainer import batches as batch_stream, setup as build_setup

    root = Path(tempfile.mkdtemp(prefix="tunelab-bench-train-"))
    index, latents = build_world(root, n=max(64, args.batch * 8))
    cfg = load_config(write_run(root, index, latents, args.batch, args.steps))
    setup = build_setup(cfg)
    batches = batch_stream(setup, 0, 0)
    data = [b for _, _, b in (next(batches) for _ in range(8))]
    comps = build_components("toy", seed=cfg.run.seed)
    select_trainable(comps, cfg.train.parts, cfg.optim)
    for m in comps.modules().values():
        m.train(any(p.requires_grad for p in m.parameters()))
    toks = load_tokenizers("toy")
    ours, bare = [], []
    for r in range(args.rounds):
        ours.append(tunelab_rate(setup, batches, args.steps, args.batch))
        bare.append(bare_rate(comps, toks, data, args.steps, args.batch))
        print(f"round {r}: tunelab {ours[-1]:.2f} img/s, bare loop {bare[-1]:.2f} img/s, ratio {ours[-1] / bare[-1]:.3f}")
    med_ours, med_bare = statistics.median(ours), statistics.median(bare)
    ratios = sorted(o / b for o, b in zip(ours, bare))
    print(f"median: tunelab {med_ours:.2f} img/s, bare {med_bare:.2f} img/s, ratio of medians {med_ours / med_bare:.3f}, "
          f"median of per-round ratios {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}); "
          f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
