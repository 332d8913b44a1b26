"""What the in-training probe costs: one probe's time against the training time between probes.

In one process, on one toy run (toy model, cached latents, text encoders trained, batch 8),
alternating rounds: R optimizer steps of the real trainer (`optimizer_step`), then one probe of
the real callback's kind (`probe.suite.measure_models` on the live weights: the learn set of 8
held-out images and the preserve set of the toy's 8 looks x 2 seeds, 8 timesteps each, the
defaults). The share at the default interval (`every_n_steps = 0`: the interval the callback
chooses from the settings, `probe.callback.auto_interval`) is

    probe seconds / (interval x seconds per optimizer step)

and its target (issue 14) is < 2 %. The one-off preparation at the start of a run (the base draws
the preserve images and its predictions are kept) is timed too, and given in optimizer steps.

    .venv/bin/python benchmarks/probe_cost.py [--rounds 5] [--steps 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: less sensitive to other load on the machine


def build(root: Path, batch: int) -> Path:
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.data.latents import cache_latents
    from tunelab.models.arch import build_components
    from tunelab.toy.world import make_world

    make_world(root / "images", n=96, seed=0)
    index = root / "index.parquet"
    opts = IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32), holdout=0.1)
    build_index([f"folder:{root / 'images'}"], index, opts)
    cache_latents(index, root / "latents", build_components("toy", seed=0).vae, progress=False)
    run = root / "run.toml"
    run.write_text(f"""
[run]
output_dir = "{root / 'run'}"
[model]
base = "toy"
max_chunks = 1
[data]
index = "{index}"
latents = "{root / 'latents'}"
[train]
batch_size = {batch}
grad_accumulation = 1
max_steps = 100000
mixed_precision = "no"
gradient_checkpointing = false
[train.parts]
text_encoder = "on"
[optim]
lr_unet = 1e-4
lr_text_encoder_1 = 1e-5
lr_text_encoder_2 = 1e-5
[probe]
enabled = true
""")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps timed per round")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import torch

    from tunelab.config import load_config
    from tunelab.probe.callback import auto_interval, planned_cost
    from tunelab.probe.suite import measure_models, prepare
    from tunelab.train.step import StepModels
    from tunelab.train.trainer import batches as batch_stream, optimizer_step, setup as build_setup

    root = Path(tempfile.mkdtemp(prefix="tunelab-bench-probe-"))
    cfg = load_config(build(root, args.batch))
    s = build_setup(cfg)
    stream = batch_stream(s, 0, 0)
    t = time.perf_counter()
    prepared = prepare(cfg, "toy", root / "probes", lambda: (s.comps, s.tokenizers))
    prep_s = time.perf_counter() - t
    models = StepModels.of(s.comps, s.tokenizers)
    interval = auto_interval(planned_cost(cfg, "toy"), args.batch)
    optimizer_step(s, stream)  # warm-up
    measure_models(prepared, models)
    step_s, probe_s = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            optimizer_step(s, stream)
        step_s.append((time.perf_counter() - t) / args.steps)
        t = time.perf_counter()
        measure_models(prepared, models)
        probe_s.append(time.perf_counter() - t)
        print(f"round {r}: {step_s[-1]:.3f} s per optimizer step, {probe_s[-1]:.3f} s per probe "
              f"({probe_s[-1] / step_s[-1]:.2f} steps)")
    step, probe = statistics.median(step_s), statistics.median(probe_s)
    sets = " + ".join(f"{x.name} {len(x)}" for x in prepared.probe.sets)
    print(f"probe: {sets} samples x {len(prepared.probe.timesteps)} timesteps = {prepared.probe.forwards} UNet forwards; "
          f"default interval {interval} steps at batch {args.batch}")
    print(f"median: {step:.3f} s per step, {probe:.3f} s per probe = {probe / step:.2f} steps; "
          f"share at the default interval {100 * probe / (interval * step):.2f} % (target < 2 %); "
          f"at every 100 steps {100 * probe / (100 * step):.2f} %")
    print(f"one-off preparation (preserve renders + base predictions): {prep_s:.1f} s = {prep_s / step:.0f} steps; "
          f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
