"""`tunelab merge preset`: the field's merge methods as recipes for sd-mecha (never re-implemented).

Each preset builds a recipe (`recipe.Line`s), merges it with sd-mecha, and writes the `.mecha`
beside its output. With `base` B and models M1..Mn, deltas are Di = Mi - B:

    weighted_sum      (1 - alpha) A + alpha B                         sd-mecha weighted_sum
    add_difference    A + alpha (B - C); alpha > 1 amplifies          subtract, add_difference
    ties              B + alpha TIES(D1..Dn; top k by magnitude per
                      tensor, signs elected by count, disjoint mean)  ties_sum(vote_sgn=false)
    dare              B + alpha DARE(D1..Dn; drop with probability p,
                      keep / (1 - p) when rescaling)                  dropout(rescale=1|0)
    della             B + alpha DELLA(D1..Dn; drop probability p,
                      lower for larger |d| by up to eps, TIES merge)   ties_sum_with_dropout(della_eps)
    geometric_median  the Weiszfeld geometric median of M1..Mn        geometric_median
    model_stock       B + model stock(D1..Dn)                         model_stock
    dgmla             B + alpha (DARE -> TIES -> geometric median +
                      model stock of D1..Dn)                          ties_sum_with_dropout(apply_median,
                                                                      apply_stock)

`alpha` is one number or a per-part ratio: `unet=0.5,te1=0.2,te2=0.2,vae=0` and UNet blocks
(`IN04=0.3`, `OUT00=0.8`, any spelling `tunelab.models.vocab.parse_block` reads), with
`default=`; a block wins over its component, a component over the default. `vae` bakes a VAE
file in (its keys replace the merge's). Merging accumulates in fp64 by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.merge.recipe import Line, Recipe, Ref

METHODS = ("weighted_sum", "add_difference", "ties", "dare", "della", "geometric_median", "model_stock", "dgmla")
_NEEDS_BASE = {"ties", "dare", "della", "model_stock", "dgmla"}


@dataclass
class Ratio:
    """`alpha` for every key: a default, per component, per UNet block."""

    default: float = 1.0
    components: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, float] = field(default_factory=dict)

    @property
    def scalar(self) -> float | None:
        return None if self.components or self.blocks else self.default

    def of(self, key: str) -> float:
        from tunelab.models.blocks import component_of, unet_block_of

        block = unet_block_of(key) if key.startswith("model.diffusion_model.") else None
        if block is not None and block in self.blocks:
            return self.blocks[block]
        return self.components.get(component_of(key), self.default)

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in {**self.components, **self.blocks}.items()]
        return ",".join(parts + [f"default={self.default:g}"]) if parts else f"{self.default:g}"


def parse_ratio(text: str | float, default: float = 1.0, what: str = "--alpha") -> Ratio:
    """`0.5`, or `unet=0.5,te1=0.2,IN04=0.3,default=1`."""
    from tunelab.models.vocab import COMPONENTS, parse_block, parse_component

    if isinstance(text, (int, float)):
        return Ratio(float(text))
    text = str(text).strip()
    try:
        return Ratio(float(text))
    except ValueError:
        pass
    ratio = Ratio(default)
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq:
            raise TunelabError(f"{what} {item!r}: give NAME=VALUE (a component te1/te2/unet/vae, a UNet block such "
                               "as IN04, or default)")
        try:
            v = float(value)
        except ValueError:
            raise TunelabError(f"{what} {item!r}: {value!r} is not a number") from None
        name = name.strip()
        if name.lower() == "default":
            ratio.default = v
            continue
        try:
            comp = parse_component(name)
            if comp in COMPONENTS:
                ratio.components[comp] = v
                continue
        except TunelabError:
            pass
        ratio.blocks[parse_block(name, "unet")] = v
    return ratio


def _model(path: str | Path) -> Line:
    return Line("model", [str(path)], {"model_config": "sdxl-sgm", "merge_space": "weight"})


def _keys(path: str | Path) -> list[str]:
    from tunelab.models.safetensors_io import read_header

    return list(read_header(Path(path)).tensors)


def build(method: str, models: list[str | Path], base: str | Path | None = None, alpha: Ratio | None = None,
          k: float = 0.2, p: float = 0.9, rescale: bool = True, eps: float = 0.1, seed: int = 0,
          vae: str | Path | None = None) -> Recipe:
    """The recipe of one preset (nothing is merged)."""
    if method not in METHODS:
        raise TunelabError(f"unknown merge preset {method!r}; choose one of {', '.join(METHODS)}")
    for path in [*models, *([base] if base else []), *([vae] if vae else [])]:
        if not Path(path).is_file():
            raise TunelabError(f"{path}: no such checkpoint")
    if method in _NEEDS_BASE and base is None:
        raise TunelabError(f"{method} merges the differences of the models from a base: give --base")
    need = {"weighted_sum": 2, "add_difference": 3}.get(method)
    if need and len(models) != need:
        raise TunelabError(f"{method} takes {need} models (in order: {'A B' if need == 2 else 'A B C'}); got {len(models)}")
    if method not in ("weighted_sum", "add_difference") and len(models) < (1 if method == "dare" else 2):
        raise TunelabError(f"{method} merges two or more models; got {len(models)}")
    if not 0.0 <= p < 1.0:
        raise TunelabError(f"--p {p}: the drop probability is in [0, 1)")
    alpha = alpha or Ratio(0.5 if method == "weighted_sum" else 1.0)
    r = Recipe([], f"preset {method}")
    add = r.lines.append

    def ref(line: Line) -> Ref:
        add(line)
        return Ref(len(r.lines) - 1)

    def alpha_ref() -> Any:
        if alpha.scalar is not None:
            return alpha.scalar
        first = base or models[0]
        return ref(Line("literal_keys", [{key: alpha.of(key) for key in _keys(first)}], {"model_config": "sdxl-sgm"}))

    refs = [ref(_model(m)) for m in models]
    b = ref(_model(base)) if base else None
    if method == "weighted_sum":
        out = ref(Line("merge", ["weighted_sum", refs[0], refs[1]], {"alpha": alpha_ref()}))
    elif method == "add_difference":
        delta = ref(Line("merge", ["subtract", refs[1], refs[2]]))
        out = ref(Line("merge", ["add_difference", refs[0], delta], {"alpha": alpha_ref()}))
    elif method == "geometric_median":
        out = ref(Line("merge", ["geometric_median", *refs], {}))
    else:
        deltas = [ref(Line("merge", ["subtract", m, b])) for m in refs]
        if method == "ties":
            summed = ref(Line("merge", ["ties_sum", *deltas], {"k": k, "vote_sgn": False}))
        elif method == "dare":
            summed = ref(Line("merge", ["dropout", *deltas], {"probability": p, "rescale": 1.0 if rescale else 0.0,
                                                              "seed": seed}))
        elif method == "della":
            summed = ref(Line("merge", ["ties_sum_with_dropout", *deltas],
                              {"probability": p, "della_eps": eps, "rescale": rescale, "k": k, "vote_sgn": False,
                               "seed": seed}))
        elif method == "model_stock":
            summed = ref(Line("merge", ["model_stock", *deltas], {}))
        else:  # dgmla: DARE, then TIES sign election, geometric median and model stock of what is left
            summed = ref(Line("merge", ["ties_sum_with_dropout", *deltas],
                              {"probability": p, "della_eps": eps, "rescale": rescale, "k": k, "vote_sgn": False,
                               "apply_stock": True, "apply_median": True, "seed": seed}))
        out = ref(Line("merge", ["add_difference", b, summed], {"alpha": alpha_ref()}))
    if vae is not None:  # the VAE file's keys, the merge's for everything else
        ref(Line("merge", ["fallback", ref(_model(vae)), out], {}))
    return r
