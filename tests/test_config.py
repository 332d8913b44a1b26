"""Run files: the examples validate; every kind of error names the field and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import RunConfig, field_docs, load_config, parse_config, save_resolved
from tunelab.errors import TunelabError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["toy", "sdxl-6k-experiment", "sdxl-12m-epoch"])
def test_examples_validate(name):
    cfg = load_config(EXAMPLES / f"{name}.toml")
    assert isinstance(cfg, RunConfig)


def test_production_example_has_the_field_settings():
    cfg = load_config(EXAMPLES / "sdxl-12m-epoch.toml")
    assert cfg.accumulation_for(4) == 4 and cfg.train.batch_size == 1
    assert (cfg.optim.lr_unet, cfg.optim.lr_text_encoder_1, cfg.optim.lr_text_encoder_2) == (1.5e-6, 1.2e-5, 1.2e-5)
    assert cfg.train.parts.unet == "unet71" and cfg.train.parts.text_encoder == "on"
    assert cfg.data.captions.mode == "concat"


def _error(data: dict) -> str:
    with pytest.raises(TunelabError) as err:
        parse_config(data)
    return str(err.value)


def test_unknown_key_gets_a_nearest_name_hint():
    msg = _error({"optim": {"lr_unt": 1e-5}})
    assert "optim.lr_unt: unknown key; did you mean 'optim.lr_unet'?" in msg
    assert "allowed here:" in msg and "lr_text_encoder_1" in msg
    assert "did you mean 'train'" in _error({"trian": {}})
    assert "did you mean 'data.captions.quality_position'" in _error({"data": {"captions": {"quality_positon": "front"}}})


def test_types_ranges_and_choices_name_the_field():
    msg = _error({"train": {"batch_size": 0, "mixed_precision": "fp8"}, "optim": {"lr_unet": "fast"}})
    assert "train.batch_size: Input should be greater than or equal to 1 (got 0)" in msg
    assert "train.mixed_precision: Input should be 'no', 'fp16' or 'bf16' (got 'fp8')" in msg
    assert "optim.lr_unet:" in msg and "3 problem(s)" in msg


def test_impossible_combinations():
    only = _error({"train": {"parts": {"text_encoder": "only"}}, "optim": {"lr_text_encoder_1": 0, "lr_text_encoder_2": 0}})
    assert "text_encoder = 'only'" in only and "nothing would train" in only
    assert "not both" in _error({"train": {"grad_accumulation": 4, "target_effective_batch": 16}})
    assert "not divisible" in _error({"train": {"target_effective_batch": 10, "expect_world_size": 4}})
    assert "needs objective.prediction = 'v'" in _error({"objective": {"zero_terminal_snr": True}})
    assert "23 values" in _error({"train": {"parts": {"block_lrs": [1.0, 0.5]}}})
    assert "full_bf16" in _error({"train": {"full_bf16": True, "mixed_precision": "fp16"}})
    both = _error({"objective": {"zero_terminal_snr": True}, "train": {"epochs": 0}})
    assert "2 problem(s)" in both  # every problem at once


def test_effective_batch_derivation():
    cfg = parse_config({"train": {"target_effective_batch": 16}})
    assert [cfg.accumulation_for(w) for w in (1, 2, 4)] == [16, 8, 4]
    with pytest.raises(TunelabError, match="not divisible by world size 3"):
        cfg.accumulation_for(3)


def test_toml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nbatch_size = 1\n")
    with pytest.raises(TunelabError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(TunelabError, match="no such run file"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_json_round_trips(tmp_path):
    cfg = load_config(EXAMPLES / "sdxl-6k-experiment.toml")
    path = save_resolved(cfg, tmp_path / "config.json")
    again = parse_config(json.loads(path.read_text()))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    changed = parse_config({**json.loads(path.read_text()), "train": {**cfg.train.model_dump(mode="json"), "batch_size": 2}})
    assert changed.fingerprint() != cfg.fingerprint()


def test_settings_at_their_defaults_leave_the_fingerprint_alone():
    """A run made before a setting existed resumes after it is added (at its default)."""
    plain = RunConfig.model_validate({"train": {"batch_size": 2}})
    spelled = RunConfig.model_validate({"train": {"batch_size": 2, "full_bf16": False, "bf16_update": "exact"},
                                        "optim": {"lr_unet": 1e-5, "schedule": "constant"}})
    assert plain.fingerprint() == spelled.fingerprint()
    assert RunConfig.model_validate({"train": {"batch_size": 2, "max_grad_norm": 1.0}}).fingerprint() != plain.fingerprint()


def test_every_setting_is_documented():
    rows = field_docs()
    assert len(rows) > 50
    assert all(doc for _, _, doc in rows), [n for n, _, d in rows if not d]
