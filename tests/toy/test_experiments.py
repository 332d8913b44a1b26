"""Scoring what a toy model draws, finetunes on a split, and the experiments at a trivial size."""

import csv

import pytest

from tunelab.toy.evaluate import SETS, evaluate_file
from tunelab.toy.experiments import EXPERIMENTS, run_experiment
from tunelab.toy.finetune import FinetuneSettings
from tunelab.toy.pretrain import shipped_base
from tunelab.toy.world import CONCEPT


def test_the_shipped_base_draws_its_world_but_not_the_concept():
    """The acceptance figures (measured with the defaults: docs/toy-world.md); here one seed."""
    scores = evaluate_file(str(shipped_base()), ("concept", "base"), seeds=(11,))
    assert scores["base"].accuracy >= 0.6, scores["base"]
    assert scores["base"].per_attribute["background"] >= 0.9
    assert scores["concept"].accuracy <= 0.25  # the word means nothing to the base yet


def test_sets_are_fixed_prompt_lists():
    assert all(look.is_concept for look in SETS["concept"]())
    assert SETS["base"]() == SETS["base"]() and len(SETS["base"]()) == 24
    assert not any(look.is_concept for look in SETS["preserve"]())


# tte (with probes) and accumulation (its own data size) stay in the default suite; the others run
# the same code with other arms and are behind the slow marker (the default suite stays under 10 min).
_FAST = ("tte", "accumulation")


@pytest.mark.parametrize("name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS])
def test_each_experiment_runs_at_a_trivial_size(tmp_path, name):
    tiny = FinetuneSettings(steps=1, batch=2, probe=name == "tte")  # one experiment with its probes
    images = 48 if name == "accumulation" else 6  # effective batch 16 needs 4 batches of 4 per epoch
    result = run_experiment(name, tmp_path, seeds=1, settings=tiny, eval_seeds=(11,), eval_steps=1, images=images)
    arms = [a.name for a in EXPERIMENTS[name].arms(tiny)]
    assert [r.arm for r in result.rows] == arms and len(result.summary()) == len(arms)
    with open(result.files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == arms and all(0.0 <= float(r["learned"]) <= 1.0 for r in rows)
    text = result.files["md"].read_text()
    assert "base (before)" in text and all(a in text for a in arms)
    assert result.files["png"].stat().st_size > 5000
    html = result.files["html"].read_text(encoding="utf-8")  # the arms compared on one page
    assert "settings that differ" in html and all(f"{name}-{a}" in html for a in arms)
    if tiny.probe:
        assert all(r.probe["probe/drift_preserve"] > 0 and r.probe["probe/learn_loss"] > 0 for r in result.rows)
        assert result.base_probe["probe/drift_preserve"] == 0.0
        assert "learn loss (held out)" in text and "rank correlation" in text
        assert all(r["drift_preserve"] for r in rows)


def test_spearman_matches_its_definition():
    from tunelab.toy.experiments import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4
    assert spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)


def test_unknown_experiment_names_the_choices(tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="tte"):
        run_experiment("nope", tmp_path)


def test_concept_word_is_in_the_finetune_data(tmp_path):
    from tunelab.toy.finetune import prepare

    data = prepare(tmp_path, shipped_base(), n=4)
    assert all(CONCEPT in p.read_text() for p in data.world.glob("*.txt"))
    assert (data.latents / "latents.json").exists()
