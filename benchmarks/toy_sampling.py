"""Scoring speed on the toy base: one image per pipeline call vs `generate_batch`, fp16 vs fp32.

    .venv/bin/python benchmarks/toy_sampling.py [--n 40] [--steps 30]

Renders the same n (prompt, seed) pairs three ways side by side in one run: fp16 weights one by
one, fp32 one by one, fp32 in one batch; prints seconds per image and the ratios, and the
largest pixel difference between a batched and a single fp32 render (batch-size rounding only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.models.text import load_tokenizers
    from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate, generate_batch
    from tunelab.toy.evaluate import base_looks
    from tunelab.toy.pretrain import shipped_base
    from tunelab.toy.world import prompt_of

    toks = load_tokenizers("toy")
    prompts = [prompt_of(look) for look in (base_looks(args.n))]
    seeds = list(range(args.n))
    s = SampleSettings(steps=args.steps, cfg=2.0, width=64, height=64, max_chunks=1)
    times, singles = {}, None
    for name, dtype in (("fp16 single", torch.float16), ("fp32 single", torch.float32)):
        model = build_pipeline(load_checkpoint(shipped_base(), dtype=dtype), toks)
        n = args.n if dtype == torch.float32 else max(4, args.n // 5)  # fp16 on the CPU is slow: fewer
        t = time.perf_counter()
        images = [generate(model, SampleSettings(**{**s.to_dict(), "prompt": p, "seed": k})).image
                  for p, k in zip(prompts[:n], seeds[:n])]
        times[name] = (time.perf_counter() - t) / n
        singles = images
    t = time.perf_counter()
    batched = generate_batch(model, prompts, seeds, s)
    times["fp32 batch"] = (time.perf_counter() - t) / args.n
    diff = max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(singles, batched))
    for name, sec in times.items():
        print(f"{name:12s} {1000 * sec:8.1f} ms/image  ({times['fp32 batch'] / sec:.3f} of the batch's rate)")
    print(f"largest pixel difference, batched vs single fp32: {diff:.0f} / 255")


if __name__ == "__main__":
    main()
