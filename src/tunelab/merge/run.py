"""`tunelab merge run`: a recipe (any era) merged by sd-mecha into one `.safetensors` file.

sd-mecha does the merging (tunelab never re-implements its methods); tunelab reads the recipe
(`recipe.py`: upgrade, model paths, methods checked first), merges key by key with a progress bar
in fp64 by default, writes the output through a temporary file renamed into place, with the
recipe that made it in its metadata (`mecha_recipe`, sd-mecha's own key) and a `.mecha` beside it.
The header also gets the modelspec keys, `modelspec.merged_from` (the models' titles) and the
modelspec hash (models/checkpoint.py, `stamp_merge`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import faults
from tunelab.errors import TunelabError
from tunelab.merge.recipe import Recipe, check_methods, parse, resolve_models, to_sd_mecha, upgrade

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass
class Merged:
    path: Path
    recipe: Recipe
    text: str  # the current-format recipe sd-mecha ran
    mecha: Path  # the .mecha written beside the output


def _keys(path: str) -> list[str]:
    from tunelab.models.safetensors_io import read_header

    return list(read_header(Path(path)).tensors)


def prepare(text: str, source: str, models_dir: Path | None = None, maps: list[tuple[str, str]] | None = None) -> Recipe:
    """Read, locate the models, upgrade and check a recipe (nothing is merged)."""
    recipe, version = parse(text, source)
    resolve_models(recipe, models_dir, maps or [])
    recipe = upgrade(recipe, version, _keys)
    check_methods(recipe)
    return recipe


def dtype_of(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise TunelabError(f"{what} {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def merge_recipe(recipe: Recipe, out: Path, dtype: str = "fp16", merge_dtype: str = "fp64",
                 progress: bool = True) -> Merged:
    import sd_mecha
    from tqdm import tqdm

    from tunelab.models.checkpoint import stamp_merge

    check_model_files(recipe)
    origins: list = []
    text = to_sd_mecha(recipe, origins)
    try:
        node = sd_mecha.deserialize(text.rstrip("\n"))  # sd-mecha reads every line, an empty last one too
    except Exception as err:  # noqa: BLE001 - sd-mecha's own message, with the recipe line named
        line = _failing_line(text, origins)
        where = recipe.where(line) if line is not None else recipe.source
        raise TunelabError(f"{where}: sd-mecha cannot read the recipe: {err}") from None
    out = Path(out)
    if out.suffix != ".safetensors":
        raise TunelabError(f"--out {out}: the merge is written as one .safetensors file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.safetensors")
    try:
        sd_mecha.merge(node, output=tmp, output_dtype=dtype_of(dtype, "--dtype"),
                       merge_dtype=dtype_of(merge_dtype, "--merge-dtype"), strict_mandatory_keys=False,
                       tqdm=_with_fault_point(tqdm if progress else _Silent))
        # the model header (modelspec, merged_from, the hash) goes on as the data is copied into place
        stamp_merge(tmp, out, [str(line.args[0]) for line in recipe.models], dtype)
    except TunelabError:
        raise
    except Exception as err:  # noqa: BLE001
        raise TunelabError(f"{recipe.source}: the merge failed: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    mecha = out.with_suffix(".mecha")
    mecha.write_text(text, encoding="utf-8")  # what sd-mecha ran: opens in sd-mecha as it is
    return Merged(out, recipe, text, mecha)


def _failing_line(text: str, origins: list):
    """The recipe line whose sd-mecha text first fails to deserialize (recipes are short: one
    parse per line, only after a failure)."""
    import sd_mecha

    lines = text.rstrip("\n").split("\n")
    for k in range(2, len(lines) + 1):
        try:
            sd_mecha.deserialize("\n".join(lines[:k]))
        except Exception:  # noqa: BLE001 - the first prefix sd-mecha refuses ends at the bad line
            return origins[k - 1] if k - 1 < len(origins) else None
    return None


def check_model_files(recipe: Recipe) -> None:
    """Validate every model file's header before sd-mecha opens it: sd-mecha's reader takes
    truncated files, gaps and trailing bytes, and fails on others mid-merge with messages that do
    not name the file. Pickles are refused (sd-mecha would unpickle them)."""
    from tunelab.models.checkpoint import refuse_pickle
    from tunelab.models.safetensors_io import read_header

    for line in recipe.models:
        path = Path(str(line.args[0]))
        refuse_pickle(path, f"{recipe.where(line)}: model")
        if path.is_file():
            read_header(path)


def read_recipe(path: Path, models_dir: Path | None = None, maps: list[tuple[str, str]] | None = None) -> Recipe:
    """A recipe file, prepared (`prepare`)."""
    if not path.is_file():
        raise TunelabError(f"{path}: no such recipe")
    return prepare(path.read_text(encoding="utf-8"), str(path), models_dir, maps)


def run_file(path: Path, out: Path, models_dir: Path | None = None, maps: list[tuple[str, str]] | None = None,
             dtype: str = "fp16", merge_dtype: str = "fp64", progress: bool = True) -> Merged:
    recipe = read_recipe(path, models_dir, maps)
    for note in recipe.notes:
        log.info("%s", note)
    return merge_recipe(recipe, out, dtype, merge_dtype, progress)


def _with_fault_point(bar: type) -> type:
    """The progress bar class with a fault point at each merged key (faults.py), i.e. while
    sd-mecha is writing the output."""
    class Tracked(bar):
        def update(self, *args, **kwargs):
            faults.point("merge.write")
            return super().update(*args, **kwargs)
    return Tracked


class _Silent:
    """A tqdm stand-in that shows nothing (tests, the demo)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
