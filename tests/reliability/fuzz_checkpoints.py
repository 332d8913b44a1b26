"""Every command that reads checkpoints, against malformed safetensors files (tests/reliability/mutate.py).

    python -m tests.reliability.fuzz_checkpoints --n 1000 --out fuzz-results.json

Runs in one process (imports are paid once) under an address-space limit of what it uses after a
warm-up plus 1 GiB, so a file that makes a command allocate what its header declares (e.g.
2**40 floats) fails loudly instead of passing. Each case runs `tunelab.cli.main()` in-process with
that command's arguments and records: exit status, the stderr lines, seconds, and any exception
that escaped `main()` (a crash: a traceback the user would see). A case is good when the command
either succeeds (only well-formed mutants may) or exits with status 2 and one `error:` line that
names the file, in under 1 s, and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.reliability.mutate import MUTATIONS, WELL_FORMED, mutants

COMMANDS = ("inspect", "convert", "drift", "grid", "train", "merge")
LIMIT_S = 1.0  # CPU seconds per case
HANG_S = 10.0  # wall seconds: a hang, whatever else the machine is doing


@dataclass
class Case:
    kind: str
    command: str
    index: int
    status: int
    seconds: float  # wall clock
    cpu: float  # this process's CPU seconds: the 1 s limit, unaffected by a busy machine
    stderr: list[str]
    crash: str | None = None
    problems: list[str] = field(default_factory=list)


def run_main(argv: list[str]) -> tuple[int, str, str | None]:
    """`tunelab ARGV` in this process: (exit status, stderr, traceback of an escaped exception)."""
    from tunelab import cli

    err, out = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()  # the CLI's basicConfig binds the stderr of the call that made it
    old = sys.argv
    sys.argv = ["tunelab", *argv]
    status, crash = 0, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.main()
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - what a user would see as a traceback
        status, crash = 1, traceback.format_exc()
    finally:
        sys.argv = old
    return status, err.getvalue(), crash


class Setup:
    """A good toy checkpoint, a toy world index and run file, a work folder."""

    def __init__(self, root: Path):
        from tests.train.conftest import write_run
        from tunelab.data.buckets import BucketConfig
        from tunelab.data.index import IndexOptions, build_index
        from tunelab.models.checkpoint import new_checkpoint
        from tunelab.toy.world import make_world

        self.root = root
        self.good = new_checkpoint("toy", root / "good.safetensors", seed=1, dtype="fp16")
        make_world(root / "images", n=4, seed=0)
        opts = IndexOptions(buckets=BucketConfig(resolution=64, min_side=32, max_side=128, step=32))
        build_index([f"folder:{root / 'images'}"], root / "index.parquet", opts)
        self.run_file = write_run(root / "run.toml", root / "index.parquet", root / "run",
                                  train={"max_steps": 1, "batch_size": 1}, save={"every_n_steps": 0, "dtype": "fp16"})
        self.work = root / "work"

    def argv(self, command: str, path: Path) -> list[str]:
        w = self.work
        if command == "inspect":
            return ["model", "inspect", str(path)]
        if command == "convert":
            return ["model", "convert", str(path), "--out", str(w / "converted.safetensors")]
        if command == "drift":
            return ["drift", str(self.good), str(path), "--out", str(w / "drift")]
        if command == "grid":
            return ["grid", str(path), "-p", "a red circle", "--steps", "1", "--out", str(w / "grid")]
        if command == "train":
            return ["train", str(self.run_file), "--init-from", str(path)]
        if command == "merge":
            recipe = w / "r.mecha"
            recipe.write_text(f'version 0.1.0\nmodel "{self.good}" model_config="sdxl-sgm" merge_space="weight"\n'
                              f'model "{path}" model_config="sdxl-sgm" merge_space="weight"\n'
                              'merge "weighted_sum" &0 &1 alpha=0.5\n')
            return ["merge", "run", str(recipe), "--out", str(w / "merged.safetensors")]
        raise ValueError(command)

    def fresh(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.root / "run", ignore_errors=True)
        self.work.mkdir()


def judge(case: Case, well_formed: bool, path: Path) -> Case:
    if case.crash:
        case.problems.append("traceback: " + case.crash.strip().splitlines()[-1])
    errors = [line for line in case.stderr if line.startswith("error:")]
    if case.status == 0:
        if not well_formed:
            case.problems.append("accepted a malformed file")
    elif case.status != 2 or len(errors) != 1:
        case.problems.append(f"exit {case.status} with {len(errors)} error lines")
    elif path.name not in errors[0]:
        case.problems.append("the error does not name the file")
    if any("Traceback" in line for line in case.stderr):
        case.problems.append("traceback on stderr")
    if not (well_formed and case.status == 0):
        if case.cpu > LIMIT_S:
            case.problems.append(f"took {case.cpu:.2f} CPU s")
        if case.seconds > HANG_S:
            case.problems.append(f"took {case.seconds:.1f} s (wall)")
    return case


def limit_memory(headroom: int = 1 << 30) -> None:
    """Cap the address space at what the process maps now plus `headroom`."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    now = pages * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (now + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))


