"""Benchmark: decode + resize throughput of the caching pipeline vs a bare PIL loop (target ≥ 0.8x).

Both loops read the same generated files (photo-like JPEG and WebP at typical Danbooru sizes) on
one core and produce the bucket-sized RGB pixels: the bare loop is
`Image.open(p).convert("RGB").resize(cover_size, LANCZOS).crop(box)`; ours is
`tunelab.data.images.load_into_bucket` (header probe, EXIF, mode handling, JPEG draft, reduce
then Lanczos). Alternating rounds; the best of 3 per loop, to damp a shared machine's noise.

    .venv/bin/python benchmarks/data_decode.py --n 120 --workdir /tmp/tunelab-bench/decode
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tunelab.data.buckets import BucketConfig, assign_buckets, make_buckets, resize_plan
from tunelab.data.images import ImageRef, load_into_bucket

SIZES = [(2048, 1536), (1536, 2048), (1200, 1800), (2480, 3508), (1920, 1080), (1000, 1000)]


def generate(workdir: Path, n: int) -> list[Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        fmt = "jpg" if i % 3 else "webp"
        path = workdir / f"{i:04d}.{fmt}"
        paths.append(path)
        if path.exists():
            continue
        # Smooth gradients plus noise: compresses and decodes like a real picture, not like flat colour.
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 255
        noise = rng.normal(0, 12, (h // 4, w // 4, 3)).repeat(4, 0).repeat(4, 1)
        pix = np.clip(base + noise[:h, :w], 0, 255).astype(np.uint8)
        Image.fromarray(pix).save(path, quality=90)
    return paths


def bare_loop(paths: list[Path], plans: list) -> float:
    t = time.perf_counter()
    for p, ((rw, rh), box) in zip(paths, plans):
        with Image.open(p) as im:
            out = im.convert("RGB").resize((rw, rh), Image.Resampling.LANCZOS).crop(box)
            np.asarray(out)
    return len(paths) / (time.perf_counter() - t)


def our_loop(paths: list[Path], buckets: list[tuple[int, int]]) -> float:
    t = time.perf_counter()
    for p, b in zip(paths, buckets):
        load_into_bucket(ImageRef(str(p)), b)
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tunelab-bench/decode"))
    args = ap.parse_args()
    paths = generate(args.workdir, args.n)
    table = make_buckets(BucketConfig())
    sizes = [Image.open(p).size for p in paths]
    ids = assign_buckets(np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes]), table)
    buckets = [tuple(int(v) for v in table[i]) for i in ids]
    plans = [resize_plan(w, h, b) for (w, h), b in zip(sizes, buckets)]
    bare, ours = [], []
    for _ in range(3):
        bare.append(bare_loop(paths, plans))
        ours.append(our_loop(paths, buckets))
    load = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"images": len(paths), "bare_pil_img_s": round(max(bare), 2), "tunelab_img_s": round(max(ours), 2),
                      "ratio": round(max(ours) / max(bare), 2), "loadavg": load}))


if __name__ == "__main__":
    main()
