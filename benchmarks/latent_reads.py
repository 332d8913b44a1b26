"""Reading cached latents: the shard header parsed once vs the shard opened for every read.

    .venv/bin/python benchmarks/latent_reads.py [--entries 3000] [--reads 3000]

Writes a cache of toy-sized latents (4 x 8 x 8, 1,024 per shard, as `tunelab data cache` does),
then times `LatentStore.get` (offsets from the header it parsed once) against the same read with the shard opened each
time (what `get` did before), side by side, in one process. Prints reads/s and the ratio.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open


def _cache(folder: Path, entries: int, per_shard: int = 1024) -> None:
    from tunelab.data.latents import _write_shard

    rng = np.random.default_rng(0)
    for start in range(0, entries, per_shard):
        _write_shard(folder, 0, {f"toy/img_{i:06d}": (rng.standard_normal((4, 8, 8)).astype(np.float16),
                                                      {"original_size": [64, 64], "crop_ltrb": [0, 0, 64, 64]})
                                 for i in range(start, min(entries, start + per_shard))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=3000)
    ap.add_argument("--reads", type=int, default=3000)
    args = ap.parse_args()
    from tunelab.data.latents import LatentStore, checksum

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _cache(folder, args.entries)
        store = LatentStore(folder)
        if len(store) != args.entries:
            raise SystemExit(f"the benchmark's cache does not read as a tunelab cache ({len(store)} entries)")
        keys = random.Random(0).choices(store.keys(), k=args.reads)

        def reopened(key: str) -> np.ndarray:
            shard = store._where[key]
            with safe_open(str(shard), framework="np") as f:
                arr = f.get_tensor(key)
            assert checksum(arr) == store._info[key]["checksum"]
            return arr

        rows = {}
        for name, read in (("opened per read", reopened), ("header parsed once (LatentStore.get)", store.get)) * 2:
            t = time.perf_counter()
            for key in keys:
                read(key)
            rows[name] = args.reads / (time.perf_counter() - t)  # the second round of each is kept
        for name, rate in rows.items():
            print(f"{name:30s} {rate:10,.0f} reads/s")
        print(f"ratio: {rows['header parsed once (LatentStore.get)'] / rows['opened per read']:.1f}x")


if __name__ == "__main__":
    main()
