"""kohya's dataset TOML (`--dataset_config`) -> `tunelab data index` sources and caption settings.

kohya's layout (sd-scripts `library/config_util.py`): `[general]` settings, then `[[datasets]]`,
each with `[[datasets.subsets]]`; a subset's value wins over its dataset's, which wins over
`[general]`. A subset with `metadata_file` is a fine-tuning subset (kohya metadata JSON, images
in `image_dir`), one without is a DreamBooth subset (the images directly in `image_dir`, captions
from `NAME{caption_extension}`, `class_tokens` when an image has none). `num_repeats` becomes the
source's `repeats=` option, so every image counts that many times per epoch, as in kohya.

tunelab's caption settings and buckets are one per run: when subsets disagree, the first subset's
values are used and the notes say which differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

_CAPTION_KEYS = {"shuffle_caption": "data.captions.shuffle_tags", "keep_tokens": "data.captions.keep_tags",
                 "caption_dropout_rate": "data.captions.caption_dropout",
                 "caption_tag_dropout_rate": "data.captions.tag_dropout"}
_BUCKET_KEYS = {"min_bucket_reso": "data.buckets.min_side", "max_bucket_reso": "data.buckets.max_side",
                "bucket_reso_steps": "data.buckets.step", "bucket_no_upscale": "data.buckets.no_upscale"}
_AUGMENT_KEYS = {"flip_aug": "data.flip_aug", "random_crop": "data.random_crop"}
_LATER = ("is_reg", "color_aug", "face_crop_aug_range", "caption_prefix", "caption_suffix",
          "keep_tokens_separator", "secondary_separator", "token_warmup_min", "token_warmup_step",
          "caption_dropout_every_n_epochs", "alpha_mask", "cache_info", "recursive")


@dataclass
class DatasetPlan:
    sources: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # dotted tunelab setting -> value
    notes: list[str] = field(default_factory=list)
    latents: str | None = None  # where kohya's .npz files are (the first image_dir)


def caption_mode(extension: str, metadata: bool) -> dict[str, Any]:
    """How kohya builds the prompt, as tunelab caption settings.

    Metadata subsets: the `caption`, then `, ` and the `tags` (train_util FineTuningDataset);
    folder subsets: the text of NAME{caption_extension} (default `.caption`), which tunelab reads
    as tags from `.txt` and as a caption from `.caption`."""
    if metadata:
        return {"data.captions.mode": "concat", "data.captions.concat_order": "caption_first"}
    ext = extension if extension.startswith(".") else f".{extension}"
    if ext == ".txt":
        return {"data.captions.mode": "tags"}
    if ext == ".caption":
        return {"data.captions.mode": "caption"}
    raise TunelabError(f"caption_extension {extension!r}: tunelab reads captions from NAME.txt (tags) and "
                       "NAME.caption; rename the caption files to one of those")


def read_dataset_config(path: Path) -> DatasetPlan:
    from tunelab.config import read_toml

    doc = read_toml(path, "dataset config (--dataset_config)")
    general = doc.get("general", {}) or {}
    datasets = doc.get("datasets") or []
    if not isinstance(datasets, list) or not datasets:
        raise TunelabError(f"{path}: no [[datasets]] with [[datasets.subsets]] in it (kohya's dataset config layout)")
    plan = DatasetPlan()
    seen: dict[str, set[str]] = {}
    for di, ds in enumerate(datasets):
        subsets = ds.get("subsets") or []
        if not subsets:
            raise TunelabError(f"{path}: datasets[{di}] has no [[datasets.subsets]]")
        for si, sub in enumerate(subsets):
            merged = {**general, **{k: v for k, v in ds.items() if k != "subsets"}, **sub}
            where = f"{path}: datasets[{di}].subsets[{si}]"
            image_dir = merged.get("image_dir")
            meta = merged.get("metadata_file")
            if not image_dir and not meta:
                raise TunelabError(f"{where}: give image_dir (and metadata_file for captions from a JSON)")
            repeats = int(merged.get("num_repeats", 1))
            if repeats < 1:
                raise TunelabError(f"{where}: num_repeats = {repeats}; kohya needs at least 1")
            if meta:  # paths stay as written: kohya reads them from the working directory, and so does tunelab
                source = f"kohya:{meta}" + (f",images={image_dir}" if image_dir else "")
            else:
                source = f"folder:{image_dir}"
                if merged.get("class_tokens"):
                    tokens = str(merged["class_tokens"]).replace('"', "")
                    source += f',class_tokens="{tokens}"' if "," in tokens else f",class_tokens={tokens}"
            plan.sources.append(source + f",repeats={repeats}")
            plan.latents = plan.latents or image_dir
            values = caption_mode(str(merged.get("caption_extension", ".caption")), bool(meta))
            values.update({key: merged[k] for k, key in _CAPTION_KEYS.items() if k in merged})
            if "resolution" in merged:
                values["data.buckets.resolution"] = _side(merged["resolution"], where)
            values.update({key: merged[k] for k, key in _BUCKET_KEYS.items() if k in merged})
            values.update({key: bool(merged.get(k, False)) for k, key in _AUGMENT_KEYS.items()})  # absent: kohya's off
            if "batch_size" in merged:
                values["train.batch_size"] = int(merged["batch_size"])
            for key, value in values.items():
                if key not in plan.settings:
                    plan.settings[key] = value
                elif plan.settings[key] != value:
                    seen.setdefault(key, set()).add(f"datasets[{di}].subsets[{si}]")
            for k in _LATER:
                if merged.get(k):
                    plan.notes.append(f"{where}: {k} = {merged[k]!r} is not supported yet; the run trains without it"
                                      + (" (regularisation images index as an ordinary source)" if k == "is_reg" else ""))
    for key, where in seen.items():
        plan.notes.append(f"{key}: subsets differ ({', '.join(sorted(where))}); tunelab has one value per run and "
                          f"uses the first subset's ({plan.settings[key]!r})")
    for key in _AUGMENT_KEYS.values():  # off is tunelab's default too: the run file need not say it
        if plan.settings.get(key) is False:
            del plan.settings[key]
    return plan


def _side(res: Any, where: str) -> int:
    """kohya's `resolution = 1024` or `[1024, 768]`: the side of a square of the same area."""
    if isinstance(res, (int, float)):
        return int(res)
    if isinstance(res, list) and len(res) == 2:
        return int((res[0] * res[1]) ** 0.5)
    raise TunelabError(f"{where}: resolution = {res!r}; kohya takes a number or [width, height]")
