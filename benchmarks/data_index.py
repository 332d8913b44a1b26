"""Benchmark: `tunelab data index` on a 12.4 M-row Parquet table (target ≤ 120 s, ≤ 6 GB peak RSS),
then open the index and get the sampler's first batch of keys (target ≤ 15 s).

The input table (id, ~200-char tags, ~400-char caption, width, height) is generated here once and
kept in --workdir. Each measured step runs in a fresh subprocess so its peak RSS is its own.

    .venv/bin/python benchmarks/data_index.py --rows 12400000 --workdir /tmp/tunelab-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

POOL = 1 << 20  # distinct tag strings and captions; rows draw from them (zstd still sees real text)


def _pool_strings(rng: np.random.Generator, vocab: list[str], n: int, words: int, sep: str) -> pa.Array:
    picks = rng.integers(len(vocab), size=(n, words))
    return pa.array([sep.join(vocab[j] for j in row) for row in picks], pa.string())


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz_"))
    tag_vocab = ["".join(rng.choice(letters, rng.integers(4, 16))) for _ in range(20000)]
    word_vocab = ["".join(rng.choice(letters[:-1], rng.integers(2, 10))) for _ in range(5000)]
    tags = _pool_strings(rng, tag_vocab, POOL, 18, ", ")  # ~200 chars
    captions = _pool_strings(rng, word_vocab, POOL, 65, " ")  # ~400 chars
    schema = pa.schema([("id", pa.int64()), ("tags", pa.string()), ("caption", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32())])
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False) as w:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            t = rng.integers(POOL, size=n)
            c = rng.integers(POOL, size=n)
            w.write_table(pa.table({
                "id": np.arange(start, start + n, dtype=np.int64),
                "tags": tags.take(t),
                "caption": captions.take(c),
                "width": rng.integers(512, 4096, n).astype(np.int32),
                "height": rng.integers(512, 4096, n).astype(np.int32),
            }, schema=schema), row_group_size=131072)


INDEX_STEP = """
import resource, sys, time
from tunelab.data.index import build_index
t = time.perf_counter()
spec = f"table:{sys.argv[1]},template={{id}}.webp,root=/data/danbooru,prefix=danbooru/"
s = build_index([spec], sys.argv[2], progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, s.rows, s.mean_aspect_error)
"""

SAMPLER_STEP = """
import sys, time
t = time.perf_counter()
from tunelab.data.loader import open_index, BucketBatchSampler
idx = open_index(sys.argv[1])
sampler = BucketBatchSampler(idx.bucket_ids(), batch_size=8, seed=0, rank=0, world_size=8)
first = next(iter(sampler))
keys = idx.keys([row for _, row in first])
import resource
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(idx), keys[:2])
"""


def _measure(code: str, *args: str) -> tuple[float, float, list[str]]:
    """(seconds, peak RSS GiB, rest of the output) of `code` run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    secs, rss_kib, *rest = out.split(maxsplit=2)
    return float(secs), int(rss_kib) / 1024**2, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=12_400_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tunelab-bench"))
    ap.add_argument("--skip-index", action="store_true", help="reuse an index built by an earlier run")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    table = args.workdir / f"posts_{args.rows}.parquet"
    if not table.exists():
        t = time.perf_counter()
        generate(table, args.rows)
        print(f"generated {table} ({table.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    index = args.workdir / f"index_{args.rows}.parquet"
    load = open("/proc/loadavg").read().split()[:3]
    if not args.skip_index or not index.exists():
        secs, rss, rest = _measure(INDEX_STEP, str(table), str(index))
        print(json.dumps({"step": "index", "rows": args.rows, "seconds": round(secs, 1), "peak_rss_gib": round(rss, 2),
                          "index_gb": round(index.stat().st_size / 1e9, 2), "output": rest,
                          "loadavg_before": load}))
    load = open("/proc/loadavg").read().split()[:3]
    secs, rss, rest = _measure(SAMPLER_STEP, str(index))
    print(json.dumps({"step": "open + first batch of keys", "seconds": round(secs, 2), "peak_rss_gib": round(rss, 2),
                      "output": rest, "loadavg_before": load}))


if __name__ == "__main__":
    main()
