"""Broken recipes (.mecha) and run files (TOML) through the commands that read them.

    python -m tests.reliability.fuzz_text --n 500

Text mutations of real, valid inputs (the field's 2024 and 2025 recipes from tests/merge, the
shipped examples/*.toml): lines deleted, duplicated or swapped, tokens replaced by other kinds
(numbers, strings, references out of range, unknown names), characters inserted or deleted, cuts
at random, random bytes, BOM and CR line ends. Each case runs in-process (`tunelab.cli.main`); it
is good when the command either accepts the text or exits with status 2 and an `error:` message
that names the line (`FILE:N`, `line N`) or the field (`train.batch_size`), and never a traceback.

Recipes go through `merge run` up to the point where merging would start: the output is given a
`.txt` suffix, which `merge run` refuses only after reading, upgrading and checking the recipe and
letting sd-mecha parse it, so an accepted recipe ends in that one refusal (counted as accepted).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.merge.test_recipes import RECIPE_2024, RECIPE_2025
from tests.reliability.fuzz_checkpoints import run_main

ROOT = Path(__file__).resolve().parents[2]
# the field's recipes, as the merge tests have them (a 2024 one with Windows paths, mapped by --map)
RECIPES = {"2024": RECIPE_2024, "2025": RECIPE_2025}
WINDOWS_MODELS = "D:\\sd\\models\\Stable-diffusion"
TOKENS = ['&0', '&9', '&-1', '&', '"', '""', '"weighted_sum"', '"no_such_method"', 'alpha=', 'alpha=x', '=0.5',
          '0.5', '1e999', 'nan', '-', 'true', 'model', 'merge', 'call', 'dict', 'version', '0.1.0', '9.9.9',
          'model_config="sd1-ldm"', 'merge_space="delta"', '{', '}', '(', ')', '\\', '#', '\t', '\u00e9', '\x00']
TOML_VALUES = ['"two"', '-1', '0', '1e400', 'nan', 'inf', 'true', '[]', '[1, "a"]', '{}', '{ a = 1 }', '""',
               '"x" "y"', '9999999999999999999999', '2026-12-03', '"\\q"', '[[1]]', '0x10', '1_000']


@dataclass
class Case:
    kind: str
    index: int
    status: int
    seconds: float
    stderr: list[str]
    crash: str | None = None
    problems: list[str] = field(default_factory=list)


def _lines(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.choice(["delete", "duplicate", "swap", "empty-all-but"])
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(j, lines[i])
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines = [lines[i]]
    return "\n".join(lines)


def _tokens(rng: random.Random, text: str, pool: list[str]) -> str:
    parts = re.split(r"(\s+)", text)
    for _ in range(rng.randint(1, 3)):
        k = rng.randrange(len(parts))
        parts[k] = rng.choice(pool) if rng.random() < 0.8 else parts[k] + rng.choice(pool)
    return "".join(parts)


def _chars(rng: random.Random, text: str) -> str:
    s = list(text)
    for _ in range(rng.randint(1, 6)):
        k = rng.randrange(len(s) + 1)
        if rng.random() < 0.5 and k < len(s):
            del s[k]
        else:
            s.insert(k, rng.choice('"&=#[]{}.,\\\n\r\t \x00\u2028\ufeffé0'))
    return "".join(s)


def _whole(rng: random.Random, text: str) -> str:
    return rng.choice([text[:rng.randrange(len(text))], "", " \n\n", "\ufeff" + text, text.replace("\n", "\r\n"),
                       text.replace("\n", "\r"), text * 3,
                       "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(1, 300)))])


def _toml_values(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    keyed = [i for i, l in enumerate(lines) if re.match(r"\s*[A-Za-z_]+\s*=", l)]
    for _ in range(rng.randint(1, 3)):
        i = rng.choice(keyed)
        key = lines[i].split("=", 1)[0]
        lines[i] = f"{key}= {rng.choice(TOML_VALUES)}"
    return "\n".join(lines)


def _toml_keys(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    op = rng.choice(["typo", "section", "new"])
    if op == "typo" and "=" in lines[i]:
        key, rest = lines[i].split("=", 1)
        k = key.strip()
        if len(k) > 2:
            j = rng.randrange(len(k) - 1)
            k = k[:j] + k[j + 1] + k[j] + k[j + 2:]
        lines[i] = f"{k} ={rest}"
    elif op == "section":
        lines.insert(i, rng.choice(["[trian]", "[train.parts.extra]", "[]", "[run", "[[run]]", "[grid.x]", "[optim]"]))
    else:
        lines.insert(i, rng.choice(["mystery = 1", "batch_size = 2", "name = 3", "x.y = 1", "= 1", "\"k\" = 1"]))
    return "\n".join(lines)


def recipe_mutants(n: int, seed: int):
    rng = random.Random(seed)
    kinds = ["lines", "tokens", "chars", "whole"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        era = rng.choice(sorted(RECIPES))
        text = RECIPES[era]
        text = {"lines": lambda: _lines(rng, text), "tokens": lambda: _tokens(rng, text, TOKENS),
                "chars": lambda: _chars(rng, text), "whole": lambda: _whole(rng, text)}[kind]()
        yield f"recipe-{kind}", text


def run_file_mutants(n: int, seed: int, sources: list[str]):
    rng = random.Random(seed)
    kinds = ["values", "keys", "lines", "chars", "whole"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        text = rng.choice(sources)
        text = {"values": lambda: _toml_values(rng, text), "keys": lambda: _toml_keys(rng, text),
                "lines": lambda: _lines(rng, text), "chars": lambda: _chars(rng, text),
                "whole": lambda: _whole(rng, text)}[kind]()
        yield f"run-file-{kind}", text


NAMES_A_PLACE = re.compile(r"(FILE:\d+|line \d+|\b[a-z_]+(\.[a-z_0-9]+)+\b|empty recipe|"
                           r"version header|no such|not valid UTF-8)")


FIELD_LINE = re.compile(r"^  [A-Za-z_][\w.\[\]-]*: ", re.M)  # config check's list: "  train.batch_size: why"


def judge(case: Case, path: Path) -> Case:
    if case.crash:
        case.problems.append("traceback: " + case.crash.strip().splitlines()[-1])
    text = "\n".join(case.stderr)
    if "Traceback" in text:
        case.problems.append("traceback on stderr")
    if case.status not in (0, 2):
        case.problems.append(f"exit {case.status}")
    elif case.status == 2:
        message = text[text.find("error:"):] if "error:" in text else ""
        message = message.replace(f"{path}:", "FILE:").replace(str(path), "FILE").replace(str(path.parent), "DIR")
        if not message:
            case.problems.append("no error line")
        elif ("merge is written as one .safetensors" not in message and not NAMES_A_PLACE.search(message)
              and not FIELD_LINE.search(message)):
            case.problems.append("the error names no line or field")
    return case


def make_models(root: Path) -> Path:
    from tunelab.models.checkpoint import new_checkpoint

    models = root / "models"
    models.mkdir(parents=True)
    new_checkpoint("toy", models / "base.safetensors", seed=1, dtype="fp16")
    for name in ("ft1", "ft2", "vae"):
        shutil.copy(models / "base.safetensors", models / f"{name}.safetensors")
    return root


def fuzz(n: int, seed: int = 0, progress: bool = False) -> list[Case]:
    root = Path(tempfile.mkdtemp(prefix="tunelab-fuzz-text-"))
    try:
        make_models(root)
        sources = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.toml"))]
        cases: list[Case] = []
        jobs = [("recipe", m) for m in recipe_mutants(n // 2, seed)] + [("run", m) for m in run_file_mutants(n - n // 2, seed, sources)]
        for what, valid in (("recipe", RECIPES["2025"]), ("run", sources[0])):  # warm-up: the real inputs pass
            status, err, crash = _one(root, what, valid)
            assert crash is None and status in (0, 2) and "Traceback" not in err, err + (crash or "")
        for i, (what, (kind, text)) in enumerate(jobs):
            t = time.perf_counter()
            status, err, crash = _one(root, what, text)
            path = root / ("r.mecha" if what == "recipe" else "run.toml")
            cases.append(judge(Case(kind, i, status, time.perf_counter() - t, err.splitlines(), crash), path))
            if progress and (i + 1) % 100 == 0:
                print(f"{i + 1}/{len(jobs)}, {sum(bool(c.problems) for c in cases)} problems", file=sys.stderr)
        return cases
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _one(root: Path, what: str, text: str) -> tuple[int, str, str | None]:
    if what == "recipe":
        path = root / "r.mecha"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return run_main(["merge", "run", str(path), "--models-dir", str(root), "--map", f"{WINDOWS_MODELS}={root / 'models'}",
                         "--out", str(root / "merged.txt")])
    path = root / "run.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return run_main(["config", "check", str(path)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cases = fuzz(a.n, a.seed, progress=True)
    if a.out:
        a.out.write_text(json.dumps([asdict(c) for c in cases], indent=1))
    bad = [c for c in cases if c.problems]
    kinds: dict[str, list[int]] = {}
    for c in cases:
        kinds.setdefault(c.kind, [0, 0, 0])
        kinds[c.kind][0] += 1
        kinds[c.kind][1] += c.status == 2
        kinds[c.kind][2] += bool(c.problems)
    print(json.dumps({k: dict(zip(("cases", "errors", "problems"), v)) for k, v in kinds.items()}, indent=1))
    for c in bad[:25]:
        print(f"{c.kind} #{c.index}: {'; '.join(c.problems)} | {' / '.join(c.stderr)[-400:]}")
    print(f"{len(cases)} cases, {len(bad)} with problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
