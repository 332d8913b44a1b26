"""Streaming checkpoint reader of `tunelab drift`: the tensors of one key from each of N
safetensors files, read ahead on worker threads, into reused buffers.

Why the tensors are read with `os.preadv` and not `safetensors.safe_open`: `safe_open` memory-maps
the file, and every page it touches stays resident in the process until the file is closed, so the
peak RSS of a one-pass scan grows to the size of all N files (measured: 2.5 GB peak RSS to scan a
2 GB file). Reading each tensor into its own buffer keeps memory at the key being compared plus at
most `READ_AHEAD_BYTES` (512 MiB) of later keys, read ahead on worker threads meanwhile. The
header is parsed and validated by `tunelab.models.safetensors_io.read_header`.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch

from tunelab.errors import TunelabError
from tunelab.models.checkpoint import refuse_pickle
from tunelab.models.safetensors_io import DTYPES, Header, TensorInfo, read_header

# Tensor bytes read ahead of the comparison beyond the next key (bounds memory; see `Reader`).
READ_AHEAD_BYTES = 512 << 20
# Bytes of compared keys' buffers kept for reuse by later keys of the same size (see `Reader`).
SPARE_BYTES = 256 << 20
MAX_SPARES = 64
# A single read() on Linux returns at most ~2 GiB; larger tensors are read in pieces.
_MAX_READ = 1 << 30


def _read_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
        if got <= 0:
            raise TunelabError(f"{path}: file ended early while reading tensor data (truncated?)")
        done += got


def read_tensor(fd: int, header: Header, info: TensorInfo, path: Path, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor from an open file, into a fresh buffer or the uint8 row `into` (no memory map)."""
    dtype, _ = DTYPES[info.dtype]
    raw = torch.empty(info.end - info.begin, dtype=torch.uint8) if into is None else into
    if raw.numel():
        _read_exact(fd, memoryview(raw.numpy()), header.data_start + info.begin, path)
    # safetensors data is little-endian, as is every platform torch ships for.
    return raw.view(dtype).reshape(info.shape)


def key_order(headers: list[Header]) -> list[str]:
    """Every key of any file: the first file's keys in on-disk order (sequential reads), then the
    keys only later files hold, in their on-disk order."""
    seen: set[str] = set()
    order: list[str] = []
    for h in headers:
        for k, _ in sorted(h.tensors.items(), key=lambda kv: kv[1].begin):
            if k not in seen:
                seen.add(k)
                order.append(k)
    return order


class Reader:
    """Reads tensors on worker threads ahead of the comparison: always the next key, and further
    keys while the bytes in flight stay under `READ_AHEAD_BYTES`, so the disk keeps streaming while
    a large key computes and a run of small keys does not stall on per-read latency.

    Buffers of keys already compared are reused for later keys of the same size (up to
    `SPARE_BYTES` kept): a fresh buffer costs a page fault and a kernel zero-fill per 4 KiB, which
    measured as more system time than the reads themselves. So a key's tensors are valid only until
    `iterate` is asked for the next key.
    """

    def __init__(self, paths: list[Path], headers: list[Header]) -> None:
        self.paths, self.headers = paths, headers
        self.fds = [os.open(p, os.O_RDONLY) for p in paths]
        self.pool = ThreadPoolExecutor(max_workers=min(len(paths), 4), thread_name_prefix="drift-read")
        self.spare: collections.deque[torch.Tensor] = collections.deque()
        self.spare_bytes = 0

    def key_bytes(self, key: str) -> int:
        return sum(h.tensors[key].end - h.tensors[key].begin for h in self.headers if key in h.tensors)

    def _rows(self, n: int, nbytes: int) -> torch.Tensor:
        """An (n, nbytes) uint8 buffer: the front of the smallest spare that holds it (and is not
        more than twice too big, so small keys do not pin large buffers), else a new one."""
        need = n * nbytes
        fits = [i for i, b in enumerate(self.spare) if need <= b.numel() <= 2 * need]
        if not fits:
            return torch.empty(need, dtype=torch.uint8).view(n, nbytes)
        best = min(fits, key=lambda i: self.spare[i].numel())
        buf = self.spare[best]
        del self.spare[best]  # by position: deque.remove would compare tensors elementwise
        self.spare_bytes -= buf.numel()
        return buf[:need].view(n, nbytes)

    def _give_back(self, rows: torch.Tensor | None) -> None:
        if rows is None or rows.numel() == 0:
            return
        # Keep the whole allocation (rows may be the front of a larger spare), flat.
        whole = torch.empty(0, dtype=torch.uint8).set_(rows.untyped_storage())
        self.spare.append(whole)
        self.spare_bytes += whole.numel()
        # Oldest first; a count cap keeps the search in `_rows` short when keys are small.
        while self.spare_bytes > SPARE_BYTES or len(self.spare) > MAX_SPARES:
            self.spare_bytes -= self.spare.popleft().numel()

    def submit(self, key: str) -> tuple[list[Future | None], torch.Tensor | None, torch.Tensor | None]:
        """Start reading `key` from every file holding it. When all files hold it with one shape and
        dtype, the rows of one (N, bytes) buffer receive them, so the comparison needs no stacking.
        Returns (futures, that buffer viewed as (N, numel) of the dtype, the raw buffer)."""
        infos = [h.tensors.get(key) for h in self.headers]
        uniform = all(i is not None and (i.dtype, i.shape) == (infos[0].dtype, infos[0].shape) for i in infos)
        rows = self._rows(len(infos), infos[0].end - infos[0].begin) if uniform else None
        futures: list[Future | None] = []
        for n, (fd, h, p, info) in enumerate(zip(self.fds, self.headers, self.paths, infos)):
            into = rows[n] if rows is not None else None
            futures.append(None if info is None else self.pool.submit(read_tensor, fd, h, info, p, into))
        stacked = rows.view(DTYPES[infos[0].dtype][0]) if rows is not None and rows.shape[1] else None
        return futures, stacked, rows

    def iterate(self, keys: list[str]) -> Iterator[tuple[str, list[torch.Tensor | None], torch.Tensor | None]]:
        pending: collections.deque = collections.deque()  # (key, futures, stacked, rows, bytes)
        nxt, in_flight = 0, 0
        for _ in keys:
            while nxt < len(keys) and (len(pending) < 2 or in_flight + self.key_bytes(keys[nxt]) <= READ_AHEAD_BYTES):
                size = self.key_bytes(keys[nxt])
                pending.append((keys[nxt], *self.submit(keys[nxt]), size))
                in_flight += size
                nxt += 1
            key, futures, stacked, rows, size = pending.popleft()
            loaded = [None if f is None else f.result() for f in futures]
            del futures  # the futures hold the tensors too; let them go with `loaded`
            in_flight -= size
            yield key, loaded, stacked
            del loaded, stacked  # before more reads are submitted: memory stays within the budget
            self._give_back(rows)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds:
            os.close(fd)


def open_checkpoints(paths: Iterable[str | Path]) -> tuple[list[Path], list[Header]]:
    """Validate the inputs before any heavy work: at least two files, each a readable safetensors."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise TunelabError(f"drift compares checkpoints: give at least 2 .safetensors files (got {len(paths)})")
    for p in paths:
        if not p.exists():
            raise TunelabError(f"{p}: no such file")
        if p.is_dir():
            raise TunelabError(f"{p}: is a folder; give the single-file .safetensors checkpoint inside it")
        refuse_pickle(p)
    return paths, [read_header(p) for p in paths]
