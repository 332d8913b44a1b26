"""A1111's per-step prompt syntax (prompt editing, alternation, AND): parsed as A1111 parses it,
warned about, never applied."""

from __future__ import annotations

import logging

import pytest

from tunelab.sample.prompt_schedule import composable_parts, prompt_schedule, unsupported_syntax, warn_unsupported


# A1111 v1.10 modules/prompt_parser.py, get_learned_conditioning_prompt_schedules: its doctests (10 steps).
@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # The docstring shows [(5, "a  c"), (10, "a {b|d{ c")] under "not handling this right now", but the
    # grammar's plain text excludes "|", so lark (1.1.2, A1111's pinned version) rejects the prompt and
    # A1111 takes it as it is: we follow the code.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
])
def test_schedule_matches_a1111_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_of_a1111s_own_example_and_hires_pass():
    # the comment at the top of A1111's prompt_parser.py (100 steps)
    p = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
         "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(p, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]
    # the doctests with hires_steps=10: fractions above 1 fall into the hires pass
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    # outside the grammar ("|" outside brackets, a lone trailing backslash): the prompt as it is
    assert prompt_schedule("a|b [c:d:2]", 10) == [(10, "a|b [c:d:2]")]
    assert prompt_schedule("[c:d:2] \\", 10) == [(10, "[c:d:2] \\")]


def test_composable_parts_as_a1111_splits_and():
    # A1111 v1.10 prompt_parser.get_multicond_prompt_list: split at the word AND; a part's trailing
    # ":N" is its weight (re_weight), also without AND; the text keeps its leading spaces.
    assert composable_parts("a cat AND a dog:0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert composable_parts("a cat: 1.5 ") == [("a cat", 1.5)]
    assert composable_parts("ANDROID, (x:1.2)") == [("ANDROID, (x:1.2)", 1.0)]


def test_unsupported_syntax_names_what_a1111_would_do_differently():
    assert unsupported_syntax("a [red:blue:0.5] car") == ["prompt editing '[red:blue:0.5]'"]
    assert unsupported_syntax("[cat|dog]") == ["alternation '[cat|dog]'"]
    assert unsupported_syntax("cat AND dog")[0].startswith("AND (2 prompts")
    assert "a trailing weight :9" in unsupported_syntax("1girl, ratio 16:9")[0]
    # A1111 neither splits nor weights a negative prompt at AND (processing.py: get_learned_conditioning)
    assert unsupported_syntax("cat AND dog:2", negative=True) == []
    for plain in ("(red:1.2), [blue], \\[x\\]", "a [unbalanced", "a|b [c:d:2]", "[a:b]", ""):
        assert unsupported_syntax(plain) == [], plain


def test_warning_once_per_prompt(caplog):
    prompt = "a [warned:once:0.5] test prompt"
    with caplog.at_level(logging.WARNING, logger="tunelab.sample.prompt_schedule"):
        warn_unsupported(prompt)
        warn_unsupported(prompt)
        warn_unsupported("plain text, no warning")
    assert len(caplog.records) == 1
    assert "prompt editing '[warned:once:0.5]'" in caplog.text and "literal text" in caplog.text