def fuzz(n: int, seed: int = 0, commands: tuple[str, ...] = COMMANDS, root: Path | None = None,
         progress: bool = False, full_rounds: int = 2) -> list[Case]:
    """`full_rounds`: for how many rounds of the mutation classes the well-formed mutants also run
    the commands that do a whole job (grid, train, merge: seconds each)."""
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="tunelab-fuzz-")) if own else root
    try:
        s = Setup(root)
        for command in commands:  # warm-up: imports and first-call costs are not the file's
            s.fresh()
            status, err, crash = run_main(s.argv(command, s.good) + (["--help"] if command == "train" else []))
            assert crash is None and status == 0, f"warm-up of {command} failed:\n{err}\n{crash}"
        gc.collect()
        gc.freeze()  # the warm-up's millions of objects: a full collection of them mid-case is not the file's cost
        limit_memory()
        good = s.good.read_bytes()
        cases = []
        bad = root / "model.safetensors"
        for i, (kind, blob) in enumerate(mutants(good, n, seed)):
            bad.write_bytes(blob)
            well_formed = kind in WELL_FORMED
            full = i < full_rounds * len(MUTATIONS)
            for command in commands:
                if well_formed and not full and command in ("grid", "train", "merge"):
                    continue
                s.fresh()
                t, c = time.perf_counter(), time.process_time()
                status, err, crash = run_main(s.argv(command, bad))
                case = Case(kind, command, i, status, time.perf_counter() - t, time.process_time() - c,
                            err.splitlines(), crash)
                cases.append(judge(case, well_formed, bad))
            if progress and (i + 1) % 50 == 0:
                print(f"{i + 1}/{n} files, {sum(bool(c.problems) for c in cases)} problems", file=sys.stderr)
        cases += _pickles(s, commands)
        return cases
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _pickles(s: Setup, commands: tuple[str, ...]) -> list[Case]:
    """A real pickle checkpoint (torch.save of a state dict) is refused by every command, unread."""
    import torch

    cases = []
    for suffix in (".ckpt", ".pt"):
        path = s.root / f"model{suffix}"
        torch.save({"state_dict": {"x": torch.zeros(2)}}, path)
        for command in commands:
            s.fresh()
            t, c = time.perf_counter(), time.process_time()
            status, err, crash = run_main(s.argv(command, path))
            case = judge(Case("pickle", command, 0, status, time.perf_counter() - t, time.process_time() - c,
                              err.splitlines(), crash), False, path)
            if case.status == 2 and "pickle" not in " ".join(case.stderr):
                case.problems.append("not refused as a pickle")
            cases.append(case)
    return cases


def summary(cases: list[Case]) -> dict:
    by: dict[str, dict] = {}
    for c in cases:
        row = by.setdefault(c.kind, {"cases": 0, "errors": 0, "accepted": 0, "problems": 0, "max_s": 0.0, "max_cpu_s": 0.0})
        row["cases"] += 1
        row["errors"] += c.status == 2
        row["accepted"] += c.status == 0
        row["problems"] += bool(c.problems)
        row["max_s"] = max(row["max_s"], round(c.seconds, 3))
        row["max_cpu_s"] = max(row["max_cpu_s"], round(c.cpu, 3))
    return by


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="mutated files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--full-rounds", type=int, default=2,
                    help="rounds of mutation classes whose well-formed files also run grid/train/merge")
    ap.add_argument("--out", type=Path, help="write every case as JSON here")
    a = ap.parse_args()
    cases = fuzz(a.n, a.seed, tuple(a.commands.split(",")), progress=True, full_rounds=a.full_rounds)
    if a.out:
        a.out.write_text(json.dumps([asdict(c) for c in cases], indent=1))
    print(json.dumps(summary(cases), indent=1))
    bad = [c for c in cases if c.problems]
    for c in bad[:20]:
        print(f"{c.kind} #{c.index} {c.command}: {'; '.join(c.problems)} | {' / '.join(c.stderr)[-300:]}")
    print(f"{len(cases)} cases, {len(bad)} with problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
