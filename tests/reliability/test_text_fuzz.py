"""Broken recipes and run files (fuzz_text.py): every error names the line or the field, never a
traceback. Fast: 60 mutants; slow: 1,000."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.reliability.fuzz_text import FIELD_LINE, NAMES_A_PLACE, Case, fuzz, judge


def _check(n: int, seed: int) -> list[Case]:
    cases = fuzz(n, seed)
    bad = [c for c in cases if c.problems]
    assert not bad, "\n".join(f"{c.kind} #{c.index}: {c.problems} {c.stderr[-3:]}" for c in bad[:20])
    kinds = Counter(c.kind for c in cases)
    assert len(kinds) == 9 and min(kinds.values()) >= n // 20
    assert sum(c.status == 2 for c in cases) > n // 2  # most mutants are refused, not waved through
    return cases


def test_the_judge_tells_a_located_error_from_a_vague_one(tmp_path):
    path = tmp_path / "run.toml"
    located = ["error: " + str(path) + ":4: unterminated quote", "error: x: not valid TOML: y (at line 2, column 1)",
               f"error: {path}: 1 problem(s) in the run file:\n  train.batch_size: Input should be a valid integer"]
    for text in located:
        assert not judge(Case("k", 0, 2, 0.0, text.splitlines()), path).problems, text
    vague = judge(Case("k", 0, 2, 0.0, [f"error: {path}: something is wrong"]), path)
    assert vague.problems == ["the error names no line or field"]
    assert judge(Case("k", 0, 1, 0.0, [], crash="Traceback ...\nKeyError: 'x'"), path).problems[0].startswith("traceback")
    assert NAMES_A_PLACE.search("FILE:12: x") and FIELD_LINE.search("...\n  optim.lr_unet: bad")


def test_broken_recipes_and_run_files_sample():
    _check(60, seed=0)


@pytest.mark.slow
def test_a_thousand_broken_recipes_and_run_files():
    _check(1000, seed=1)
