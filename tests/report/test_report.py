"""The run report end to end: a real toy run whose captions and grid prompts are hostile HTML,
refreshed by the trainer at every checkpoint, written by `tunelab report`, opened in a real
headless chromium (screenshot, console, what renders as text); a comparison of two runs; a
run of 200,000 steps that stays light."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from tests.train.conftest import write_run

HOSTILE_CAPTION = '<script>window.__pwned = 1</script> a star "</script><img src=x onerror="window.__pwned=2">'
HOSTILE_TAGS = 'astolfo, <b>bold</b>, "</script>'
HOSTILE_PROMPT = '<script>window.__pwned=3</script>astolfo'
GRID = {"prompts": [HOSTILE_PROMPT, "red, car"], "seeds": [5], "every_n_steps": 2, "steps": 4, "cfg": 2.0}
PROBE = {"enabled": True, "every_n_steps": 3, "learn_samples": 2, "preserve_seeds": [0], "preserve_steps": 4,
         "timesteps": 2}


@pytest.fixture(scope="module")
def hostile_index(tmp_path_factory) -> Path:
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    root = tmp_path_factory.mktemp("hostile-world")
    samples = make_world(root / "images", n=16, seed=0, split="concept")
    first = samples[0].name
    (root / "images" / f"{first}.caption").write_text(HOSTILE_CAPTION, encoding="utf-8")
    (root / "images" / f"{first}.txt").write_text(HOSTILE_TAGS, encoding="utf-8")
    opts = IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32), holdout=0.25)
    build_index([f"folder:{root / 'images'}"], root / "index.parquet", opts)
    return root / "index.parquet"


class Watch:
    """A callback after the report's: what RUN/report.html says at each checkpoint, mid-run."""

    every_n_steps = 0
    all_ranks = False

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def due(self, event, ctx) -> bool:
        return event.value == "checkpoint"

    def on_checkpoint(self, ctx) -> None:
        html = ctx.run.report.read_text(encoding="utf-8")
        steps = re.search(r"<th>steps</th><td>([\d,]+) of 6</td>", html)
        self.seen.append((ctx.progress.step, steps[1] if steps else ""))
        assert not list(ctx.run.path.glob(".*.partial")), "a half-written report is lying around"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hostile_index) -> dict[str, object]:
    from tunelab.config import load_config
    from tunelab.train.callbacks import default_callbacks
    from tunelab.train.trainer import train

    root = tmp_path_factory.mktemp("report-runs")
    a = write_run(root / "a.toml", hostile_index, root / "a", grid=GRID, probe=PROBE)
    b = write_run(root / "b.toml", hostile_index, root / "b", optim={"lr_unet": 3e-4},
                  train={"max_steps": 4}, save={"every_n_steps": 4})
    watch = Watch()
    callbacks = default_callbacks(load_config(a))
    callbacks.items.append(watch)
    train(a, callbacks=callbacks)
    train(b)
    return {"a": root / "a", "b": root / "b", "watch": watch, "root": root}


def test_the_trainer_rewrites_the_report_at_every_checkpoint(runs):
    # the report the trainer wrote at each checkpoint already showed that checkpoint's step
    assert runs["watch"].seen == [(2, "2"), (4, "4"), (6, "6")]
    html = (runs["a"] / "report.html").read_text(encoding="utf-8")
    assert "grids over training" in html and "learned / forgot" in html
    assert (runs["a"] / "banner.txt").read_text().startswith("run 't'")


def test_report_opens_in_a_real_browser_without_errors_and_hostile_text_stays_text(runs, open_page, tmp_path):
    out = run_cli("report", runs["a"])
    assert "report:" in out.stdout
    report = runs["a"] / "report.html"
    assert (runs["a"] / "drift" / "drift.json").is_file()  # computed by the command, not by the trainer
    opened = open_page(report)
    page = opened.page
    assert opened.errors == [], opened.errors
    assert all(u.startswith(("file:", "data:")) for u in opened.requests), opened.requests  # nothing from the network
    assert page.evaluate("window.__pwned") is None  # no caption, tag or prompt ran as script
    assert page.evaluate("document.querySelectorAll('script').length") == 2  # the data block and the page's own
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    rows = page.inner_text("table.rows")  # rendered by the page's script from the embedded JSON
    assert HOSTILE_CAPTION in rows and HOSTILE_TAGS in rows
    prompts = page.eval_on_selector_all(".prompt", "els => els.map(e => e.textContent)")
    assert HOSTILE_PROMPT in prompts
    data = json.loads(page.inner_text("#tunelab-data"))
    assert data["runs"][0]["data_rows"][0]["caption"] == HOSTILE_CAPTION
    for section in ("the run", "loss", "learned / forgot (probes)", "weight drift", "dataset"):
        assert page.get_by_role("heading", name=section, exact=False).count() >= 1, section
    # drawn, not blank: a screenshot with real variety of colour (charts, images)
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[0] > 2000 and im.std() > 20
    assert len(np.unique(im.reshape(-1, 3)[::7], axis=0)) > 500
    # the grid timeline: each prompt across the checkpoints at steps 2, 4, 6
    heads = page.eval_on_selector_all("table.timeline th", "els => els.map(e => e.textContent)")
    assert {"step 2", "step 4", "step 6"} <= set(heads) and "seed 5" in heads


