"""Files that must not get lost or damaged: retention prunes only tunelab's own names, a damaged
state falls back to the one before it (or the one a user names), checkpoints honour the umask,
and one run directory takes one `tunelab train` at a time."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.train.conftest import write_run
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.run import RunDir
from tunelab.train.trainer import train


def _same(a, b) -> bool:
    A, B = load_file(a), load_file(b)
    return A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)


def test_keep_last_prunes_only_what_tunelab_named(tmp_path):
    run = RunDir(tmp_path / "r")
    run.checkpoints.mkdir(parents=True)
    for name in ("step-00000001", "step-00000002", "step-00000003", "step-00000002-keep", "step-best", "last"):
        run.checkpoint_path(name).write_bytes(b"")
    run.prune_checkpoints(keep_last=1)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "last.safetensors", "step-00000002-keep.safetensors", "step-00000003.safetensors", "step-best.safetensors"]


def test_checkpoints_honour_the_umask(tmp_path, toy_components):
    from tunelab.models.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        path = save_checkpoint(toy_components, tmp_path / "c.safetensors", dtype="fp16")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by a UI running as another user


@pytest.fixture(scope="module")
def straight(tmp_path_factory, world):
    """An uninterrupted 3-step run: what every resumed run below must end equal to."""
    root = tmp_path_factory.mktemp("straight")
    train(load_config(write_run(root / "a.toml", world, root / "a", train={"max_steps": 3}, save={"every_n_steps": 1})))
    return root / "a" / "checkpoints" / "last.safetensors"


def _run_with_two_states(tmp_path, world):
    """A finished 3-step run with states at steps 2 and 3; its last step undone so it resumes."""
    cfg = load_config(write_run(tmp_path / "b.toml", world, tmp_path / "b", train={"max_steps": 3},
                                save={"every_n_steps": 1}))
    train(cfg)
    run = RunDir(tmp_path / "b")
    assert [p.name for p in run.complete_states()] == ["step-00000002", "step-00000003"]
    return cfg, run


@pytest.mark.parametrize("damage", ["corrupt record", "missing optimizer", "cut short"])
def test_a_damaged_state_falls_back_to_the_one_before(tmp_path, world, straight, damage, caplog):
    cfg, run = _run_with_two_states(tmp_path, world)
    newest = run.state_path(3)
    if damage == "corrupt record":
        (newest / "trainer.json").write_text('{"step": 3, "epo')
    elif damage == "missing optimizer":
        (newest / "optimizer.bin").unlink()
    else:
        victim = max((p for p in newest.iterdir() if p.name != "trainer.json"), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (run.checkpoint_path("last")).unlink()
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert "passing over the damaged training state step-00000003" in caplog.text
    assert result.steps == 3 and _same(straight, run.checkpoint_path("last"))  # resumed at 2, exactly


def test_resume_from_a_chosen_state_and_no_usable_state(tmp_path, world, straight):
    cfg, run = _run_with_two_states(tmp_path, world)
    run.checkpoint_path("last").unlink()
    with pytest.raises(TunelabError, match="--resume-from: .*step-00000009 is not a state folder"):
        train(cfg, resume_from="step-00000009")
    assert train(cfg, resume_from="step-00000002").steps == 3  # a bare name under RUN/state/
    assert _same(straight, run.checkpoint_path("last"))
    for state in run.complete_states():
        (state / "trainer.json").write_text("not json")
    with pytest.raises(TunelabError, match="no training state .* can be resumed from"):
        train(cfg)


def test_a_second_train_on_the_same_run_directory_is_refused(tmp_path, world):
    cfg_path = write_run(tmp_path / "c.toml", world, tmp_path / "c", train={"max_steps": 1})
    holder = RunDir(tmp_path / "c").lock()  # as a running `tunelab train` holds it
    try:
        proc = run_cli("train", cfg_path, check=False)  # a real second process
        assert proc.returncode == 2 and "is in use by another `tunelab train`" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr
        assert not RunDir(tmp_path / "c").states.exists()  # it wrote nothing
    finally:
        holder.release()
    assert train(load_config(cfg_path)).steps == 1  # free again: the next run takes it
    assert train(load_config(cfg_path)).steps == 1  # ... and the lock went with the finished run
