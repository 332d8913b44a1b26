"""merge evolve on a probed toy finetune: the search and its uniform baseline, a winner written by
sd-mecha that measures what the search measured, and a SIGKILLed search (a real process) that
resumes and ends exactly where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import tunelab_cli
from tunelab.merge.evolve import EvolveSettings, Fitness, Mixer, evolve, parse_fitness

SETTINGS = dict(budget=12, popsize=4, space="components")


def _args(run, base, out):
    return ["merge", "evolve", "--base", str(base), "--finetune", str(run / "checkpoints" / "last.safetensors"),
            "--run", str(run), "--budget", "12", "--popsize", "4", "--space", "components", "--dtype", "fp32",
            "--out", str(out)]


def test_evolve_resumes_after_sigkill_and_its_winner_is_what_it_measured(probed_run, tmp_path):
    run, base = probed_run
    last = run / "checkpoints" / "last.safetensors"
    whole = evolve(base, [last], run, tmp_path / "whole", EvolveSettings(**SETTINGS), dtype="fp32", progress=False)
    assert whole.parts == ["te1", "te2", "unet"]
    kinds = [h["kind"] for h in whole.history]
    assert kinds.count("uniform") == 12 and kinds.count("cma") == 12
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["improvement"] == pytest.approx(summary["uniform_fitness"] - summary["best_fitness"])
    assert whole.best_fitness == min(h["fitness"] for h in whole.history if h["kind"] == "cma")

    # the winner, written by sd-mecha from the recipe, measures what the search measured in memory
    mixer = Mixer(tmp_path / "whole" / "best.safetensors", [last], "components")
    again, _ = Fitness(run, mixer, EvolveSettings().fitness)(np.zeros(mixer.dims))
    assert again == pytest.approx(whole.best_fitness, rel=1e-4)
    assert 'merge "add_difference"' in (tmp_path / "whole" / "best.mecha").read_text()

    # a real process, SIGKILLed after its first finished generation, then the same command again
    out = tmp_path / "killed"
    proc = subprocess.Popen([*tunelab_cli(), *_args(run, base, out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, deadline = out / "state.pkl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                if pickle.loads(state.read_bytes())["generation"] >= 1:
                    break
            except Exception:  # noqa: BLE001 - caught between writes: the rename makes it whole next time
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = pickle.loads(state.read_bytes())["generation"]
    assert 1 <= done < 3 and not (out / "summary.json").exists()
    from tests.conftest import run_cli

    resumed = run_cli(*_args(run, base, out), timeout=300)
    assert "CMA-ES (12 evaluations)" in resumed.stdout
    ends = json.loads((out / "summary.json").read_text())
    assert ends["best_fitness"] == summary["best_fitness"] and ends["best_weights"] == summary["best_weights"]
    assert (out / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert (out / "evolve.png").stat().st_size > 10_000


def test_evolve_settings_are_checked(probed_run, tmp_path):
    run, base = probed_run
    assert parse_fitness("learn_loss=1,drift_preserve=2") == {"probe/learn_loss": 1.0, "probe/drift_preserve": 2.0}
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="NAME=WEIGHT"):
        parse_fitness("learn_loss=x")
    with pytest.raises(TunelabError, match="--space"):
        Mixer(base, [base], "layers")
    evolve(base, [run / "checkpoints" / "last.safetensors"], run, tmp_path / "e", EvolveSettings(budget=4, popsize=4),
           progress=False)
    with pytest.raises(TunelabError, match="other settings"):  # a state of another search is never mixed in
        evolve(base, [run / "checkpoints" / "last.safetensors"], run, tmp_path / "e", EvolveSettings(budget=8, popsize=4),
               progress=False)