def test_two_runs_compare_side_by_side_with_the_differences_highlighted(runs, open_page):
    out = runs["root"] / "compare" / "both.html"
    run_cli("report", runs["a"], runs["b"], "--out", out, "--no-drift")
    opened = open_page(out)
    assert opened.errors == [], opened.errors
    page = opened.page
    diff = page.eval_on_selector_all("#compare table.cmp tr", "rs => rs.map(r => r.innerText)")
    lr = next(r for r in diff if r.startswith("optim.lr_unet"))
    assert "0.0001" in lr and "0.0003" in lr
    assert any(r.startswith("train.max_steps") for r in diff)
    assert not any(r.startswith("run.output_dir") for r in diff)  # always differs: in the header instead
    assert page.evaluate("document.querySelectorAll('#compare td.diff').length") >= 4
    # images link to the full files, relative to where the report lies
    href = page.eval_on_selector("#compare table.timeline a", "a => a.getAttribute('href')")
    assert href.startswith("../a/samples/") and (out.parent / href).resolve().is_file()


def test_a_long_run_stays_light(tmp_path):
    """200,000 logged steps with one spike and 40 grid renders of 256 px images: every curve stays
    within the point bound, the spike is drawn, the timeline shows 10 renders, the file stays small."""
    from PIL import Image

    from tunelab.report import write_report

    run = tmp_path / "long"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"run": {"name": "long"}, "model": {"base": "none"}}))
    n = 200_000
    rng = np.random.default_rng(0)
    loss = rng.normal(0.1, 0.01, n)
    loss[150_001] = 9.0
    steps = np.arange(1, n + 1)
    table = pa.table({"step": np.concatenate([steps, steps]), "tag": ["loss"] * n + ["grad_norm"] * n,
                      "value": np.concatenate([loss, rng.random(n)]), "wall_time": np.zeros(2 * n)})
    pq.write_table(table, run / "metrics.parquet")
    for k in range(40):
        folder = run / "samples" / f"step-{(k + 1) * 5000:08d}"
        (folder / "cells").mkdir(parents=True)
        cells = []
        for i, (prompt, seed) in enumerate([("a cat", 1), ("a cat", 2), ("a dog", 1), ("a dog", 2)]):
            file = folder / "cells" / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(file)
            cells.append({"file": f"cells/{i}.png", "settings": {"prompt": prompt, "seed": seed}})
        (folder / "grid.json").write_text(json.dumps({"cells": cells}))
    path = write_report([run], progress=False)
    html = path.read_text(encoding="utf-8")
    for points in re.findall(r'<polyline points="([^"]*)"', html):
        assert len(points.split()) <= 602
    chart = html[html.index('aria-label="training loss"'):]
    chart = chart[: chart.index("</svg>")]
    ticks = [float(t.replace(",", "")) for t in re.findall(r'class="tick">([^<]+)</text>', chart)]
    assert max(ticks) >= 8  # the one spike of 9.0 among 200,000 values near 0.1 is drawn
    assert html.count("<th>step ") == 2 * 10  # two prompts x 10 of the 40 renders
    assert "showing 10 of 40 renders" in html
    assert len(html) < 3_000_000, len(html)
    assert "fewer than two models to compare" in html  # no base file, no checkpoints: drift says why it is empty


def test_report_errors_name_what_to_change(tmp_path):
    bad = run_cli("report", tmp_path / "nothing", check=False)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    bad = run_cli("report", tmp_path / "r", "--out", tmp_path / "r.png", check=False)
    assert bad.returncode == 2 and ".html" in bad.stderr
