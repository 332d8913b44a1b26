"""The safetensors file format at the byte level: a validating header reader and a streaming writer.

Why by hand: `safetensors.torch.save_file` needs every tensor in memory at once (a full SDXL
checkpoint is 6.9 GB in fp16, on top of the model itself), and its loader reports malformed files
with tracebacks. Here the writer lays out the header from shapes alone and then writes tensors one
at a time, into a temporary file renamed into place only when complete; the reader checks every
header field and fails with one line naming what is wrong. Tensor reading itself stays with
`safetensors.safe_open` (memory-mapped).

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}, then the data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from tunelab.errors import TunelabError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data buffer in the file


def _fail(path: Path, why: str) -> TunelabError:
    return TunelabError(f"{path}: not a valid .safetensors file: {why}")


def read_header(path: str | Path) -> Header:
    """Parse and fully validate a safetensors header without touching tensor data."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"file is {size} bytes, too short to hold the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _fail(path, f"header length {n} is absurd for a {size}-byte file (truncated or not safetensors?)")
        raw = f.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"header is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header JSON is not an object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    tensors = {name: _tensor_info(path, name, entry) for name, entry in doc.items()}
    _check_layout(path, tensors, size - 8 - n)
    return Header(tensors, meta, 8 + n)


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"entry {name!r} is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs) and 0 <= offs[0] <= offs[1]):
        raise _fail(path, f"tensor {name!r} has malformed data_offsets {offs!r}")
    info = TensorInfo(dtype, tuple(shape), offs[0], offs[1])
    if info.end - info.begin != info.numel * DTYPES[dtype][1]:
        raise _fail(path, f"tensor {name!r}: {info.end - info.begin} bytes do not hold shape {shape} of {dtype}")
    return info


def _check_layout(path: Path, tensors: dict[str, TensorInfo], buffer_bytes: int) -> None:
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise _fail(path, f"tensor {name!r} starts at byte {info.begin}, expected {pos} (overlap or gap)")
        pos = info.end
    if pos > buffer_bytes:
        raise _fail(path, f"data offsets reach byte {pos} but the file holds {buffer_bytes} data bytes (truncated?)")
    if pos < buffer_bytes:
        raise _fail(path, f"{buffer_bytes - pos} trailing bytes after the last tensor")


# --- writing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def write_streaming(
    path: str | Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
    progress: Callable[[TensorSpec], None] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor; memory holds one tensor at a time.

    The file appears at `path` only when complete (temporary file in the same folder, fsync,
    rename), so a crash never leaves a half-written checkpoint under the final name.
    """
    path = Path(path)
    specs = sorted(specs, key=lambda s: s.name)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    pos = 0
    for s in specs:
        nbytes = math.prod(s.shape) * DTYPES[TORCH_TO_ST[s.dtype]][1]
        header[s.name] = {"dtype": TORCH_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data buffer aligned to 8 bytes, as the reference writer does
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, file_mode())  # mkstemp makes 0600; a checkpoint gets what open() would give it
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for s in specs:
                f.write(_tensor_bytes(s, produce(s)))
                if progress:
                    progress(s)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """The permission bits a new file gets from open() under the current umask (0644 under 022),
    so that a UI running as another user can read what tunelab writes."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _tensor_bytes(spec: TensorSpec, t: torch.Tensor) -> bytes | memoryview:
    if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
        raise ValueError(f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, header says {spec.shape} {spec.dtype}")
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # A flat byte view of the tensor's storage (little-endian on every platform torch supports).
    return memoryview(t.view(-1).view(torch.uint8).numpy())
