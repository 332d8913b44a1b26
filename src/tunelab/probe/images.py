"""Image-level probe numbers: render fixed prompts with fixed seeds, score each image.

A *scorer* is any function `(image: PIL.Image, prompt: str) -> {name: value}`; tunelab ships
none that needs weights. `probe.scorer` names it:

- `toy`: the toy world's concept reader on the toy world's own sets (`toy.evaluate`): the concept
  (`astolfo`) as the learn set and the preserve looks as the preserve set, the same renders and
  numbers `tunelab demo` and `tunelab toy score` print;
- `module:function`: any importable function (a tagger, an aesthetic model, the toy reader as
  `tunelab.toy.evaluate:reader_scorer`). It scores the learn set's prompts and the preserve
  prompts, each with the preserve seeds. Numbers are averaged per set and logged as
  `probe/<set>_score/<name>`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

from tunelab.errors import TunelabError

Scorer = Callable[[Any, str], Mapping[str, float]]
TOY = "toy"


def load_scorer(spec: str) -> Scorer | None:
    """The scorer `probe.scorer` names (None for ''; 'toy' is handled by `image_scores`)."""
    if not spec or spec == TOY:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise TunelabError(f"probe.scorer = {spec!r}: write 'toy' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise TunelabError(f"probe.scorer = {spec!r} cannot be imported ({err}); check the module path "
                           "and that the package is installed") from None
    if not callable(fn):
        raise TunelabError(f"probe.scorer = {spec!r} is not a function")
    return fn


def render_count(spec: str, prompts: Mapping[str, Sequence[str]], seeds: Sequence[int]) -> int:
    """Images one image probe renders."""
    if not spec:
        return 0
    if spec == TOY:
        from tunelab.toy.evaluate import EVAL_SEEDS, SETS

        return len(EVAL_SEEDS) * (len(SETS["concept"]()) + len(SETS["preserve"]()))
    return len(seeds) * sum(len(p) for p in prompts.values())


def image_scores(comps: Any, tokenizers: tuple[Any, Any], spec: str, prompts: Mapping[str, Sequence[str]],
                 seeds: Sequence[int], steps: int, cfg: float) -> dict[str, float]:
    """probe/<set>_score/<name>: the scorer's numbers averaged over each set's renders."""
    if not spec:
        return {}
    if spec == TOY:
        from tunelab.toy.evaluate import evaluate

        scores = evaluate(comps, tokenizers, ("concept", "preserve"))
        out = {}
        for tag, name in (("learn", "concept"), ("preserve", "preserve")):
            s = scores[name]
            out[f"probe/{tag}_score/all"] = s.accuracy
            out[f"probe/{tag}_score/subject"] = s.subject
        return out
    from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate_batch

    scorer = load_scorer(spec)
    model = build_pipeline(comps, tokenizers)
    settings = SampleSettings(steps=steps, cfg=cfg, sampler="Euler", max_chunks=1)
    out: dict[str, float] = {}
    for name, texts in prompts.items():
        pairs = [(p, s) for p in dict.fromkeys(texts) for s in seeds]
        if not pairs:
            continue
        totals: dict[str, list[float]] = {}
        for start in range(0, len(pairs), 8):
            chunk = pairs[start:start + 8]
            for (prompt, _), image in zip(chunk, generate_batch(model, [p for p, _ in chunk], [s for _, s in chunk], settings)):
                for key, value in scorer(image, prompt).items():
                    totals.setdefault(key, []).append(float(value))
        out.update({f"probe/{name}_score/{key}": sum(v) / len(v) for key, v in totals.items()})
    return out
