"""sd-mecha recipes (`.mecha` text) as tunelab reads, upgrades and writes them.

The current format (sd-mecha 1.x, `version 0.1.0`) is one instruction per line, each line a node
that later lines refer to as `&N`:

    version 0.1.0
    model "base.safetensors" model_config="sdxl-sgm" merge_space="weight"
    dict key=0.25
    merge "weighted_sum" &0 &1 alpha=0.5

tunelab keeps a recipe as a list of `Line`s (command, positional and keyword arguments, where it
came from) so that it can upgrade older text, rewrite model paths and check merge methods before
handing the text to `sd_mecha.deserialize`. Older recipes, written for sd-mecha 0.0.x in 2024,
have no `version 0.1.0` header and look like

    model "base.safetensors" "sdxl" "base"
    call "add_difference" &0 &1 &2 alpha=0.5
    dict clip_l=0.3 clip_g=0.3 diffuser=0.7

`upgrade` rewrites them: `model PATH ARCH TYPE` -> `model PATH model_config=... merge_space=...`
(`sdxl` -> `sdxl-sgm`, `sd1` -> `sd1-ldm`; `base` -> weight space; LoRA inputs are refused),
`call` -> `merge`, the two-model `add_difference(a, b, c)` form -> `add_difference(a,
subtract(b, c))`, helper names that are not merge methods in sd-mecha 1.x (`add_difference_ties`,
`add_ties_with_dare`) -> the graph of methods they stood for, and a per-component dictionary
(component names of sd-mecha or tunelab: `clip_l`/`te1`, `clip_g`/`te2`, `diffuser`/`unet`, `vae`,
plus `default`) -> one value per key of the recipe's first model (a `literal` in `sdxl-sgm`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Callable

from tunelab.errors import TunelabError

VERSION = "0.1.0"
HEADER = f"version {VERSION}"
_ARCH = {"sdxl": "sdxl-sgm", "sd1": "sd1-ldm", "sdxl-sgm": "sdxl-sgm", "sd1-ldm": "sd1-ldm"}
_COMPONENT = {"clip_l": "te1", "te1": "te1", "txt": "te1", "clip_g": "te2", "te2": "te2", "txt2": "te2",
              "diffuser": "unet", "unet": "unet", "vae": "vae"}


class Ref(int):
    """`&N`: the node of line N."""


@dataclass
class Line:
    command: str  # model | merge | dict | literal
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    origin: int = 0  # the line number in the file it came from (0: made by tunelab)

    def text(self) -> str:
        parts = [self.command] + [_value(a) for a in self.args] + [f"{k}={_value(v)}" for k, v in self.kwargs.items()]
        return " ".join(parts)


@dataclass
class Recipe:
    lines: list[Line]
    source: str = "recipe"
    notes: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[Line]:
        return [line for line in self.lines if line.command == "model"]

    def where(self, line: Line) -> str:
        return f"{self.source}:{line.origin}" if line.origin else self.source


def _value(v: Any) -> str:
    if isinstance(v, Ref):
        return f"&{int(v)}"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


# --- reading ------------------------------------------------------------------------------------------


def tokenize(line: str, where: str) -> list[str]:
    """sd-mecha's tokens: words split on spaces, double-quoted strings with `\\"` and `\\\\` escapes."""
    tokens, cur, quoted = [], [], False
    i = 0
    while i < len(line):
        ch = line[i]
        i += 1
        if ch == "\\" and quoted and i < len(line) and line[i] in '"\\':  # sd-mecha's escapes; a lone
            cur.append(line[i])  # backslash (a hand-written Windows path) stays as it is
            i += 1
        elif ch == '"':
            quoted = not quoted
            cur.append('"')
        elif ch in " \t" and not quoted:
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if quoted:
        raise TunelabError(f"{where}: unterminated quote: {line.strip()}")
    if cur:
        tokens.append("".join(cur))
    return tokens


def _parse_value(token: str, where: str) -> Any:
    if token.startswith("&"):
        try:
            return Ref(int(token[1:]))
        except ValueError:
            raise TunelabError(f"{where}: {token!r} is not a reference (&N)") from None
    if token.startswith('"') and token.endswith('"') and len(token) >= 2:
        return token[1:-1]
    if token in ("null", "none", "None"):
        return None
    if token in ("true", "True"):
        return True
    if token in ("false", "False"):
        return False
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        raise TunelabError(f"{where}: cannot read the value {token!r}") from None


