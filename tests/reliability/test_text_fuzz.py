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


def test_what_the_fuzzer_found_stays_fixed(tmp_path):
    from tests.reliability.fuzz_checkpoints import run_main
    from tests.reliability.fuzz_text import make_models

    make_models(tmp_path)
    recipe = tmp_path / "r.mecha"
    cases = {  # recipe text -> what the error must say
        'version 0.1.0\nmodel\n': "r.mecha:2: a model line names the model file",  # was an IndexError
        'version 0.1.0\nmodel "models/base.safetensors"\nmerge &0\n': "r.mecha:3: a merge line names its method",  # too
        'version 0.1.0\nmodel "models/base.safetensors" moel_config="sdxl-sgm"\n':
            "r.mecha:2: sd-mecha cannot read the recipe",  # sd-mecha's error, now with the line
    }
    for text, message in cases.items():
        recipe.write_text(text)
        status, err, crash = run_main(["merge", "run", str(recipe), "--models-dir", str(tmp_path), "--out", str(tmp_path / "o.txt")])
        assert crash is None and status == 2 and message in err, err
    run_file = tmp_path / "run.toml"
    run_file.write_text('[run]\nname = "x"\n[train')  # tomllib: "at end of document"
    status, err, crash = run_main(["config", "check", str(run_file)])
    assert status == 2 and "line 3" in err, err
    run_file.write_bytes(b'[run]\nname = "caf\xe9"\n')
    status, err, crash = run_main(["config", "check", str(run_file)])
    assert crash is None and status == 2 and "not valid UTF-8" in err, err
