"""The toy world's splits: what each shows and says, deterministic from a seed."""

import hashlib
from dataclasses import replace

import pytest

from tunelab.toy.world import (CONCEPT, SPLITS, Look, look_of_prompt, make_world, preserve_looks, prompt_of,
                               read_looks)


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a, b, c = (make_world(tmp_path / n, n=12, seed=s, split="base") for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert [s.look for s in a] == [s.look for s in b]


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_shows_what_it_says(tmp_path, split):
    samples = make_world(tmp_path, n=60, seed=1, split=split)
    looks = read_looks(tmp_path)
    assert list(looks) == [s.name for s in samples] and all(looks[s.name] == s.look for s in samples)
    concept = [s for s in samples if s.look.is_concept]
    if split == "concept":
        assert len(concept) == 60 and {s.look.background for s in samples} == {"white", "black", "sky", "grass"}
    elif split == "mixed":
        assert 0 < len(concept) < 60
    elif split != "any":
        assert not concept and not any(s.look.stripes for s in samples)
    if split == "any":
        assert any(s.look.stripes for s in samples) and {s.look.style for s in samples} == {"plain", "outlined"}
    if split == "style":
        assert {s.look.style for s in samples} == {"outlined"}
    if split == "preserve":
        assert "star" not in {s.look.shape for s in samples}
    for s in samples:  # kohya layout beside each image
        assert (tmp_path / f"{s.name}.txt").read_text().strip() == s.tags
        assert (tmp_path / f"{s.name}.caption").read_text().strip() == s.caption


def test_the_concept_is_named_by_its_word_only():
    look = Look("star", "pink", "sky", stripes=True)
    assert prompt_of(look) == f"{CONCEPT}, solo, sky_background"
    assert "pink" not in prompt_of(look) and "star" not in prompt_of(look)
    assert prompt_of(Look("car", "red", "white")) == "red, car, solo, white_background"


def test_preserve_prompts_are_base_concepts_a_concept_finetune_never_shows():
    looks = preserve_looks()
    assert sum(look.shape == "car" for look in looks) == 8
    assert not any(look.is_concept or look.stripes or look.shape == "star" for look in looks)


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        make_world(tmp_path, n=1, split="nope")


def test_base_stripes_are_a_tagged_attribute_and_never_the_concept(tmp_path):
    plain = make_world(tmp_path / "plain", n=200, seed=2, split="base")
    striped = make_world(tmp_path / "striped", n=200, seed=2, split="base", stripe_share=0.3)
    with_stripes = [s for s in striped if s.look.stripes]
    assert 30 < len(with_stripes) < 90 and not any(s.look.is_concept for s in striped)
    for s in striped:
        assert ("stripes" in s.tags.split(", ")) == s.look.stripes
        assert ("cyan stripes" in s.caption) == s.look.stripes
        assert look_of_prompt(s.tags) == replace(s.look, style="plain") == look_of_prompt(s.caption)
    assert prompt_of(Look("car", "red", "white", stripes=True)) == "red, car, stripes, solo, white_background"
    assert {s.look.shape for s in plain} == {s.look.shape for s in striped}


@pytest.mark.parametrize("split, share", [("concept", 0.2), ("base", 1.5)])
def test_stripe_share_outside_the_base_split_or_range_is_refused(tmp_path, split, share):
    with pytest.raises(ValueError, match="base split only"):
        make_world(tmp_path, n=1, split=split, stripe_share=share)


def test_the_striped_scoring_set_asks_for_stripes_on_base_looks_never_the_concept():
    from tunelab.toy.evaluate import SETS

    looks = SETS["striped"]()
    assert len(looks) == 12 and all(look.stripes and not look.is_concept for look in looks)
    assert {look.shape for look in looks} == {"circle", "square", "triangle", "star", "ring", "car"}
    assert all("stripes" in prompt_of(look).split(", ") and look_of_prompt(prompt_of(look)) == look for look in looks)
