"""A1111's per-step prompt syntax, parsed but not applied: prompt editing, alternation and AND.

A1111 changes the conditioning during sampling for three constructs:

- prompt editing `[from:to:when]` (also `[to:when]`, `[from::when]`): `from` until step `when`,
  then `to`; `when` with a decimal point is a fraction of the steps (0.5 = half), without one a
  step number;
- alternation `[a|b|c]`: a, b, c, a, ... one per step;
- `AND` (composable diffusion, positive prompt only): each part is a prompt of its own, and its
  guidance is weighted by a trailing `:N` (`a cat AND a dog:0.5`); A1111 reads that trailing
  `:N` even without AND.

tunelab encodes one conditioning per image (the sampling loop has no per-step conditioning), so it
renders these as the literal text it is given and warns once per prompt, naming what it found.
`prompt_schedule` and `composable_parts` give A1111's reading of a prompt for when the sampler
learns per-step conditioning; the warning uses the same parse, so it fires exactly where A1111
would do something else.

Hand-written here: A1111 parses with a lark grammar (an Earley parser); this is a small
recursive-descent parser for the same language (a bracket is read as a construct where it can
be one, else it is literal text; a `|` outside brackets, or a lone trailing backslash, means the
prompt does not parse and A1111 then takes it as it is), checked against A1111's own examples.
One case has no single A1111 answer: with a stray closing bracket after a construct (`[a:b:3]]`)
the grammar is ambiguous, and lark's pick changes with Python's string-hash seed, so A1111 reads
the same prompt differently from one start to the next; this parser always reads the construct.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

log = logging.getLogger(__name__)

# lark's SIGNED_NUMBER, longest alternative first: 3, -2, .5, 1., 1.5e3, 2e-1
_NUMBER = r"[+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)"
_WHEN = re.compile(rf"\s*({_NUMBER})\s*\]")  # the end of an editing construct: ":" already read
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


@dataclass
class _Edit:
    """[before:after:when]; before None for the two-part form [after:when]."""

    before: list[_Node] | None
    after: list[_Node]
    when: str  # the number as written; its meaning depends on the step counts
    source: str


@dataclass
class _Alternate:
    options: list[list[_Node]]
    source: str


_Node = Union[str, _Edit, _Alternate]


class _NoParse(Exception):
    """The prompt is not in the grammar (A1111 then uses it as it is)."""


class _Parser:
    def __init__(self, text: str):
        self.s = text

    def top(self) -> list[_Node]:
        """The whole prompt: constructs where brackets form them, the rest literal."""
        s, out, i = self.s, [], 0
        while i < len(s):
            if s[i] in "([":
                got = self._bracket(i)
                if got is not None:
                    out.append(got[0])
                    i = got[1]
                    continue
                out.append(s[i])  # an opener that forms nothing is literal
                i += 1
            elif s[i] in ")]:":
                out.append(s[i])
                i += 1
            else:
                nodes, j = self._inner(i)
                if j == i:  # "|" outside brackets, or a lone backslash at the end: not in the grammar
                    raise _NoParse
                out += nodes
                i = j
        return out

    def _inner(self, i: int) -> tuple[list[_Node], int]:
        """Text and nested constructs up to a character the enclosing construct must handle."""
        s, out, start = self.s, [], i
        while i < len(s):
            c = s[i]
            if c in "([":
                got = self._bracket(i)
                if got is None:
                    break
                out.append(s[start:i])
                out.append(got[0])
                i = start = got[1]
            elif c in ")]:|":
                break
            elif c == "\\":
                if i + 1 >= len(s) or s[i + 1] == "\n":
                    break
                i += 2  # an escaped character is text
            else:
                i += 1
        out.append(s[start:i])
        return [n for n in out if n != ""], i

    def _bracket(self, i: int) -> tuple[_Node, int] | None:
        """The construct opening at s[i] ("(" or "[") and the index after it, or None."""
        s = self.s
        first, j = self._inner(i + 1)
        if j >= len(s):
            return None
        if s[i] == "(":
            if s[j] == ")":
                return _group(["(", *first, ")"]), j + 1
            if s[j] == ":":
                second, k = self._inner(j + 1)
                if k < len(s) and s[k] == ")":
                    return _group(["(", *first, ":", *second, ")"]), k + 1
            return None
        if s[j] == "]":
            return _group(["[", *first, "]"]), j + 1
        if s[j] == "|":
            options = [first]
            while j < len(s) and s[j] == "|":
                option, j = self._inner(j + 1)
                options.append(option)
            if j < len(s) and s[j] == "]":
                return _Alternate(options, s[i:j + 1]), j + 1
            return None
        if s[j] == ":":
            m = _WHEN.match(s, j + 1)
            if m:  # [after:when]
                return _Edit(None, first, m.group(1), s[i:m.end()]), m.end()
            second, k = self._inner(j + 1)
            m = _WHEN.match(s, k + 1) if k < len(s) and s[k] == ":" else None
            if m:  # [before:after:when]
                return _Edit(first, second, m.group(1), s[i:m.end()]), m.end()
        return None


def _group(nodes: list[_Node]) -> _Node | list[_Node]:
    """Emphasis brackets stay literal text: merge into one string when nothing inside is a construct."""
    return "".join(nodes) if all(isinstance(n, str) for n in nodes) else _Seq(nodes)


class _Seq(list):
    """Nodes in order (an emphasis group holding a construct)."""


def _parse(prompt: str) -> list[_Node] | None:
    try:
        return _Parser(prompt).top()
    except _NoParse:
        return None


def _walk(nodes: list[_Node]):
    for n in nodes:
        if isinstance(n, _Seq):
            yield from _walk(n)
        elif isinstance(n, _Edit):
            yield n
            yield from _walk(n.before or [])
            yield from _walk(n.after)
        elif isinstance(n, _Alternate):
            yield n
            for option in n.options:
                yield from _walk(option)


def _step_of(when: str, steps: int, hires_base: int | None) -> int:
    """A1111's end step of an edit: a decimal number is a fraction of the steps, an integer a step;
    in a hires pass (hires_base = the first pass's steps) fractions above 1 and steps above the
    first pass's count fall into the hires pass."""
    value = float(when)
    if "." in when:
        value = (value - (1.0 if hires_base is not None else 0.0)) * steps
    else:
        value = value - (hires_base or 0)
    return min(steps, int(value))


def _text_at(nodes: list[_Node], step: int, whens: dict[int, int]) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, _Seq):
            out.append(_text_at(n, step, whens))
        elif isinstance(n, _Edit):
            chosen = (n.before or []) if step <= whens[id(n)] else n.after
            out.append(_text_at(chosen, step, whens))
        else:
            out.append(_text_at(n.options[(step - 1) % len(n.options)], step, whens))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt (no AND splitting): [(last step, text), ...] in step order.

    "a [b:c:0.5] d" at 10 steps -> [(5, "a b d"), (10, "a c d")]. With hires_steps, the schedule
    of the hires pass (steps = the first pass's). A prompt outside the grammar is [(steps, prompt)].
    """
    nodes = _parse(prompt)
    total = steps if hires_steps is None else hires_steps
    if nodes is None:
        return [(total, prompt)]
    whens: dict[int, int] = {}
    ends = {total}
    for n in _walk(nodes):
        if isinstance(n, _Edit):
            whens[id(n)] = _step_of(n.when, total, steps if hires_steps is not None else None)
            if whens[id(n)] >= 1:
                ends.add(whens[id(n)])
        else:
            ends.update(range(1, total + 1))
    return [(end, _text_at(nodes, end, whens)) for end in sorted(ends)]


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """A1111's AND split of a positive prompt: [(text, weight), ...]; a part's trailing ':N' is
    its weight (also without AND: "a cat:1.5" -> [("a cat", 1.5)])."""
    parts = []
    for part in _AND.split(prompt):
        m = _PART_WEIGHT.fullmatch(part)
        parts.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return parts


def unsupported_syntax(prompt: str, negative: bool = False) -> list[str]:
    """What in a prompt A1111 would apply per step or per part and tunelab does not: [] if nothing.

    negative: A1111 neither splits nor weights negative prompts at AND, so only editing and
    alternation count there."""
    found: list[str] = []
    texts = [prompt]
    if not negative:
        parts = composable_parts(prompt)
        if len(parts) > 1:
            found.append(f"AND ({len(parts)} prompts combined by composable diffusion)")
        weights = [m.group(2) for m in map(_PART_WEIGHT.fullmatch, _AND.split(prompt)) if m.group(2) is not None]
        if weights:
            found.append(f"a trailing weight {', '.join(':' + w for w in weights)} (A1111 scales that "
                         "prompt's guidance by it)")
        texts = [t for t, _ in parts]
    for text in texts:
        for n in _walk(_parse(text) or []):
            kind = "prompt editing" if isinstance(n, _Edit) else "alternation"
            found.append(f"{kind} {n.source!r}")
    return found


@lru_cache(maxsize=4096)
def warn_unsupported(prompt: str, negative: bool = False) -> None:
    """One warning per distinct prompt holding syntax tunelab renders as literal text."""
    found = unsupported_syntax(prompt, negative)
    if found:
        which = "negative prompt" if negative else "prompt"
        log.warning("%s %r uses A1111 syntax that changes the conditioning during sampling: %s. tunelab "
                    "encodes one conditioning per image, so it renders this as literal text (brackets still "
                    "weigh as emphasis); write the text you want at every step instead", which, prompt,
                    "; ".join(found))
