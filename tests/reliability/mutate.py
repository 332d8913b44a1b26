"""Malformed safetensors files, made from a good one by deterministic mutations.

Each mutation class breaks one part of the format (docs/reliability.md lists them): the 8-byte
header length, the header's JSON, a tensor's dtype / shape / data offsets, the metadata, the data
buffer, or the whole file. `mutants(good, n, seed)` yields (name, bytes) pairs, cycling through
the classes so any n >= the number of classes covers each of them.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Callable, Iterator

Mutation = Callable[[random.Random, dict, bytes, bytes], bytes]


def split(good: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", good[:8])
    return json.loads(good[8:8 + n]), good[8 + n:]


def pack(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _tensor(rng: random.Random, header: dict) -> str:
    return rng.choice(sorted(k for k in header if k != "__metadata__"))


def _edit(field: str, values: list) -> Mutation:
    def mutate(rng, header, raw, data):
        h = json.loads(json.dumps(header))
        h[_tensor(rng, h)][field] = rng.choice(values)
        return pack(h, data)
    return mutate


def _length(rng, header, raw, data):
    n = len(raw)
    length = rng.choice([0, 1, n - 1, n + 1, n + 7, n + len(data) + 1, 2**32, 2**63, 2**64 - 1, 100 * 2**20 + 1])
    return pack(raw, data, length=max(0, min(length, 2**64 - 1)))


def _json_cut(rng, header, raw, data):
    cut = rng.randrange(1, len(raw))
    return pack(raw[:cut], data)  # length says the short text: JSON ends early


def _json_bytes(rng, header, raw, data):
    b = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return pack(bytes(b), data)


def _json_shape(rng, header, raw, data):
    return pack(rng.choice(['[]', '1', '"x"', 'null', 'true', '{"a": 1}', '{"__metadata__": 5}', '[' * 100000,
                            '{"a": ' * 50000 + '1' + '}' * 50000, '\ufeff{}', '{}' + ' ' * 1000,
                            '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                            json.dumps(header).replace('"F', '"\udcff')]).encode("utf-8", "surrogatepass"), data)


def _metadata(rng, header, raw, data):
    h = json.loads(json.dumps(header))
    h["__metadata__"] = rng.choice([[], "text", 7, {"k": 1}, {"k": None}, {"k": ["a"]}, {"k": {"n": "v"}},
                                    {"modelspec.architecture": 3}, {"ss_steps": 12}])
    return pack(h, data)


def _metadata_values(rng, header, raw, data):
    h = json.loads(json.dumps(header))
    h["__metadata__"] = {**h.get("__metadata__", {}), **rng.choice([
        {"ss_steps": "not a number"}, {"ss_steps": "-5"}, {"modelspec.resolution": "huge"},
        {"modelspec.resolution": "0x0"}, {"modelspec.prediction_type": "banana"},
        {"modelspec.architecture": "stable-diffusion-v1"}, {"x" * 100: "y" * 100000}, {"": ""},
        {"mecha_recipe": "version 9\nmerge ("}, {"ss_tag_frequency": "{not json"}, {"tunelab.run": "\u0000"}])}
    return pack(h, data)  # well-formed: odd values must be read as text, never crash a command


def _offsets_shift(rng, header, raw, data):
    h = json.loads(json.dumps(header))
    name = _tensor(rng, h)
    b, e = h[name]["data_offsets"]
    d = rng.choice([-4, -2, -1, 1, 2, 4, len(data), -(b + 1)])
    h[name]["data_offsets"] = rng.choice([[b + d, e + d], [b + d, e], [b, e + d], [e, b]])
    return pack(h, data)


def _huge(rng, header, raw, data):
    h = json.loads(json.dumps(header))
    dims = rng.choice([[2**40], [2**31, 2**31], [2**62, 4], [10**30], [2**20, 2**20, 2**20]])
    size = 4
    for d in dims:
        size *= d
    # consistent with its shape and placed after the real data: only the file's size gives it away
    h["model.diffusion_model.huge"] = {"dtype": "F32", "shape": dims, "data_offsets": [len(data), len(data) + size]}
    return pack(h, data)


def _truncate(rng, header, raw, data):
    full = pack(raw, data)
    return full[:rng.randrange(9 + len(raw) // 2, len(full))]


def _append(rng, header, raw, data):
    return pack(raw, data) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def _drop_tensor(rng, header, raw, data):
    h = json.loads(json.dumps(header))
    del h[_tensor(rng, h)]
    return pack(h, data)  # a gap in the buffer


def _not_safetensors(rng, header, raw, data):
    return rng.choice([b"", b"\x00" * rng.randint(1, 7), b"<!DOCTYPE html><html><body>404</body></html>",
                       bytes(rng.randrange(256) for _ in range(rng.randint(8, 4096))),
                       b"PK\x03\x04" + bytes(200),  # a zip (torch.save's layout) named .safetensors
                       b"\x80\x02}q\x00." + bytes(64)])  # a pickle


def _bitflip_data(rng, header, raw, data):
    d = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(d))
        d[i] ^= 1 << rng.randrange(8)
    return pack(raw, bytes(d))  # well-formed: a valid file with other values


MUTATIONS: dict[str, Mutation] = {
    "header-length": _length,
    "json-truncated": _json_cut,
    "json-bytes": _json_bytes,
    "json-shape": _json_shape,
    "dtype": _edit("dtype", ["F33", "f32", "", None, 4, ["F32"], "I8", "F64", "U64", "BOOL"]),  # none of F16's size
    "shape": _edit("shape", [[-1], [1.5], ["3"], None, "[]", [True], [], [0], [1, -1], [2**70]]),
    "offsets": _edit("data_offsets", [None, [0], [0, 1, 2], [-4, 0], [0.0, 4.0], "0,4", [2**64, 2**64 + 4], [5, 1]]),
    "offsets-shift": _offsets_shift,
    "huge-declared": _huge,
    "metadata": _metadata,
    "metadata-values": _metadata_values,
    "truncated": _truncate,
    "trailing-bytes": _append,
    "gap": _drop_tensor,
    "not-safetensors": _not_safetensors,
    "data-bitflip": _bitflip_data,
}
WELL_FORMED = {"data-bitflip", "metadata-values"}


def mutants(good: bytes, n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """n mutated files of `good` (a valid safetensors file), classes in turn, seeded."""
    rng = random.Random(seed)
    header, data = split(good)
    raw = json.dumps(header).encode()
    names = list(MUTATIONS)
    for i in range(n):
        kind = names[i % len(names)]
        yield kind, MUTATIONS[kind](rng, header, raw, data)
