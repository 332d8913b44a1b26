"""Benchmark: tunelab's event reader against tbparse on the same files, in the same run.

    .venv/bin/python benchmarks/loss_events.py [--scalars 3000000] [--workdir DIR]

1. Writes a large event file shaped like kohya's log (4 `loss` values per step under gradient
   accumulation, then `lr/unet`, `lr/text_encoder1`, `loss/current`, `loss/average` each step).
   Millions of scalars through torch's SummaryWriter take minutes, so the records are written
   here directly; the checksums come from tunelab's CRC-32C (tested against tensorboard's), and
   the file is proven valid by tbparse reading it back below (tensorboard's reader checks every
   checksum) with every value, step and wall time equal to ours.
2. Times tbparse (`SummaryReader(...).scalars`, long format with wall time) once, and
   `tunelab.analyze.events.read_event_file` three times (median), on the generated file and on
   the real kohya fixture. Prints scalars/s and the ratio. The file is in the page cache for both.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tunelab.analyze.events import masked_crc32c_rows, read_event_file

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
KOHYA = sorted((FIXTURES / "kohya-tensorboard").glob("*/finetuning/events.*"))
EXTRA_TAGS = ("lr/unet", "lr/text_encoder1", "loss/current", "loss/average")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _payload(tag: bytes, step: int, wall: float, value: float) -> bytes:
    """An Event{wall_time, step, summary{value{tag, simple_value}}}, as SummaryWriter writes it."""
    value_msg = b"\x0a" + _varint(len(tag)) + tag + b"\x15" + struct.pack("<f", value)
    summary = b"\x0a" + _varint(len(value_msg)) + value_msg
    step_field = b"\x10" + _varint(step) if step else b""  # proto3 omits a zero step
    return b"\x09" + struct.pack("<d", wall) + step_field + b"\x2a" + _varint(len(summary)) + summary


def _records(payloads: list[bytes]) -> bytes:
    """TFRecord framing with masked CRC-32C, checksums computed for all records at once."""
    lengths = np.array([len(p) for p in payloads], dtype="<u8")
    header_crc = masked_crc32c_rows(lengths.view(np.uint8).reshape(-1, 8))
    body_crc = np.empty(len(payloads), dtype=np.uint32)
    for size in np.unique(lengths):
        rows = np.flatnonzero(lengths == size)
        body = np.frombuffer(b"".join(payloads[i] for i in rows), dtype=np.uint8).reshape(len(rows), int(size))
        body_crc[rows] = masked_crc32c_rows(body)
    return b"".join(
        struct.pack("<QI", n, h) + p + struct.pack("<I", c)
        for n, h, p, c in zip(lengths.tolist(), header_crc.tolist(), payloads, body_crc.tolist())
    )


def write_large_log(path: Path, n_scalars: int) -> int:
    """Write about `n_scalars` kohya-shaped scalars; returns the exact count."""
    rng = np.random.default_rng(0)
    per_step = 4 + len(EXTRA_TAGS)
    steps = n_scalars // per_step
    head = b"\x09" + struct.pack("<d", 1.74e9) + b"\x1a\x0dbrain.Event:2"  # file_version record
    with open(path, "wb") as fh:
        fh.write(_records([head]))
        for first in range(0, steps, 50_000):  # bounded memory
            payloads = []
            for step in range(first, min(first + 50_000, steps)):
                wall = 1.74e9 + step * 0.8
                for micro in range(4):
                    payloads.append(_payload(b"loss", step, wall + micro * 0.2, float(rng.random())))
                for tag in EXTRA_TAGS:
                    payloads.append(_payload(tag.encode(), step, wall + 0.7, 1e-5))
            fh.write(_records(payloads))
    return steps * per_step


def time_tbparse(path: Path) -> tuple[float, dict[str, np.ndarray]]:
    from tbparse import SummaryReader

    start = time.perf_counter()
    frame = SummaryReader(str(path), extra_columns={"wall_time"}).scalars
    seconds = time.perf_counter() - start
    return seconds, {tag: group for tag, group in frame.groupby("tag", sort=False)}


def time_ours(path: Path, verify: bool = False, repeat: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = read_event_file(path, verify=verify)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def check_equal(ours, theirs: dict) -> None:
    """Every value, step and wall time equal (tbparse keeps file order within a tag)."""
    assert set(ours.tags) == set(theirs), (ours.tags, list(theirs))
    for tag, frame in theirs.items():
        got = ours.series[tag]
        assert np.array_equal(got.step, frame["step"].to_numpy()), tag
        assert np.array_equal(got.value, frame["value"].to_numpy()), tag
        assert np.array_equal(got.wall_time, frame["wall_time"].to_numpy()), tag


def bench(name: str, path: Path) -> None:
    ours_s, ours = time_ours(path)
    verify_s, _ = time_ours(path, verify=True)
    tb_s, theirs = time_tbparse(path)
    check_equal(ours, theirs)
    n = len(ours)
    print(
        f"{name}: {n:,} scalars, {path.stat().st_size / 2**20:.1f} MiB\n"
        f"  tbparse          {tb_s:8.2f} s  {n / tb_s:>12,.0f} scalars/s\n"
        f"  tunelab          {ours_s:8.3f} s  {n / ours_s:>12,.0f} scalars/s  ({tb_s / ours_s:.0f}x tbparse)\n"
        f"  tunelab --verify {verify_s:8.3f} s  {n / verify_s:>12,.0f} scalars/s  ({tb_s / verify_s:.0f}x tbparse)\n"
        "  all values, steps and wall times equal",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scalars", type=int, default=3_000_000, help="size of the generated log")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write it (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "events.out.tfevents.1740000000.bench.0"
        start = time.perf_counter()
        n = write_large_log(path, args.scalars)
        print(f"wrote {n:,} scalars in {time.perf_counter() - start:.1f} s", flush=True)
        if KOHYA:
            bench("kohya fixture", KOHYA[0])
        bench("generated", path)


if __name__ == "__main__":
    sys.exit(main())
