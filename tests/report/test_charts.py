"""The report's pure pieces: min/max down-sampling, tick labels, the escaping of embedded JSON."""

from __future__ import annotations

import json
import re

import numpy as np

from tunelab.report.charts import Chart, Curve, _labels, minmax_bins, svg
from tunelab.report.page import esc, flatten, script_json


def test_minmax_bins_keeps_every_spike_and_both_ends_within_the_bound():
    rng = np.random.default_rng(0)
    n = 200_000
    x = np.arange(n, dtype=np.float64)
    y = rng.normal(0.1, 0.01, n)
    y[123_457], y[7] = 50.0, -3.0  # one spike up, one down
    y[n - 1] = 0.2
    bx, by = minmax_bins(x, y, bins=300)
    assert len(bx) <= 2 * 300 + 2
    assert by.max() == 50.0 and bx[by.argmax()] == 123_457
    assert by.min() == -3.0 and bx[by.argmin()] == 7
    assert bx[0] == 0 and bx[-1] == n - 1 and by[-1] == 0.2
    assert np.all(np.diff(bx) > 0)  # in step order, no point twice
    # every kept point is a real point of the curve
    assert np.array_equal(by, y[bx.astype(np.int64)])


def test_minmax_bins_returns_short_curves_whole_and_drops_non_finite():
    x = np.arange(10.0)
    y = np.linspace(1, 2, 10)
    y[3] = np.nan
    bx, by = minmax_bins(x, y, bins=300)
    assert list(bx) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert np.array_equal(by, y[[0, 1, 2, 4, 5, 6, 7, 8, 9]])


def test_tick_labels_are_distinct_and_integers_read_as_integers():
    assert _labels([9.5e-5, 1e-4, 1.05e-4, 1.1e-4]) == ["9.5e-05", "0.0001", "0.000105", "0.00011"]
    assert _labels([0.0, 20.0, 40.0, 120.0]) == ["0", "20", "40", "120"]
    assert _labels([0.0, 50_000.0, 100_000.0]) == ["0", "50,000", "100,000"]


def test_a_chart_of_a_long_curve_stays_small_and_titles_are_escaped():
    n = 100_000
    chart = Chart("<b>loss</b>", "step", "loss", [Curve("a & b", np.arange(n), np.sin(np.arange(n) / 500))])
    text = svg(chart)
    points = re.search(r'<polyline points="([^"]*)"', text)[1].split()
    assert len(points) <= 602
    assert "<b>" not in text and "&lt;b&gt;loss&lt;/b&gt;" in text and "a &amp; b" in text


def test_script_json_cannot_close_its_script_block_and_reads_back_the_same():
    hostile = {"caption": '"</script><script>alert(1)</script>', "tags": "<!-- x -->", "sep": "a\u2028b\u2029c",
               "amp": "&lt;", "quote": "'\""}
    text = script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == hostile
    assert esc('<img src=x onerror="a">') == "&lt;img src=x onerror=&quot;a&quot;&gt;"


def test_flatten_names_every_setting_by_its_dotted_path():
    assert flatten({"optim": {"lr_unet": 1e-5, "betas": [0.9, 0.99]}, "data": {"captions": {"mode": "tags"}}}) == {
        "optim.lr_unet": 1e-5, "optim.betas": [0.9, 0.99], "data.captions.mode": "tags"}
