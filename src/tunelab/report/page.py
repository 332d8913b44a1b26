"""The report page: sections of HTML from `RunData`, one self-contained file.

Every string that comes from a run (captions, tags, file names, prompts, config values) is
untrusted: it goes through `esc` into markup and through `script_json` into the one embedded
JSON block, which escapes `<`, `>`, `&` and the two JavaScript line separators, so no caption can
close the block or open a tag. The page's own script only reads that block and writes text nodes.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.report.charts import PALETTE, Chart, Curve, bars, svg
from tunelab.report.collect import GridCell, RunData
from tunelab.report.thumbs import thumbnail

MAX_GRID_STEPS = 10  # checkpoint columns per prompt in the grid timeline (first and last always)
MAX_PROBE_ROWS = 16
_BAND_DASH = {"low": "1 3", "mid": "5 3", "high": "9 3"}


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


def script_json(obj: Any) -> str:
    """JSON that is safe inside `<script type="application/json">` (and valid JSON still)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
    for a, b in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


class Page:
    """Builds the HTML of one report; `links_from` is the folder the report is written to."""

    def __init__(self, runs: list[RunData], links_from: Path, title: str = "") -> None:
        self.runs = runs
        self.base = links_from
        self.title = title or ("tunelab report: " + ", ".join(r.name for r in runs))
        self.data: dict[str, Any] = {"runs": []}

    def link(self, path: Path) -> str:
        try:
            return os.path.relpath(path, self.base).replace(os.sep, "/")
        except ValueError:  # another drive (Windows)
            return path.resolve().as_uri()

    # --- the page --------------------------------------------------------------------------------

    def render(self, generated: str) -> str:
        body = []
        if len(self.runs) > 1:
            body.append(self.comparison())
        for i, run in enumerate(self.runs):
            body.append(self.run_section(run, i))
        nav = "".join(f'<a href="#run{i}">{esc(r.name)}</a>' for i, r in enumerate(self.runs))
        if len(self.runs) > 1:
            nav = '<a href="#compare">comparison</a>' + nav
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(self.title)}</title>"
                f'<meta name=viewport content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
                f'<body><header><h1>{esc(self.title)}</h1><div class="meta">written {esc(generated)} by tunelab '
                f"&middot; {len(self.runs)} run(s)</div><nav>{nav}</nav></header><main>{''.join(body)}</main>"
                f'<script type="application/json" id="tunelab-data">{script_json(_finite(self.data))}</script>'
                f"<script>{SCRIPT}</script></body></html>")

    def run_section(self, run: RunData, i: int) -> str:
        parts = [self.summary(run), self.loss(run), self.probes(run), self.grid_timeline(run), self.drift(run),
                 self.merges(run), self.dataset(run, i), self.config(run)]
        self.data["runs"].append(self.run_json(run))
        inner = "".join(parts)
        if len(self.runs) > 1:
            return (f'<section id="run{i}" class="run"><details><summary><h2>{esc(run.name)}</h2>'
                    f'<span class="path">{esc(run.run.path)}</span></summary>{inner}</details></section>')
        return (f'<section id="run{i}" class="run"><h2>{esc(run.name)}</h2>'
                f'<div class="path">{esc(run.run.path)}</div>{inner}</section>')

    def run_json(self, run: RunData) -> dict[str, Any]:
        loss = run.metrics.get("loss")
        return {"name": run.name, "path": str(run.run.path), "step": run.step,
                "checkpoints": [c.path.name for c in run.checkpoints],
                "config": run.config, "banner": run.banner,
                "loss_last": float(loss[1][-1]) if loss is not None and len(loss[1]) else None,
                "probes": _probe_summary(run.probes),
                "data_rows": [{k: r.get(k) for k in ("key", "tags", "caption", "split", "width", "height")}
                              for r in run.data_rows]}

    # --- sections --------------------------------------------------------------------------------

    def summary(self, run: RunData) -> str:
        total = _total_steps(run)
        st = run.state
        figures = [("steps", f"{run.step:,}" + (f" of {total:,}" if total else "")),
                   ("finished", "yes" if any(c.is_last for c in run.checkpoints) else "not yet"),
                   ("checkpoints", ", ".join(c.path.name for c in run.checkpoints) or "none yet")]
        if st is not None:
            figures += [("effective batch", f"{st.effective_batch:,}"), ("samples seen", f"{st.samples_seen:,}"),
                        ("epoch", str(st.epoch)), ("processes", str(st.world_size)),
                        ("non-finite steps skipped", str(st.skipped_nonfinite))]
        elif "effective_batch" in run.metrics:
            figures.append(("effective batch", f"{int(run.metrics['effective_batch'][1][-1]):,}"))
        if "img_per_s" in run.metrics:
            figures.append(("images / s (median)", f"{float(np.median(run.metrics['img_per_s'][1])):.3g}"))
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in figures)
        banner = (f'<h4>derived numbers (printed by the trainer at its last start)</h4><pre>{esc(chr(10).join(run.banner))}</pre>'
                  if run.banner else "")
        return f'<div class="card"><h3>the run</h3><table class="kv">{rows}</table>{banner}</div>'

    def loss(self, run: RunData) -> str:
        from tunelab.analyze.loss import effective_window, fit_trend, rolling_mean

        if "loss" not in run.metrics:
            return '<div class="card"><h3>loss</h3><p class="na">no loss logged yet</p></div>'
        steps, values = run.metrics["loss"]
        window = effective_window(len(steps), 2048)
        smooth = rolling_mean(values, window)
        trend = fit_trend(steps, values, warmup=0.1)
        curves = [Curve("loss per step", steps, values, "#9ec5e8", width=1.0),
                  Curve(f"rolling mean ({window} steps)", steps, smooth, PALETTE[0], width=2.0)]
        if trend.verdict != "too short":
            xs = np.array([trend.first_step, trend.last_step], dtype=np.float64)
            curves.append(Curve("trend (Theil-Sen)", xs, trend.fitted(xs), "#333333", dash="6 4"))
        nonfinite = int((~np.isfinite(values)).sum())
        verdict = (f'<p class="verdict v-{esc(trend.verdict.replace(" ", "-"))}">trend after the first 10 % of steps: '
                   f"<b>{esc(trend.verdict)}</b> &mdash; {esc(trend.describe())}</p>")
        extra = []
        for tag, label, axis in (("grad_norm", "gradient norm", "norm"), ("lr/unet", "learning rate (UNet)", "LR")):
            if tag in run.metrics:
                s, v = run.metrics[tag]
                extra.append(svg(Chart(label, "step", axis, [Curve(label, s, v, PALETTE[2])], width=300, height=200)))
        note = f"{len(steps):,} steps; non-finite losses: {nonfinite}" + (
            "; drawn as min/max per bin (spikes kept)" if len(steps) > 600 else "")
        main = svg(Chart("training loss", "step", "loss", curves, note=note))
        return f'<div class="card"><h3>loss</h3>{verdict}<div class="row">{main}{"".join(extra)}</div></div>'

    def probes(self, run: RunData) -> str:
        from tunelab.probe.plots import series

        rows = run.probes
        if not rows:
            return ('<div class="card"><h3>learned / forgot (probes)</h3><p class="na">no probes: set '
                    '<code>[probe] enabled = true</code> in the run file, or run <code>tunelab probe RUN</code></p></div>')
        charts = []
        for metric, title, ylabel in (("loss", "loss at fixed noise and timesteps (lower: learned)", "loss"),
                                      ("drift", "prediction drift from the base (higher: moved)", "MSE vs base")):
            curves = []
            for k, name in enumerate(("learn", "preserve")):
                x, y = series(rows, name, metric)
                if x:
                    curves.append(Curve(f"{name}", np.array(x), np.array(y), PALETTE[k], width=2.2, markers=True))
                for band, dash in _BAND_DASH.items():
                    x, y = series(rows, name, metric, band)
                    if x:
                        curves.append(Curve(f"{name} {band} noise", np.array(x), np.array(y), PALETTE[k], dash=dash,
                                            width=1.0, opacity=0.7))
            charts.append(svg(Chart(title, "step", ylabel, curves)))
        scores = sorted({r["metric"] for r in rows if r["metric"].startswith("score/")})
        if scores:
            curves = []
            for k, (name, metric) in enumerate((n, m) for m in scores for n in ("learn", "preserve")):
                x, y = series(rows, name, metric)
                if x:
                    curves.append(Curve(f"{name} {metric[6:]}", np.array(x), np.array(y), PALETTE[k % len(PALETTE)],
                                        markers=True))
            charts.append(svg(Chart("image scores", "step", "score", curves)))
        table = _probe_table(rows)
        return (f'<div class="card"><h3>learned / forgot (probes)</h3><p>learn = held-out images of what the finetune '
                f"is taught; preserve = what the base drew for prompts the data never shows. Same noise, same "
                f'timesteps at every checkpoint (docs/probes.md).</p><div class="row">{"".join(charts)}</div>{table}</div>')

    def grid_timeline(self, run: RunData) -> str:
        if not run.grids:
            return ('<div class="card"><h3>grids over training</h3><p class="na">no grids yet (set '
                    "<code>[grid] prompts</code>; they render every <code>grid.every_n_steps</code> and at the end)</p></div>")
        steps = _spread(sorted(run.grids), MAX_GRID_STEPS)
        note = "" if len(steps) == len(run.grids) else f" (showing {len(steps)} of {len(run.grids)} renders)"
        by_prompt: dict[str, dict[tuple[int, int], GridCell]] = {}
        for step in steps:
            for c in run.grids[step]:
                by_prompt.setdefault(c.prompt, {}).setdefault((c.seed, step), c)
        tables = []
        for prompt, cells in by_prompt.items():
            seeds = sorted({s for s, _ in cells})
            head = "".join(f"<th>step {s:,}</th>" for s in steps)
            body = []
            for seed in seeds:
                tds = []
                for step in steps:
                    c = cells.get((seed, step))
                    tds.append(f"<td>{self.image(c.file, c.prompt)}</td>" if c else "<td></td>")
                body.append(f"<tr><th>seed {seed}</th>{''.join(tds)}</tr>")
            tables.append(f'<div class="prompt">{esc(prompt) or "<i>(empty prompt)</i>"}</div>'
                          f'<div class="scroll"><table class="timeline"><tr><th></th>{head}</tr>{"".join(body)}</table></div>')
        return (f'<div class="card"><h3>grids over training{esc(note)}</h3><p>each prompt across the checkpoints, '
                f"one row per seed; click an image for the full file.</p>{''.join(tables)}</div>")

    def image(self, path: Path, alt: str, size: int = 128) -> str:
        uri = thumbnail(path, size)
        if uri is None:
            return f'<span class="na">unreadable: {esc(path.name)}</span>'
        return f'<a href="{esc(self.link(path))}"><img src="{uri}" alt="{esc(alt)}" title="{esc(alt)}"></a>'

    def drift(self, run: RunData) -> str:
        doc = run.drift
        if doc is None:
            return (f'<div class="card"><h3>weight drift</h3><p class="na">{esc(run.drift_note)}: '
                    f"<code>tunelab report {esc(run.run.path)}</code> computes it (or <code>tunelab drift</code>)</p></div>")
        labels = [str(m) for m in doc["ml"]]
        steps = _model_steps(doc, run)
        rel = doc.get("relative", {}).get("components", {})
        curves = [Curve(comp, steps, np.array([_num(v) for v in m[0]]), PALETTE[k % len(PALETTE)], markers=True)
                  for k, (comp, m) in enumerate(rel.items()) if comp != "all"]
        trajectory = svg(Chart(f"distance from {labels[0]} by component, relative to its norm", "training step",
                               "relative L2", curves, width=640))
        blocks = doc.get("relative", {}).get("blocks", {})
        last = len(labels) - 1
        pairs = {f"{labels[0]} → {labels[j]}": [_num(blocks[b][0][j]) for b in blocks]
                 for j in sorted({max(1, last // 2), last}) if j > 0}
        still = [b for b, v in zip(blocks, next(iter(pairs.values()), [])) if not v]
        block_chart = bars("UNet blocks: distance from the first model, relative to its norm", list(blocks), pairs,
                           "relative L2", note=f"did not move (frozen): {', '.join(still)}" if still else "")
        heat = _heatmap(labels, doc["dm"].get("all") or next(iter(doc["dm"].values())))
        return (f'<div class="card"><h3>weight drift</h3><p>streamed key by key over every checkpoint '
                f"(<code>tunelab drift</code>; definitions in drift.json).</p>"
                f'<div class="row">{trajectory}</div><div class="row">{block_chart}</div>'
                f"<h4>L2 distance between every pair (all weights)</h4>{heat}</div>")

    def merges(self, run: RunData) -> str:
        """`tunelab merge back --run RUN` (each ratio with what it learned and kept) and
        `tunelab merge evolve` (the search against the best uniform ratio)."""
        if not run.merges and not run.searches:
            return ""
        cols = [("probe/learn_loss", "learn loss"), ("probe/preserve_loss", "preserve loss"),
                ("probe/drift_preserve", "preserve drift"), ("weights/distance_from_base", "weight distance")]
        out = []
        for folder, rows in run.merges:
            scores = sorted({k for r in rows for k in r if k.endswith("_score/all")})
            present = [(k, h) for k, h in cols if any(r.get(k) is not None for r in rows)]
            present += [(k, k.removeprefix("probe/").removesuffix("/all")) for k in scores]
            head = "".join(f"<th>{esc(h)}</th>" for _, h in present) + ("<th>grid</th>" if any(r.get("grid") for r in rows) else "")
            body = []
            for r in rows:
                f = folder / str(r.get("file", ""))
                name = (f'<a href="{esc(self.link(f))}">{esc(r.get("file", ""))}</a>' if f.is_file()
                        else esc(r.get("file", "")))
                cells = "".join(f"<td>{_fmt_cell(r.get(k))}</td>" for k, _ in present)
                if any(x.get("grid") for x in rows):
                    g = folder / str(r.get("grid", ""))
                    cells += f"<td>{self.image(g, 'grid', 192) if r.get('grid') and g.is_file() else ''}</td>"
                body.append(f"<tr><th>{float(r.get('ratio', 0)):.3g}</th><td>{name}</td><td>{esc(r.get('parts', ''))}</td>"
                            f"{cells}</tr>")
            chart = folder / "merge-back.png"
            img = self.image(chart, "merge back", 720) if chart.is_file() else ""
            out.append(f"<h4>{esc(self.link(folder))}</h4><table class=\"cmp\"><tr><th>ratio</th><th>file</th>"
                       f"<th>parts</th>{head}</tr>{''.join(body)}</table><div class=\"row\">{img}</div>")
        for folder, doc in run.searches:
            parts = ", ".join(f"{esc(p)} {w:.2f}" for p, w in zip(doc.get("parts", []), (doc.get("best_weights") or [[]])[0]))
            chart = folder / "evolve.png"
            out.append(f"<h4>{esc(self.link(folder))}: merge evolve</h4><table class=\"kv\"><tr><th>best uniform ratio</th>"
                       f"<td>{_fmt_cell(doc.get('uniform_ratio'))}: fitness {_fmt_cell(doc.get('uniform_fitness'))}</td></tr>"
                       f"<tr><th>CMA-ES ({esc(doc.get('evaluations'))} evaluations)</th><td>fitness "
                       f"{_fmt_cell(doc.get('best_fitness'))} (better by {_fmt_cell(doc.get('improvement'))})</td></tr>"
                       f"<tr><th>ratios</th><td>{parts}</td></tr></table>"
                       f"<div class=\"row\">{self.image(chart, 'merge evolve', 900) if chart.is_file() else ''}</div>")
        return (f'<div class="card"><h3>merging</h3><p>merging back: the finetune merged into its base at each ratio '
                f"(0 = base, 1 = finetune), every candidate on the run's probe inputs "
                f"(<code>tunelab merge back --run</code>); merge evolve: per-part ratios searched with the probes "
                f"as the fitness (<code>tunelab merge evolve</code>).</p>{''.join(out)}</div>")

    def dataset(self, run: RunData, i: int) -> str:
        stats = run.data_stats
        if stats is None:
            return f'<div class="card"><h3>dataset</h3><p class="na">{esc(run.data_note)}</p></div>'
        splits = ", ".join(f"{esc(k)} {v:,}" for k, v in stats.get("per_split", {}).items())
        tags = ", ".join(f"{esc(t)} ({n:,})" for t, n in stats.get("top_tags", []))
        thumbs = "".join(self.image(Path(r["path"]), str(r.get("key", "")), 64) for r in run.data_rows
                         if r.get("path") and r.get("offset") is None and Path(str(r["path"])).is_file())
        return (f'<div class="card"><h3>dataset</h3><table class="kv"><tr><th>images</th><td>{stats["rows"]:,} '
                f"({splits})</td></tr><tr><th>top tags</th><td>{tags}</td></tr></table>"
                f'<div class="thumbs">{thumbs}</div><h4>the first rows of the index</h4>'
                f'<table class="rows" data-run="{i}"><thead><tr><th>key</th><th>split</th><th>size</th><th>tags</th>'
                f'<th>caption</th></tr></thead><tbody></tbody></table><noscript>(the table needs JavaScript; the same '
                f"rows are in the page's JSON block)</noscript></div>")

    def config(self, run: RunData) -> str:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_value(v))}</td></tr>" for k, v in flatten(run.config).items())
        return (f'<div class="card"><details><summary><h3>resolved run file ({len(flatten(run.config))} settings)</h3>'
                f'</summary><input class="filter" placeholder="filter settings" aria-label="filter settings">'
                f'<table class="kv config">{rows}</table></details></div>')

    # --- several runs ----------------------------------------------------------------------------

    def comparison(self) -> str:
        flat = [flatten(r.config) for r in self.runs]
        keys = sorted(set().union(*flat) - {"run.output_dir", "run.name"})
        differ = [k for k in keys if len({_value(f.get(k, "—")) for f in flat}) > 1]
        head = "".join(f"<th>{esc(r.name)}</th>" for r in self.runs)
        rows = "".join(f"<tr><th>{esc(k)}</th>" + "".join(f'<td class="diff">{esc(_value(f.get(k, "—")))}</td>'
                                                         for f in flat) + "</tr>" for k in differ)
        same = len(keys) - len(differ)
        figures = []
        for label, fn in (("steps", lambda r: f"{r.step:,}"),
                          ("samples seen", lambda r: f"{r.state.samples_seen:,}" if r.state else "—"),
                          ("last loss (rolling)", _last_smoothed),
                          *[(f"{s} {m} (last probe)", _probe_last(s, m)) for s in ("learn", "preserve")
                            for m in ("loss", "drift")]):
            figures.append(f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{esc(fn(r))}</td>" for r in self.runs) + "</tr>")
        charts = [self._overlay("training loss (rolling mean)", "loss", lambda r: _smoothed_loss(r))]
        for s, m in (("learn", "loss"), ("preserve", "drift"), ("preserve", "loss")):
            charts.append(self._overlay(f"{s} {m} (probes)", m, _probe_series(s, m), markers=True))
        return (f'<section id="compare" class="run"><h2>comparison</h2><div class="card"><h3>settings that differ '
                f"({len(differ)}; {same} are the same)</h3><table class=\"cmp\"><tr><th></th>{head}</tr>{rows}</table>"
                f'</div><div class="card"><h3>numbers</h3><table class="cmp"><tr><th></th>{head}</tr>{"".join(figures)}'
                f'</table><div class="row">{"".join(charts)}</div></div>{self._final_grids()}</section>')

    def _overlay(self, title: str, ylabel: str, get, markers: bool = False) -> str:  # noqa: ANN001
        curves = []
        for k, r in enumerate(self.runs):
            xy = get(r)
            if xy is not None and len(xy[0]):
                curves.append(Curve(r.name, np.asarray(xy[0]), np.asarray(xy[1]), PALETTE[k % len(PALETTE)],
                                    width=1.8, markers=markers))
        return svg(Chart(title, "step", ylabel, curves))

    def _final_grids(self) -> str:
        last = {r.name: r.grids[max(r.grids)] for r in self.runs if r.grids}
        if not last:
            return ""
        prompts = list(dict.fromkeys(c.prompt for cells in last.values() for c in cells))
        head = "".join(f"<th>{esc(name)} (step {cells[0].step:,})</th>" for name, cells in last.items())
        body = []
        for prompt in prompts:
            seeds = sorted({c.seed for cells in last.values() for c in cells if c.prompt == prompt})
            for seed in seeds:
                tds = []
                for cells in last.values():
                    c = next((c for c in cells if c.prompt == prompt and c.seed == seed), None)
                    tds.append(f"<td>{self.image(c.file, prompt)}</td>" if c else "<td></td>")
                body.append(f'<tr><th><div class="prompt">{esc(prompt)}</div>seed {seed}</th>{"".join(tds)}</tr>')
        return (f'<div class="card"><h3>the last grid of each run</h3><div class="scroll"><table class="timeline">'
                f'<tr><th></th>{head}</tr>{"".join(body)}</table></div></div>')


# --- helpers -----------------------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr_unet": 1e-5}} -> {"optim.lr_unet": 1e-5}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def _num(v: Any) -> float:
    return float(v) if v is not None else math.nan


def _spread(items: list[int], n: int) -> list[int]:
    if len(items) <= n:
        return items
    picks = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def _total_steps(run: RunData) -> int | None:
    for line in run.banner:
        if "total steps" in line:
            digits = line.split("total steps", 1)[1].split("(")[0].strip().replace(",", "")
            return int(digits) if digits.isdigit() else None
    return None


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "—"
    try:
        return f"{float(v):.5g}"
    except (TypeError, ValueError):
        return esc(v)


def _model_steps(doc: dict[str, Any], run: RunData) -> np.ndarray:
    """The training step of each model drift compared: 0 for the base, a checkpoint's own step."""
    from tunelab.run import checkpoint_step

    ckpts = {str(c.path.resolve()): c for c in run.checkpoints}
    out = []
    for i, f in enumerate(doc.get("files", [])):
        c = ckpts.get(str(Path(f).resolve()))
        if c is None:
            out.append(0 if i == 0 else i)
        else:
            step = c.step if c.step is not None else checkpoint_step(c.path)
            out.append(step if step >= 0 else run.step)
    return np.array(out, dtype=np.float64)


def _heatmap(labels: list[str], m: list[list[float | None]]) -> str:
    vals = [v for row in m for v in row if v is not None]
    top = max(vals, default=0.0) or 1.0
    head = "".join(f"<th>{i}</th>" for i in range(len(labels)))
    rows = []
    for i, row in enumerate(m):
        tds = "".join(f'<td style="background:rgba(214,39,40,{0.85 * v / top:.3f})" title="{esc(labels[i])} vs '
                      f'{esc(labels[j])}">{v:.3g}</td>' if v is not None else "<td>—</td>" for j, v in enumerate(row))
        rows.append(f"<tr><th>{i} {esc(labels[i])}</th>{tds}</tr>")
    return f'<div class="scroll"><table class="heat"><tr><th></th>{head}</tr>{"".join(rows)}</table></div>'


def _probe_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from tunelab.probe.plots import series

    out = {}
    for s in ("learn", "preserve"):
        for m in ("loss", "drift"):
            x, y = series(rows, s, m)
            if x:
                out[f"{s}_{m}"] = {"steps": x, "values": y}
    return out


def _probe_table(rows: list[dict[str, Any]]) -> str:
    from tunelab.probe.plots import series

    cols = [(s, m) for s in ("learn", "preserve") for m in ("loss", "drift")]
    data = {c: dict(zip(*series(rows, *c))) for c in cols}
    steps = _spread(sorted({s for d in data.values() for s in d}), MAX_PROBE_ROWS)
    head = "".join(f"<th>{esc(s)} {esc(m)}</th>" for s, m in cols)
    body = "".join(f"<tr><th>{s:,}</th>" + "".join(f"<td>{data[c][s]:.5g}</td>" if s in data[c] else "<td>—</td>"
                                                   for c in cols) + "</tr>" for s in steps)
    return f'<table class="cmp"><tr><th>step</th>{head}</tr>{body}</table>'


def _smoothed_loss(run: RunData) -> tuple[np.ndarray, np.ndarray] | None:
    from tunelab.analyze.loss import effective_window, rolling_mean

    if "loss" not in run.metrics:
        return None
    s, v = run.metrics["loss"]
    return s, rolling_mean(v, effective_window(len(s), 2048))


def _last_smoothed(run: RunData) -> str:
    xy = _smoothed_loss(run)
    return f"{xy[1][-1]:.5g}" if xy is not None and len(xy[1]) else "—"


def _probe_series(set_name: str, metric: str):  # noqa: ANN202
    from tunelab.probe.plots import series

    return lambda r: series(r.probes, set_name, metric) if r.probes else None


def _probe_last(set_name: str, metric: str):  # noqa: ANN202
    get = _probe_series(set_name, metric)
    return lambda r: f"{xy[1][-1]:.5g}" if (xy := get(r)) and xy[1] else "—"


CSS = """
:root{--fg:#1d2330;--mute:#667085;--line:#e4e7ec;--bg:#f6f7f9;--card:#fff;--accent:#1f77b4}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px;font-weight:600}header .meta{color:#b8c0cc;font-size:12px}
nav a{color:#9ec5e8;margin-right:14px;font-size:13px}main{max-width:1280px;margin:0 auto;padding:12px 24px 40px}
h2{font-size:18px;margin:22px 0 4px;display:inline}.path{color:var(--mute);font-size:12px;margin:2px 0 8px}
summary{cursor:pointer}summary h2,summary h3{display:inline}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:12px 0}
.card h3{margin:0 0 8px;font-size:15px}.card h4{margin:12px 0 4px;font-size:13px;color:var(--mute)}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}.na{color:var(--mute)}
pre{background:#f2f4f7;padding:8px;border-radius:6px;overflow:auto;font-size:12px;white-space:pre-wrap}
table{border-collapse:collapse;font-size:12.5px}th,td{padding:3px 8px;border-bottom:1px solid var(--line);
text-align:left;vertical-align:top}table.kv th{color:var(--mute);font-weight:500;white-space:nowrap}
table.cmp td.diff{background:#fff4d6}table.heat td{text-align:right;min-width:54px}
.scroll{overflow-x:auto}table.timeline td,table.timeline th{text-align:center;border:none;padding:2px}
table.timeline img{width:128px;height:auto;image-rendering:pixelated;border-radius:3px}
.card > .row img{max-width:720px;height:auto}
.thumbs img{width:64px;height:auto;margin:2px;image-rendering:pixelated;border-radius:3px}
.prompt{font-weight:600;margin:10px 0 2px;word-break:break-word}svg.chart{background:#fff;max-width:100%;height:auto}
svg .ct{font-size:12.5px;font-weight:600;fill:#1d2330}svg .tick{font-size:10px;fill:#667085}
svg .axis{font-size:11px;fill:#475467}svg .lg{font-size:10.5px;fill:#1d2330}svg .plot{fill:none;stroke:#d0d5dd}
svg .grid{stroke:#eef0f3}svg .na{fill:#98a2b3;font-size:12px}
figure.fig{margin:0 0 8px 0}figure.fig figcaption{color:var(--mute);font-size:11.5px;max-width:560px}
.legend{display:flex;flex-wrap:wrap;gap:2px 12px;font-size:11px;max-width:490px;margin:2px 0 0 62px}
.legend span{white-space:nowrap}.legend svg{margin-right:4px;vertical-align:middle}
.verdict b{padding:1px 6px;border-radius:4px;background:#eef4fb}.v-converging b{background:#dcfae6}
.v-diverging b{background:#fee4e2}.v-oscillating b{background:#fef0c7}
input.filter{margin:6px 0;padding:4px 8px;border:1px solid var(--line);border-radius:4px;width:260px}
table.rows td{max-width:520px;word-break:break-word}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('tunelab-data').textContent);
  document.querySelectorAll('table.rows').forEach(function(table){
    var run = data.runs[Number(table.dataset.run)], body = table.querySelector('tbody');
    (run.data_rows || []).forEach(function(r){
      var tr = document.createElement('tr');
      [r.key, r.split, (r.width || '?') + 'x' + (r.height || '?'), r.tags, r.caption].forEach(function(v){
        var td = document.createElement('td'); td.textContent = v == null ? '' : String(v); tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  });
  document.querySelectorAll('input.filter').forEach(function(input){
    var rows = input.parentNode.querySelectorAll('table.config tr');
    input.addEventListener('input', function(){
      var q = input.value.toLowerCase();
      rows.forEach(function(tr){ tr.style.display = tr.textContent.toLowerCase().indexOf(q) < 0 ? 'none' : ''; });
    });
  });
})();
"""
