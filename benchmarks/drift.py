"""Benchmark: `tunelab drift` on N full-size SDXL-shaped checkpoints, against reading the same
files with `cat`, in the same run.

    .venv/bin/python benchmarks/drift.py [--n 4] [--arch sdxl] [--dtype fp16] [--dir /tmp/tunelab-bench/drift] [--keep] [--signs]

1. Generates N checkpoints with `tunelab model new --arch ARCH --seed i --dtype DTYPE` (random
   weights; the drift figures mean nothing, the work - read every byte, compare every key - is
   that of real checkpoints). Checks the free disk first and lowers N if it must (and says so).
2. Alternates `cat FILES > /dev/null` and `tunelab drift FILES --out DIR` (the whole command:
   imports, scan, JSON/CSV, plots) for --rounds rounds, ending with a cat. Before every timed run
   the files are evicted from the page cache (posix_fadvise DONTNEED on clean pages; no root
   needed), so each run reads from disk like the first read of a fresh checkpoint. Reports every
   figure, the medians, and drift against its neighbouring cats.
3. Peak RSS of the drift process from `os.wait4` (ru_maxrss of that child alone), against the
   target 2 GiB + N x the largest tensor (bytes in the file's dtype); wall time against the
   target 2 x one `cat` of the same files.
4. Deletes the checkpoints unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunelab.models.safetensors_io import read_header

GIB = 1 << 30
SDXL_FP16_BYTES = 6.94e9  # per file; the toy preset is ~11 MB


def tunelab_exe() -> list[str]:
    exe = Path(sys.executable).with_name("tunelab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tunelab"]


def generate(n: int, arch: str, dtype: str, folder: Path) -> tuple[list[Path], float]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, t0 = [], time.perf_counter()
    for i in range(n):
        path = folder / f"{arch}-{dtype}-seed{i}.safetensors"
        if not path.exists():
            subprocess.run([*tunelab_exe(), "model", "new", "--arch", arch, "--seed", str(i), "--dtype", dtype,
                            "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
        paths.append(path)
    return paths, time.perf_counter() - t0


def fit_n(n: int, arch: str, folder: Path) -> int:
    """Lower N until the files fit the free disk with 10 GB to spare."""
    if arch != "sdxl":
        return n
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    have = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    fits = int((free + have - 10e9) // SDXL_FP16_BYTES)
    if fits < n:
        print(f"NOTE: disk holds only {fits} full-size files next to 10 GB spare; N lowered from {n} to {fits}")
    return max(2, min(n, fits))


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_cat(paths: list[Path]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `cat FILES > /dev/null`, read cold."""
    evict(paths)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["cat", *map(str, paths)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("cat failed")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def timed_drift(paths: list[Path], out: Path, extra: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS bytes, stdout) of one `tunelab drift` process, read cold."""
    evict(paths)
    t0 = time.perf_counter()
    proc = subprocess.Popen([*tunelab_exe(), "drift", *map(str, paths), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tunelab drift failed with status {status}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, stdout  # ru_maxrss: KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4, help="number of checkpoints (4-6 for the issue's target)")
    ap.add_argument("--arch", default="sdxl", help="sdxl (full size, ~6.9 GB per file in fp16) or toy (quick check)")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tunelab-bench/drift"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints for a rerun")
    ap.add_argument("--rounds", type=int, default=3, help="cat/drift alternations (medians are reported)")
    ap.add_argument("--signs", action="store_true", help="run `tunelab drift --signs` (sign agreement too)")
    args = ap.parse_args()

    n = fit_n(args.n, args.arch, args.dir)
    paths, gen_s = generate(n, args.arch, args.dtype, args.dir)
    headers = [read_header(p) for p in paths]
    total = sum(p.stat().st_size for p in paths)
    largest = max(t.end - t.begin for h in headers for t in h.tensors.values())
    print(f"{n} x {args.arch} {args.dtype}: {total / 1e9:.2f} GB in all, largest tensor {largest / 1e6:.1f} MB "
          f"(generated in {gen_s:.0f} s)", flush=True)
    cats, drifts = [], []  # (wall, cpu) / (wall, cpu, rss)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                cats.append(timed_cat(paths))
                print(f"cat:   {cats[-1][0]:.1f} s ({total / cats[-1][0] / 1e9:.2f} GB/s), CPU {cats[-1][1]:.1f} s", flush=True)
                wall, cpu, rss, stdout = timed_drift(paths, Path(tmp) / "out", ["--signs"] if args.signs else [])
                drifts.append((wall, cpu, rss))
                print(f"drift: {wall:.1f} s ({total / wall / 1e9:.2f} GB/s), CPU {cpu:.1f} s, peak RSS {rss / GIB:.2f} GiB "
                      f"(1-min load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)", flush=True)
            cats.append(timed_cat(paths))
            print(f"cat:   {cats[-1][0]:.1f} s", flush=True)
    finally:
        if not args.keep:
            for p in paths:
                p.unlink(missing_ok=True)
    target_rss = 2 * GIB + n * largest
    rss = max(d[2] for d in drifts)
    cat_med, drift_med = statistics.median(c[0] for c in cats), statistics.median(d[0] for d in drifts)
    neighbours = [drifts[i][0] / cats[j][0] for i in range(len(drifts)) for j in (i, i + 1)]
    figures = {"n": n, "signs": args.signs, "arch": args.arch, "dtype": args.dtype, "total_bytes": total, "largest_tensor_bytes": largest,
               "cat_s": [c[0] for c in cats], "drift_s": [d[0] for d in drifts], "drift_cpu_s": [d[1] for d in drifts],
               "peak_rss_bytes": rss, "target_rss_bytes": target_rss, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print(f"peak RSS {rss / GIB:.2f} GiB vs target {target_rss / GIB:.2f} GiB (2 GiB + {n} x {largest / 1e6:.1f} MB): "
          f"{'OK' if rss <= target_rss else 'OVER'}")
    print(f"median drift {drift_med:.1f} s / median cat {cat_med:.1f} s = {drift_med / cat_med:.2f} (target <= 2): "
          f"{'OK' if drift_med <= 2 * cat_med else 'OVER'}; drift / neighbouring cats: "
          + ", ".join(f"{r:.2f}" for r in neighbours))
    print(json.dumps(figures))
    print("--- drift summary ---\n" + stdout)


if __name__ == "__main__":
    main()
