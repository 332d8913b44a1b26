"""Loss aggregation, smoothing, trend verdicts and the `tunelab loss` command."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.analyze.events import Scalars, Series
from tunelab.analyze.loss import (
    analyze_loss,
    default_labels,
    effective_window,
    ema,
    fit_trend,
    format_summary,
    images_seen,
    per_step,
    rolling_mean,
    runs_test,
    theil_sen,
)
from tunelab.errors import TunelabError

from tests.analyze.fixtures import FIXTURES, KOHYA  # noqa: E402,F401
TUNELAB = Path(sys.executable).parent / "tunelab"


def _series(tag: str, step, value) -> Series:
    step = np.asarray(step, dtype=np.int64)
    return Series(tag, step, np.arange(len(step), dtype=np.float64), np.asarray(value, dtype=np.float64))


def test_per_step_means_micro_steps() -> None:
    got = per_step(_series("loss", [0, 0, 1, 1, 1, 3], [1, 3, 2, 4, 6, 5]))
    np.testing.assert_array_equal(got.step, [0, 1, 3])
    np.testing.assert_allclose(got.value, [2, 4, 5])
    np.testing.assert_array_equal(got.count, [2, 3, 1])


def test_ema_matches_hand_computed_tensorboard_values() -> None:
    # w = 0.5: last = 0.5, 1.25, 2.125; debias 1 - 0.5^k = 0.5, 0.75, 0.875
    np.testing.assert_allclose(ema(np.array([1.0, 2.0, 3.0]), 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875])
    # Non-finite values pass through and do not advance the debias count.
    got = ema(np.array([1.0, np.nan, 3.0]), 0.5)
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2]], [1.0, (0.25 + 1.5) / 0.75])
    np.testing.assert_array_equal(ema(np.full(5, 0.3), 0.9), np.full(5, 0.3))  # constant: untouched
    np.testing.assert_array_equal(ema(np.array([1.0, 2.0]), 0.0), [1.0, 2.0])


def test_ema_block_product_equals_the_plain_recurrence() -> None:
    values = np.random.default_rng(0).normal(1.0, 0.3, size=1_000)  # crosses several 256-blocks
    for weight in (0.0, 0.6, 0.99, 0.999):
        last, expected = 0.0, []
        for k, v in enumerate(values, start=1):
            last = last * weight + (1 - weight) * v
            expected.append(last / (1 - weight**k))
        np.testing.assert_allclose(ema(values, weight), expected, rtol=1e-10)
    with pytest.raises(TunelabError, match="--weight"):
        ema(values, 1.0)


def test_rolling_mean_by_hand() -> None:
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(rolling_mean(np.array([1.0, np.nan, 3.0, 5.0]), 2), [1, 1, 3, 4])
    assert effective_window(3891, 2048) == 389
    assert effective_window(1_000_000, 2048) == 2048
    assert effective_window(5, 2048) == 1


def test_theil_sen_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = np.arange(40, dtype=float)
    y = 0.3 * x + rng.standard_t(2, size=40)
    ours = theil_sen(x, y)
    ref = stats.theilslopes(y, x, 0.95)
    np.testing.assert_allclose(ours, [ref[0], ref[2], ref[3]])


def test_runs_test_by_hand() -> None:
    runs, z = runs_test(np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=float))
    # 2 runs; mean = 2*4*4/8 + 1 = 5; var = 2*16*(32-8)/(64*7) = 12/7
    assert runs == 2 and z == pytest.approx((2 - 5) / np.sqrt(12 / 7))


def _noisy(curve: np.ndarray, sd: float, seed: int) -> np.ndarray:
    return curve + np.random.default_rng(seed).normal(0, sd, size=len(curve))


STEPS = np.arange(4000)


@pytest.mark.parametrize(
    ("curve", "verdict"),
    [
        (0.1 + 0.05 * np.exp(-STEPS / 1500), "converging"),
        (0.1 + 0.00001 * STEPS, "diverging"),
        (np.full(len(STEPS), 0.1), "flat"),
        (0.1 + 0.01 * np.sin(STEPS / 4000 * 2 * np.pi * 3), "oscillating"),
    ],
)
def test_trend_verdicts(curve: np.ndarray, verdict: str) -> None:
    trend = fit_trend(STEPS, _noisy(curve, 0.03, seed=len(verdict)))
    assert trend.verdict == verdict, trend.describe()
    assert trend.first_step == 400 and trend.last_step == 3999
    assert "95% CI" in trend.describe()


def test_trend_details() -> None:
    line = 1.0 - 1e-4 * STEPS
    exact = fit_trend(STEPS, line, warmup=0.0)
    assert exact.slope == pytest.approx(-1e-4) and exact.r2 == pytest.approx(1.0)
    assert exact.ci_low == pytest.approx(-1e-4) and exact.ci_high == pytest.approx(-1e-4)
    noise = fit_trend(STEPS, _noisy(np.full(len(STEPS), 1.0), 0.1, seed=9))
    assert abs(noise.r2) < 0.01 and noise.ci_low < 0 < noise.ci_high
    assert fit_trend(np.arange(10), np.ones(10)).verdict == "too short"
    with pytest.raises(TunelabError, match="--warmup"):
        fit_trend(STEPS, line, warmup=1.0)


def test_images_seen_from_batch_or_tag() -> None:
    steps = np.array([0, 5, 10, 20])
    empty = Scalars([])
    np.testing.assert_array_equal(images_seen(steps, 16, empty), [0, 80, 160, 320])
    assert images_seen(steps, None, empty) is None
    # Batch 8 until step 10, then 32: images(20) = 10*8 + 10*32.
    tagged = Scalars([], {"effective_batch": _series("effective_batch", [0, 10], [8, 32])})
    np.testing.assert_array_equal(images_seen(steps, None, tagged), [0, 40, 80, 400])


def test_default_labels() -> None:
    runs = [Path("/x/run_a/finetuning"), Path("/x/run_b/finetuning")]
    assert default_labels(runs) == ["run_a/finetuning", "run_b/finetuning"]
    assert default_labels([Path("/x/a/b"), Path("/y/a/b")]) == ["x/a/b", "y/a/b"]


def _metrics_run(tmp_path: Path, name: str, slope: float) -> Path:
    steps = np.repeat(np.arange(500), 2)
    values = 0.2 + slope * steps + np.random.default_rng(1).normal(0, 0.001, size=len(steps))
    run = tmp_path / name
    run.mkdir()
    pq.write_table(pa.table({"step": steps, "tag": ["train/loss"] * len(steps), "value": values,
                             "wall_time": steps.astype(float)}), run / "metrics.parquet")
    return run


def test_analyze_two_runs_from_parquet(tmp_path: Path) -> None:
    runs = [_metrics_run(tmp_path, "down", -1e-4), _metrics_run(tmp_path, "up", 1e-4)]
    report = analyze_loss(runs, out_dir=tmp_path / "out", align="images", batch=[4, 8])
    assert [r.label for r in report.runs] == ["down", "up"]
    assert [r.trend.verdict for r in report.runs] == ["converging", "diverging"]
    assert report.runs[1].images[-1] == 499 * 8
    rows = list(csv.DictReader((tmp_path / "out" / "loss.csv").open()))
    assert len(rows) == 1000 and rows[0].keys() >= {"run", "step", "images", "count", "loss", "ema", "rolling"}
    assert rows[1]["count"] == "2"
    assert (tmp_path / "out" / "loss.png").stat().st_size > 10_000
    assert "converging" in format_summary(report)


def test_bad_options(tmp_path: Path) -> None:
    run = _metrics_run(tmp_path, "r", 0.0)
    with pytest.raises(TunelabError, match="--smooth"):
        analyze_loss([run], smooth="gaussian")
    with pytest.raises(TunelabError, match="--batch was given 2 times for 1 runs"):
        analyze_loss([run], batch=[1, 2])
    with pytest.raises(TunelabError, match="pass --batch N"):
        analyze_loss([run], align="images")
    with pytest.raises(TunelabError, match="Did you mean 'train/loss'"):
        analyze_loss([run], tag="train/los")


def test_cli_end_to_end_on_kohya_log(tmp_path: Path) -> None:
    if not KOHYA:
        pytest.skip("kohya fixture not present")
    out = tmp_path / "report"
    done = subprocess.run([str(TUNELAB), "loss", str(KOHYA[0]), "--out", str(out), "--log-y"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "verdict" in done.stdout and "just_astolfo" in done.stdout and "slope" in done.stdout
    assert (out / "loss.png").stat().st_size > 20_000
    with (out / "loss.csv").open() as fh:
        assert sum(1 for _ in fh) == 3891 + 1
    assert (out / "summary.txt").read_text().startswith("run")


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([str(TUNELAB), "loss", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")


def test_killed_and_resumed_run_gives_one_loss_per_step(tmp_path: Path) -> None:
    """`tunelab loss` on the events folder of a run killed after step 24 and resumed from step 20:
    30 steps of one value each (it used to count 34), the resumed values for steps 21-24."""
    from tests.analyze.test_events import killed_and_resumed_run

    shown = killed_and_resumed_run(tmp_path / "events")
    report = analyze_loss([tmp_path / "events"], window=5)
    steps = report.runs[0].steps
    np.testing.assert_array_equal(steps.step, np.arange(1, 31))
    np.testing.assert_array_equal(steps.count, np.ones(30))
    np.testing.assert_array_equal(steps.value, [shown["loss"][s] for s in range(1, 31)])
