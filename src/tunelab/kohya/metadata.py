"""What a kohya-trained checkpoint says about its training (`ss_*` metadata, as sd-scripts'
`train_util.get_training_metadata` writes it), in a few lines for `tunelab model inspect`."""

from __future__ import annotations

import json
from typing import Any

_FIELDS = (("ss_steps", "steps"), ("ss_epoch", "epoch"), ("ss_num_epochs", "of epochs"),
           ("ss_learning_rate", "lr"), ("ss_unet_lr", "unet lr"), ("ss_text_encoder_lr", "te lr"),
           ("ss_optimizer", "optimizer"), ("ss_lr_scheduler", "schedule"), ("ss_gradient_accumulation_steps", "accumulation"),
           ("ss_num_train_images", "images"), ("ss_resolution", "resolution"), ("ss_mixed_precision", "precision"),
           ("ss_max_token_length", "max tokens"), ("ss_noise_offset", "noise offset"), ("ss_min_snr_gamma", "min-SNR"),
           ("ss_zero_terminal_snr", "zero-terminal SNR"), ("ss_seed", "seed"))


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def training_summary(meta: dict[str, str]) -> list[str]:
    """Lines about a kohya (or tunelab) training from `ss_*` keys; [] when there are none."""
    if not any(k.startswith("ss_") for k in meta):
        return []
    by = "tunelab" if "tunelab.version" in meta else "kohya sd-scripts" + (
        f" {meta['ss_sd_scripts_commit_hash'][:8]}" if meta.get("ss_sd_scripts_commit_hash") else "")
    parts = [f"{label} {meta[k]}" for k, label in _FIELDS if meta.get(k) not in (None, "", "None")]
    lines = [f"trained by {by}: " + ", ".join(parts)]
    if meta.get("ss_sd_model_name"):
        lines.append(f"from base {meta['ss_sd_model_name']}" + (f" ({meta['ss_base_model_version']})"
                                                               if meta.get("ss_base_model_version") else ""))
    dirs = _json(meta.get("ss_dataset_dirs"))
    if isinstance(dirs, dict) and dirs:
        lines.append("data: " + ", ".join(f"{d} ({v.get('img_count', '?')} images x {v.get('n_repeats', 1)})"
                                          if isinstance(v, dict) else str(d) for d, v in list(dirs.items())[:6]))
    freq = _json(meta.get("ss_tag_frequency"))
    if isinstance(freq, dict) and freq:
        total: dict[str, int] = {}
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    total[tag.strip()] = total.get(tag.strip(), 0) + int(n)
        top = sorted(total.items(), key=lambda kv: -kv[1])[:8]
        lines.append(f"tags: {len(total):,} distinct; most frequent " + ", ".join(f"{t} ({n:,})" for t, n in top))
    when = [meta.get(k) for k in ("ss_training_started_at", "ss_training_finished_at")]
    if when[0]:
        from datetime import datetime, timezone

        def fmt(v: str | None) -> str:
            try:
                return datetime.fromtimestamp(float(v), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            except (TypeError, ValueError):
                return str(v)

        lines.append(f"trained {fmt(when[0])}" + (f" to {fmt(when[1])}" if when[1] else ""))
    return lines