def parse(text: str, source: str = "recipe") -> tuple[Recipe, str | None]:
    """The recipe's lines and its version header (None: none, an older recipe)."""
    raw = text.replace("\r\n", "\n").split("\n")
    version = None
    lines: list[Line] = []
    for no, line in enumerate(raw, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("version") and not lines and version is None:
            version = s.split(None, 1)[1].strip() if " " in s else ""
            continue
        where = f"{source}:{no}"
        command, *tokens = tokenize(s, where)
        args, kwargs = [], {}
        for tok in tokens:
            name, eq, value = tok.partition("=")
            if eq and not tok.startswith('"') and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
                kwargs[name] = _parse_value(value, where)
            else:
                args.append(_parse_value(tok, where))
        for v in (*args, *kwargs.values()):
            if isinstance(v, Ref) and not 0 <= v < len(lines):
                raise TunelabError(f"{where}: &{int(v)} refers to a line that does not come before it")
        lines.append(Line(command, args, kwargs, no))
    if not lines:
        raise TunelabError(f"{source}: an empty recipe")
    return Recipe(lines, source), version


# --- upgrading older recipes ----------------------------------------------------------------------------


def upgrade(recipe: Recipe, version: str | None, model_keys: Callable[[str], list[str]] | None = None) -> Recipe:
    """A recipe in the current format (see the module docstring); notes say what changed."""
    if version == VERSION:
        return recipe
    out = Recipe([], recipe.source, [f"upgraded from {'no version header' if version is None else 'version ' + version} "
                                     f"to version {VERSION}"])
    remap: dict[int, int] = {}

    def ref(v: Any) -> Any:
        return Ref(remap[int(v)]) if isinstance(v, Ref) else v

    def emit(line: Line) -> int:
        out.lines.append(line)
        return len(out.lines) - 1

    for i, line in enumerate(recipe.lines):
        where = recipe.where(line)
        args, kwargs = [ref(a) for a in line.args], {k: ref(v) for k, v in line.kwargs.items()}
        if line.command == "model":
            remap[i] = emit(_upgrade_model(line, args, kwargs, where))
        elif line.command in ("call", "merge"):
            remap[i] = _upgrade_merge(str(args[0]) if args else "", args[1:], kwargs, line.origin, emit, where, out)
        elif line.command == "dict":
            remap[i] = emit(_upgrade_dict(line, kwargs, out, model_keys, where))
        elif line.command == "literal":
            remap[i] = emit(Line("literal", args, kwargs, line.origin))
        else:
            raise TunelabError(f"{where}: unknown instruction {line.command!r} (a recipe has model, merge/call, dict "
                               "and literal lines)")
    return out


def _upgrade_model(line: Line, args: list[Any], kwargs: dict[str, Any], where: str) -> Line:
    if not args:
        raise TunelabError(f"{where}: a model line names a file")
    path, rest = args[0], args[1:]
    if "model_config" in kwargs or not rest:
        return Line("model", [path], kwargs, line.origin)
    arch = str(rest[0]).lower()
    kind = str(rest[1]).lower() if len(rest) > 1 else "base"
    if kind in ("lora", "lycoris"):
        raise TunelabError(f"{where}: a {kind} input ({path}); tunelab merges full checkpoints — bake the LoRA into a "
                           "checkpoint first")
    if arch not in _ARCH:
        raise TunelabError(f"{where}: unknown architecture {rest[0]!r} (known: sdxl, sd1)")
    return Line("model", [path], {"model_config": _ARCH[arch], "merge_space": "weight"}, line.origin)


def _upgrade_merge(method: str, args: list[Any], kwargs: dict[str, Any], origin: int,
                   emit: Callable[[Line], int], where: str, out: Recipe) -> int:
    if method == "add_difference" and len(args) == 3:  # old form: a + alpha * (b - c)
        delta = emit(Line("merge", ["subtract", args[1], args[2]], {}, origin))
        out.notes.append(f"{where}: add_difference(a, b, c) -> add_difference(a, subtract(b, c))")
        return emit(Line("merge", ["add_difference", args[0], Ref(delta)], kwargs, origin))
    if method in ("add_difference_ties", "add_ties_with_dare"):  # helpers of sd-mecha, not merge methods
        base, *models = args
        deltas = [Ref(emit(Line("merge", ["subtract", m, base], {}, origin))) for m in models]
        alpha = kwargs.pop("alpha", 1.0)
        if method == "add_difference_ties":
            summed = emit(Line("merge", ["ties_sum", *deltas], {k: v for k, v in kwargs.items() if k in ("k", "vote_sgn")},
                               origin))
        else:
            opts = {k: v for k, v in kwargs.items() if k in ("probability", "della_eps", "rescale", "k", "vote_sgn", "seed")}
            summed = emit(Line("merge", ["ties_sum_with_dropout", *deltas], opts, origin))
        out.notes.append(f"{where}: {method} -> subtract, {out.lines[summed].args[0]}, add_difference")
        return emit(Line("merge", ["add_difference", base, Ref(summed)], {"alpha": alpha}, origin))
    return emit(Line("merge", [method, *args], kwargs, origin))


def _upgrade_dict(line: Line, kwargs: dict[str, Any], out: Recipe, model_keys: Callable[[str], list[str]] | None,
                  where: str) -> Line:
    names = set(kwargs) - {"default"}
    if not names or not names <= set(_COMPONENT):
        return Line("dict", [], kwargs, line.origin)  # a plain dictionary (block names, options): as it is
    if model_keys is None or not out.models:
        raise TunelabError(f"{where}: a per-component dictionary needs a model line before it (its keys)")
    from tunelab.models.blocks import component_of

    per = {_COMPONENT[k]: v for k, v in kwargs.items() if k != "default"}
    default = kwargs.get("default", 0.0)
    values = {key: per.get(component_of(key), default) for key in model_keys(str(out.models[0].args[0]))}
    out.notes.append(f"{where}: per-component dictionary {', '.join(f'{k}={v}' for k, v in kwargs.items())} -> a "
                     f"value for each of {len(values)} keys")
    return Line("literal_keys", [values], {"model_config": "sdxl-sgm"}, line.origin)


# --- model paths ---------------------------------------------------------------------------------------------


def parse_maps(items: list[str]) -> list[tuple[str, str]]:
    maps = []
    for item in items:
        old, eq, new = item.partition("=")
        if not eq or not old:
            raise TunelabError(f"--map {item!r}: give OLD=NEW (a path prefix as the recipe has it, and where it is now)")
        maps.append((old, new))
    return maps


def _norm(p: str) -> str:
    return p.replace("\\", "/").rstrip("/")


def resolve_models(recipe: Recipe, models_dir: Path | None, maps: list[tuple[str, str]]) -> Recipe:
    """Model paths as they are here: `--map` prefixes replaced (Windows back-slashes read as
    separators), relative paths under `--models-dir`, `.safetensors` added when the name has none;
    a file that cannot be found is an error naming the recipe line."""
    for line in recipe.models:
        if not line.args or not isinstance(line.args[0], str):
            raise TunelabError(f"{recipe.where(line)}: a model line names the model file in quotes: model \"path.safetensors\"")
        written = str(line.args[0])
        path = _norm(written)
        for old, new in maps:
            o = _norm(old)
            if path == o or path.startswith(o + "/") or path.lower().startswith(o.lower() + "/") and _is_windows(o):
                path = _norm(new) + path[len(o):]
                break
        candidates = [path]
        if not path.endswith(".safetensors"):
            candidates.append(path + ".safetensors")
        found = None
        for c in candidates:
            p = Path(c)
            for option in ([p] if p.is_absolute() or models_dir is None else [models_dir / p, p]):
                if option.is_file():
                    found = option
                    break
            if found:
                break
        if found is None:
            hint = (" (a Windows path: map its folder with --map 'C:\\models=/models')" if _is_windows(written)
                    else " (give --models-dir or --map OLD=NEW)")
            raise TunelabError(f"{recipe.where(line)}: model {written!r} not found{hint}")
        line.args[0] = str(found)
    return recipe


def _is_windows(p: str) -> bool:
    return bool(PureWindowsPath(p).drive) or "\\" in p


def mecha_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("sd-mecha")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def check_methods(recipe: Recipe) -> None:
    """Every merge method exists in the installed sd-mecha; else a one-line error with the line."""
    from sd_mecha.extensions import merge_methods

    for line in recipe.lines:
        if line.command != "merge":
            continue
        if not line.args or not isinstance(line.args[0], str):
            raise TunelabError(f"{recipe.where(line)}: a merge line names its method in quotes first: "
                               f"merge \"weighted_sum\" &0 &1 alpha=0.5")
        name = str(line.args[0])
        try:
            merge_methods.resolve(name)
        except (ValueError, KeyError) as err:
            near = re.search(r"Nearest match is '([^']+)'", str(err))
            raise TunelabError(f"{recipe.where(line)}: merge method {name!r} is not in sd-mecha {mecha_version()} (a method "
                               f"from a fork?){f'; the nearest is {near[1]!r}' if near else ''}: {line.text()}") from None


def to_sd_mecha(recipe: Recipe, origins: list[Line | None] | None = None) -> str:
    """The text sd-mecha deserializes: per-key literals written as a `dict` + `literal` pair.
    `origins`, when given, receives the recipe line each output line came from (None: the header),
    so an error sd-mecha finds can name the user's line."""
    out: list[str] = [HEADER]
    remap: dict[int, int] = {}
    if origins is not None:
        origins.append(None)

    def fix(v: Any) -> Any:
        return Ref(remap[int(v)]) if isinstance(v, Ref) else v

    for i, line in enumerate(recipe.lines):
        if line.command == "literal_keys":
            values = line.args[0]
            out.append("dict " + " ".join(f"{k}={_value(v)}" for k, v in values.items()))  # keys unquoted: sd-mecha's syntax
            out.append(Line("literal", [Ref(len(out) - 2)], line.kwargs).text())
        else:
            out.append(Line(line.command, [fix(a) for a in line.args], {k: fix(v) for k, v in line.kwargs.items()}).text())
        remap[i] = len(out) - 2
        if origins is not None:
            origins.extend([line] * (len(out) - len(origins)))
    return "\n".join(out) + "\n"
