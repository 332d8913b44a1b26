"""Evaluations per minute of `merge evolve`'s in-memory mixing against writing each candidate
with sd-mecha, for the same candidates and the same probe.

Side by side in one process, alternating (the machine is shared and noisy), on a probed toy run:

  in memory   `Mixer.apply(w)` (base + w x task vector, in the live modules) + the probe
  sd-mecha    the candidate's recipe merged by sd-mecha to a file, loaded, + the same probe

Each candidate is a random per-part ratio vector (te1, te2 and 21 UNet blocks). Both paths
measure the same fitness (checked to 1e-4); the ratio of evaluations per minute is what a search
gains by never writing a candidate.

    .venv/bin/python benchmarks/merge_evolve.py --run RUN --base BASE.safetensors --finetune F.safetensors [--rounds 4]

With no --run, the demo's run is used (`tunelab demo --out demo-out` first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("demo-out/run"))
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--finetune", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import numpy as np

    import torch

    from tunelab.merge.evolve import EvolveSettings, Fitness, Mixer
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.probe.suite import measure_models
    from tunelab.train.step import StepModels
    from tunelab.merge.presets import Ratio, build
    from tunelab.merge.run import merge_recipe
    from tunelab.toy.pretrain import shipped_base

    base = args.base or shipped_base()
    ft = args.finetune or args.run / "checkpoints" / "last.safetensors"
    mixer = Mixer(base, [ft], "blocks")
    fitness = Fitness(args.run, mixer, EvolveSettings().fitness)
    rng = np.random.default_rng(0)
    mem, mecha, diffs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            w = rng.uniform(0, 1, mixer.dims)
            t = time.perf_counter()
            f_mem, _ = fitness(w)
            mem.append(time.perf_counter() - t)
            ratio = Ratio(0.0, components={p: float(w[j]) for j, p in enumerate(mixer.parts) if p in ("te1", "te2")},
                          blocks={p: float(w[j]) for j, p in enumerate(mixer.parts) if p not in ("te1", "te2")})
            t = time.perf_counter()
            path = merge_recipe(build("weighted_sum", [base, ft], alpha=ratio), Path(tmp) / f"c{i}.safetensors",
                                dtype="fp32", progress=False).path
            comps = load_checkpoint(path, dtype=torch.float32)  # the written candidate, loaded
            scalars = measure_models(fitness.prepared, StepModels.of(comps, fitness.tokenizers)).scalars()
            f_file = sum(v * scalars[k] for k, v in fitness.weights.items())
            mecha.append(time.perf_counter() - t)
            diffs.append(abs(f_file - f_mem) / abs(f_mem))
    m, s = statistics.median(mem), statistics.median(mecha)
    print(f"rounds {args.rounds}; same fitness on both paths: max relative difference {max(diffs):.2e}")
    print(f"in memory: {m:.2f} s per evaluation = {60 / m:.0f} per minute")
    print(f"sd-mecha file per candidate: {s:.2f} s per evaluation = {60 / s:.1f} per minute")
    print(f"ratio: {s / m:.1f}x more evaluations per minute in memory")


if __name__ == "__main__":
    main()
