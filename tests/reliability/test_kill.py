"""SIGKILL anywhere: inside a checkpoint's bytes, between a state's files and its rename, inside
the metrics write, at random moments; inside a latent shard; inside a merge's output. Then run
again: the final weights are bitwise those of an uninterrupted run, no half-written file is ever
read as a good one, the run directory stays usable. Points are `tunelab.faults` (TUNELAB_FAULT);
random moments are a timer. Plus two `tunelab train` on one run directory: the second is refused."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, tunelab_cli
from tests.train.conftest import write_run

# (point, n-th hit). The toy checkpoint has 957 tensors; save.every_n_steps = 2 of 6 steps writes
# checkpoints and states at steps 2, 4, 6 (+ last).
SAMPLE = [("checkpoint.write", 700), ("state.files", 2)]
POINTS = SAMPLE + [("checkpoint.write", 1), ("checkpoint.write", 1500), ("checkpoint.rename", 1),
                   ("checkpoint.rename", 3), ("state.files", 1), ("state.rename", 2), ("metrics.write", 1),
                   ("metrics.write", 2)]


WITH_EMA = {"ema": {"enabled": True, "decay": 0.9}}  # every run keeps an EMA: it must survive the kills as well


def _start(args: list, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TUNELAB_FAULT": fault} if fault else {k: v for k, v in os.environ.items() if k != "TUNELAB_FAULT"}
    return subprocess.Popen([*tunelab_cli(), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed_by(proc: subprocess.Popen, timeout: int = 900) -> None:
    proc.communicate(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"not killed at the fault point (exit {proc.returncode})"


def assert_nothing_half_written_is_taken(run: Path) -> None:
    """Every file under its final name is whole; partial files are hidden or named so."""
    from tunelab.models.safetensors_io import read_header
    from tunelab.run import RunDir

    for f in run.rglob("*.safetensors"):
        if f.name.startswith(".") or any(p.name.endswith(".partial") for p in f.parents):
            continue
        header = read_header(f)  # complete layout: nothing truncated
        assert f.stat().st_size == header.data_start + sum(t.end - t.begin for t in header.tensors.values())
    rd = RunDir(run)
    for state in rd.complete_states():
        assert rd.state_problem(state) is None, state
    if rd.metrics.exists():
        pq.read_table(rd.metrics)


def _same(a: Path, b: Path) -> bool:
    A, B = load_file(a), load_file(b)
    return A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)


def _kill_and_resume(tmp_path: Path, world: Path, points: list, random_kills: int = 0):
    reference = write_run(tmp_path / "ref.toml", world, tmp_path / "ref", **WITH_EMA)
    t = time.time()
    run_cli("train", reference, timeout=900)
    took = time.time() - t
    ref_last = tmp_path / "ref" / "checkpoints" / "last.safetensors"
    rng = random.Random(0)
    cases = [(p, n, None) for p, n in points] + [(None, 0, rng.uniform(0.35, 0.95) * took) for _ in range(random_kills)]
    for i, (point, nth, delay) in enumerate(cases):
        run = tmp_path / f"k{i}"
        cfg = write_run(tmp_path / f"k{i}.toml", world, run, **WITH_EMA)
        if point:
            _killed_by(_start(["train", cfg], f"{point}:{nth}"))
        else:
            proc = _start(["train", cfg])
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=900)
        assert_nothing_half_written_is_taken(run)
        done = run_cli("train", cfg, timeout=900)
        assert "trained 6 steps" in done.stdout, (point, nth, delay)
        assert _same(ref_last, run / "checkpoints" / "last.safetensors"), (point, nth, delay)
        ema = Path("checkpoints") / "ema" / "last.safetensors"  # the EMA resumes bit for bit too
        assert _same(tmp_path / "ref" / ema, run / ema), (point, nth, delay)
        steps = [r["step"] for r in pq.read_table(run / "metrics.parquet").to_pylist() if r["tag"] == "loss"]
        assert steps == [1, 2, 3, 4, 5, 6], (point, nth, delay)  # nothing logged twice, nothing lost
        assert_nothing_half_written_is_taken(run)


def test_kill_at_checkpoint_and_state_writes_then_resume(tmp_path, world):
    _kill_and_resume(tmp_path, world, SAMPLE)


@pytest.mark.slow
def test_kill_anywhere_then_resume(tmp_path, world):
    _kill_and_resume(tmp_path, world, POINTS, random_kills=3)


@pytest.mark.slow  # fast twin: tests/data/test_latents.py::test_resume_after_kill
def test_kill_while_caching_latents_then_resume(tmp_path, world):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("data", "cache", world, "--out", straight, "--model", "toy", "--shard-size", "8")
    _killed_by(_start(["data", "cache", world, "--out", killed, "--model", "toy", "--shard-size", "8"], "cache.shard:2"))
    assert len(list(killed.glob("shard-*.safetensors"))) == 1  # the first shard whole, the second never named
    run_cli("data", "cache", world, "--out", killed, "--model", "toy", "--shard-size", "8")
    from tunelab.data.latents import LatentStore, verify_cache

    report = verify_cache(world, killed, progress=False)
    assert not report.corrupt and not report.missing and not report.bad_shards and not report.duplicates

    a, b = LatentStore(straight), LatentStore(killed)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert (a.get(key).latents == b.get(key).latents).all(), key


@pytest.mark.slow
def test_kill_while_merging_then_merge_again(tmp_path):
    from tunelab.models.checkpoint import new_checkpoint

    a = new_checkpoint("toy", tmp_path / "a.safetensors", seed=1, dtype="fp16")
    b = new_checkpoint("toy", tmp_path / "b.safetensors", seed=2, dtype="fp16")
    recipe = tmp_path / "r.mecha"
    recipe.write_text(f'version 0.1.0\nmodel "{a}" model_config="sdxl-sgm" merge_space="weight"\n'
                      f'model "{b}" model_config="sdxl-sgm" merge_space="weight"\nmerge "weighted_sum" &0 &1 alpha=0.3\n')
    run_cli("merge", "run", recipe, "--out", tmp_path / "straight.safetensors")
    out = tmp_path / "out.safetensors"
    _killed_by(_start(["merge", "run", recipe, "--out", out], "merge.write:500"))
    assert not out.exists()  # the output appears only when complete
    run_cli("merge", "run", recipe, "--out", out)
    assert _same(tmp_path / "straight.safetensors", out)


@pytest.mark.slow  # fast twin: tests/train/test_run_files_kept.py::test_a_second_train_on_the_same_run_directory_is_refused
def test_a_second_train_on_the_same_run_is_refused(tmp_path, world):
    cfg = write_run(tmp_path / "r.toml", world, tmp_path / "run")
    first = _start(["train", cfg])
    lock = tmp_path / "run" / ".lock"
    deadline = time.time() + 600
    while not lock.exists() or not lock.read_text().strip():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.1)
    second = run_cli("train", cfg, check=False)
    assert second.returncode == 2 and "in use by another `tunelab train`" in second.stderr, second.stderr
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0 and "trained 6 steps" in out, err[-2000:]
    assert_nothing_half_written_is_taken(tmp_path / "run")
