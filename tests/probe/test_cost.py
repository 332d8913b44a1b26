"""The probe's cost accounting: forwards per probe and the automatic interval."""

from tunelab.config import RunConfig
from tunelab.probe.callback import auto_interval, planned_cost, probe_cost, summary_line


def test_planned_cost_counts_samples_times_timesteps():
    cfg = RunConfig()
    # sdxl defaults: 8 learn images + 5 preserve prompts x 2 seeds, 8 timesteps each
    assert planned_cost(cfg, "sdxl") == (8 + 5 * 2) * 8
    # toy: 8 of its preserve looks
    assert planned_cost(cfg, "toy") == (8 + 8 * 2) * 8
    cfg.probe.learn = ""
    assert planned_cost(cfg, "toy") == 8 * 2 * 8
    cfg.probe.scorer = "tunelab.toy.evaluate:reader_scorer"  # renders 8 prompts x 2 seeds, 30 steps, CFG: x2
    assert planned_cost(cfg, "toy") == 8 * 2 * 8 + 2 * 30 * 16


def test_auto_interval_aims_at_one_percent_of_the_training():
    # a training sample counts as 3 forwards: 192 forwards at 1 % of batch 8 -> every 800 steps
    assert auto_interval(192, 8) == 800
    assert auto_interval(192, 8, share=0.02) == 400
    assert auto_interval(1, 10_000) == 1  # never 0
    assert probe_cost(100, 4, 30) == 100 + 2 * 30 * 4


def test_summary_line_names_the_headline_numbers():
    line = summary_line({"probe/learn_loss": 0.5, "probe/drift_preserve": 0.01, "probe/preserve_score/all": 0.75})
    assert line == "learn loss 0.5, preserve drift 0.01, preserve_score/all 75.0 %"
