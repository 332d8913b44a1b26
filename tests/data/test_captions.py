"""Caption modes, tag policies and the (seed, epoch, index) determinism contract."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tunelab.data.captions import (
    CaptionConfig,
    normalize_tags,
    prompt_for,
    resolve_wildcards,
    sample_rng,
)

TAGS = "artist_a, char_b, 1girl, long_hair, 1girl, smile"
CAPTION = "A girl with long hair smiling."


def test_normalize_tags_underscores_and_dedupe() -> None:
    assert normalize_tags(TAGS) == ["artist_a", "char_b", "1girl", "long_hair", "smile"]
    assert normalize_tags(TAGS, "to_space") == ["artist a", "char b", "1girl", "long hair", "smile"]
    assert normalize_tags("^_^, o_o, ab_c", "to_space") == ["^_^", "o_o", "ab c"]  # emoticons keep their underscore
    assert normalize_tags(TAGS, dedupe=False).count("1girl") == 2
    assert normalize_tags(None) == [] and normalize_tags(" , ,") == []


@pytest.mark.parametrize(
    ("mode", "order", "expected"),
    [
        ("tags", "tags_first", "artist_a, char_b, 1girl, long_hair, smile"),
        ("caption", "tags_first", CAPTION),
        ("concat", "tags_first", f"artist_a, char_b, 1girl, long_hair, smile, {CAPTION}"),
        ("concat", "caption_first", f"{CAPTION}, artist_a, char_b, 1girl, long_hair, smile"),
    ],
)
def test_modes(mode: str, order: str, expected: str) -> None:
    cfg = CaptionConfig(mode=mode, concat_order=order)
    assert prompt_for(TAGS, CAPTION, cfg, 0, 0, 0) == expected


@pytest.mark.parametrize("mode", ["tags", "caption", "pick", "concat"])
def test_every_mode_falls_back_to_what_exists(mode: str) -> None:
    cfg = CaptionConfig(mode=mode)
    assert prompt_for(None, CAPTION, cfg, 0, 0, 3) == CAPTION
    assert prompt_for("a, b", None, cfg, 0, 0, 3) == "a, b"
    assert prompt_for("a, b", "  \n", cfg, 0, 0, 3) == "a, b"
    assert prompt_for(None, None, cfg, 0, 0, 3) == ""


def test_pick_is_random_per_sample_with_the_configured_rate() -> None:
    cfg = CaptionConfig(mode="pick", pick_caption_probability=0.3)
    n = 4000
    caps = sum(prompt_for(TAGS, CAPTION, cfg, 7, 0, i) == CAPTION for i in range(n))
    # Binomial(4000, 0.3): sd ~ 29; 5 sd bounds keep this from flaking.
    assert abs(caps - 0.3 * n) < 5 * (n * 0.3 * 0.7) ** 0.5
    # A different epoch draws differently for the same samples.
    other = [prompt_for(TAGS, CAPTION, cfg, 7, 1, i) == CAPTION for i in range(200)]
    assert other != [prompt_for(TAGS, CAPTION, cfg, 7, 0, i) == CAPTION for i in range(200)]


def test_quality_tags_positions_and_never_silently() -> None:
    q = "masterpiece, best_quality"
    base = prompt_for("a, b", None, CaptionConfig(quality_tags=q), 0, 0, 0)
    assert base == "a, b"  # absent is the default even when tags are configured
    front = prompt_for("a, b", None, CaptionConfig(quality_tags=q, quality_position="front"), 0, 0, 0)
    back = prompt_for("a, b", None, CaptionConfig(quality_tags=q, quality_position="back"), 0, 0, 0)
    assert front == "masterpiece, best_quality, a, b"
    assert back == "a, b, masterpiece, best_quality"


def test_shuffle_keeps_first_n_and_is_deterministic() -> None:
    tags = ", ".join(f"t{i}" for i in range(20))
    cfg = CaptionConfig(shuffle_tags=True, keep_tags=2)
    prompts = {prompt_for(tags, None, cfg, 1, 0, i) for i in range(20)}
    assert len(prompts) > 10
    for p in prompts:
        parts = p.split(", ")
        assert parts[:2] == ["t0", "t1"] and sorted(parts) == sorted(tags.split(", "))
    assert prompt_for(tags, None, cfg, 1, 4, 9) == prompt_for(tags, None, cfg, 1, 4, 9)
    assert prompt_for(tags, None, cfg, 2, 4, 9) != prompt_for(tags, None, cfg, 1, 4, 9)


def test_tag_dropout_and_caption_dropout_rates() -> None:
    tags = ", ".join(f"t{i}" for i in range(10))
    cfg = CaptionConfig(keep_tags=1, tag_dropout=0.5)
    lengths = [len(prompt_for(tags, None, cfg, 0, 0, i).split(", ")) for i in range(1000)]
    assert all(n >= 1 for n in lengths)
    assert abs(sum(lengths) / len(lengths) - (1 + 9 * 0.5)) < 0.3
    drop = CaptionConfig(caption_dropout=0.2)
    empty = sum(prompt_for(tags, "x", drop, 0, 0, i) == "" for i in range(2000))
    assert abs(empty - 400) < 5 * (2000 * 0.2 * 0.8) ** 0.5


def test_wildcards_and_multiline_captions() -> None:
    rng = sample_rng(0, 0, 0)
    seen = {resolve_wildcards("a {red|blue|{big|small} green} cat", sample_rng(0, 0, i)) for i in range(100)}
    assert seen == {"a red cat", "a blue cat", "a big green cat", "a small green cat"}
    assert resolve_wildcards("no wildcard {here}", rng) == "no wildcard {here}"
    cfg = CaptionConfig(mode="caption")
    lines = {prompt_for(None, "first line\n\nsecond line\n", cfg, 0, 0, i) for i in range(50)}
    assert lines == {"first line", "second line"}
    off = CaptionConfig(mode="caption", wildcards=False)
    assert prompt_for(None, "{a|b}", off, 0, 0, 0) == "{a|b}"


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        CaptionConfig(modes="tags")
    with pytest.raises(ValidationError):
        CaptionConfig(mode="both")
    with pytest.raises(ValidationError):
        CaptionConfig(tag_dropout=1.5)
    assert all(f.description for f in CaptionConfig.model_fields.values())
