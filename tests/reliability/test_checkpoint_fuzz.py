"""Malformed checkpoints through every command that reads them (fuzz_checkpoints.py): a one-line
error naming the file within 1 s, no traceback, no allocation beyond the file (the fuzz process
runs under an address-space cap), pickles refused. The fast sample covers every mutation class
once; the slow run is 1,000 files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.mutate import MUTATIONS, WELL_FORMED, mutants, split
from tests.reliability.fuzz_checkpoints import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def _fuzz(tmp_path: Path, n: int, full_rounds: int, seed: int = 0) -> list[dict]:
    out = tmp_path / "cases.json"
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_checkpoints", "--n", str(n), "--seed", str(seed),
                           "--full-rounds", str(full_rounds), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.exists(), proc.stdout + proc.stderr
    cases = json.loads(out.read_text())
    bad = [c for c in cases if c["problems"]]
    assert not bad, "\n".join(f"{c['kind']} #{c['index']} {c['command']}: {c['problems']} {c['stderr'][-2:]}" for c in bad[:20])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return cases


def test_mutations_break_what_they_say(toy_checkpoint):
    """Each malformed class really is malformed for tunelab's reader; the well-formed ones read."""
    from tunelab.errors import TunelabError
    from tunelab.models.safetensors_io import read_header

    good = toy_checkpoint.read_bytes()
    split(good)  # the good file parses
    path = toy_checkpoint.parent / "m.safetensors"
    for kind, blob in mutants(good, 3 * len(MUTATIONS), seed=5):
        path.write_bytes(blob)
        if kind in WELL_FORMED:
            read_header(path)
        else:
            with pytest.raises(TunelabError, match="m.safetensors"):
                read_header(path)


def test_every_command_against_each_kind_of_malformed_file(tmp_path):
    cases = _fuzz(tmp_path, n=len(MUTATIONS), full_rounds=0)
    kinds = Counter(c["kind"] for c in cases)
    assert set(kinds) == set(MUTATIONS) | {"pickle"}
    for kind in set(MUTATIONS) - WELL_FORMED:
        assert kinds[kind] == len(COMMANDS) and all(c["status"] == 2 for c in cases if c["kind"] == kind)
    assert all(c["status"] == 2 for c in cases if c["kind"] == "pickle") and kinds["pickle"] == 2 * len(COMMANDS)


@pytest.mark.slow
def test_a_thousand_malformed_files(tmp_path):
    cases = _fuzz(tmp_path, n=1000, full_rounds=2, seed=1)
    assert len({(c["kind"], c["index"]) for c in cases}) >= 1000


def test_deep_json_nesting_is_a_one_line_error(tmp_path):
    from tests.reliability.mutate import pack
    from tunelab.errors import TunelabError
    from tunelab.models.safetensors_io import read_header

    path = tmp_path / "deep.safetensors"
    for text in ("[" * 100000, '{"a": ' * 50000 + "1" + "}" * 50000):  # was a RecursionError traceback
        path.write_bytes(pack(text, b""))
        with pytest.raises(TunelabError, match="nested too deeply"):
            read_header(path)


@pytest.mark.parametrize("edit, message", [
    (lambda h, n: h[n].update(dtype=["F16"]), "unknown dtype"),  # was a TypeError (unhashable list)
    (lambda h, n: h.update(__metadata__=[]), "__metadata__"),  # was accepted, then safetensors failed
    (lambda h, n: h[n].update(shape=[True] * len(h[n]["shape"])), "malformed shape"),  # bool is not a size
    (lambda h, n: h[n].update(data_offsets=[False, h[n]["data_offsets"][1]]), "malformed data_offsets"),
])
def test_what_the_fuzzer_found_stays_fixed(toy_checkpoint, tmp_path, edit, message):
    """Each case was a traceback or a file taken for good before the fuzzer found it."""
    from tests.reliability.mutate import pack
    from tunelab.errors import TunelabError
    from tunelab.models.safetensors_io import read_header

    header, data = split(toy_checkpoint.read_bytes())
    name = next(k for k in header if k != "__metadata__")
    edit(header, name)
    path = tmp_path / "found.safetensors"
    path.write_bytes(pack(header, data))
    with pytest.raises(TunelabError, match=message):
        read_header(path)
