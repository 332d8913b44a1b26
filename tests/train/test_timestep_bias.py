"""Timestep bias as diffusers' SDXL training script draws it (huggingface/diffusers,
examples/text_to_image/train_text_to_image_sdxl.py: `generate_timestep_weights` builds ones(T), multiplies
the biased span -- `slice(0, int(portion * T))` for 'earlier', `slice(-int(portion * T), None)` for
'later', `slice(begin, end)` for 'range' -- by the multiplier and normalises; the loop then draws
`torch.multinomial(weights, bsz, replacement=True)`). Weights against numbers worked out by hand,
the drawn distribution against them statistically, and off by default: the same draws as before."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import LossSection, ObjectiveSection, parse_config
from tunelab.errors import TunelabError
from tunelab.models.arch import scheduler_config
from tunelab.train.objectives import Objective, timestep_weights

LATENTS = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _objective(**objective) -> Objective:
    return Objective.from_config(ObjectiveSection(**objective), scheduler_config("toy"), 0.0, LossSection())


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_weights_are_diffusers_generate_timestep_weights_worked_by_hand():
    # earlier, portion 0.25, x2: 250 timesteps weigh 2, 750 weigh 1; sum 1250
    w = timestep_weights("earlier", 1000, multiplier=2.0, portion=0.25)
    assert torch.allclose(w[:250], torch.full((250,), 2 / 1250)) and torch.allclose(w[250:], torch.full((750,), 1 / 1250))
    # later, portion 0.1, x3: the last 100 weigh 3; sum 900 + 300 = 1200
    w = timestep_weights("later", 1000, multiplier=3.0, portion=0.1)
    assert torch.allclose(w[900:], torch.full((100,), 0.0025)) and torch.allclose(w[:900], torch.full((900,), 1 / 1200))
    # range 200-500 (sliced [200, 500)), x0.5: 300 weigh 0.5, 700 weigh 1; sum 850
    w = timestep_weights("range", 1000, multiplier=0.5, begin=200, end=500)
    assert torch.allclose(w[200:500], torch.full((300,), 0.5 / 850))
    assert torch.allclose(w[:200], torch.full((200,), 1 / 850)) and torch.allclose(w[500:], torch.full((500,), 1 / 850))
    assert w[499] < w[500]  # the end is exclusive, as diffusers' slice makes it
    assert torch.allclose(timestep_weights("none", 1000), torch.full((1000,), 1e-3))
    for w in (timestep_weights("earlier", 1000, 2.0, 0.3), timestep_weights("range", 1000, 4.0, begin=10, end=11)):
        assert w.dtype == torch.float32 and abs(float(w.sum()) - 1) < 1e-6
    with pytest.raises(TunelabError, match="timestep_bias_begin / _end"):
        timestep_weights("range", 1000, 2.0, begin=0, end=1200)


def test_drawn_timesteps_follow_the_weights():
    ob = _objective(timestep_bias_strategy="earlier", timestep_bias_multiplier=2.0)
    t = ob.draw_timesteps(200_000, _gen())
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 1000
    share = float((t < 250).float().mean())
    assert abs(share - 0.4) < 0.005  # 2 x 250 / 1250; one standard deviation is 0.0011
    counts = torch.bincount(t, minlength=1000).float()
    assert abs(float(counts[:250].mean()) / float(counts[250:].mean()) - 2.0) < 0.05  # twice as often, each
    assert torch.equal(ob.draw_timesteps(64, _gen(3)), ob.draw_timesteps(64, _gen(3)))  # from the generator alone


def test_the_bias_composes_with_the_timestep_window():
    # later 0.25 x3 inside [100, 900): 100-749 weigh 1 (650), 750-899 weigh 3 (450 in all); P = 450 / 1100
    ob = _objective(timestep_bias_strategy="later", timestep_bias_multiplier=3.0, min_timestep=100, max_timestep=900)
    assert float(ob.timestep_weights[:100].sum()) == 0 and float(ob.timestep_weights[900:].sum()) == 0
    t = ob.draw_timesteps(100_000, _gen(2))
    assert int(t.min()) >= 100 and int(t.max()) < 900
    assert abs(float((t >= 750).float().mean()) - 450 / 1100) < 0.006


def test_off_draws_exactly_what_it_drew_before():
    plain = _objective()
    assert plain.timestep_weights is None
    torch.testing.assert_close(plain.draw_timesteps(64, _gen(4)), torch.randint(0, 1000, (64,), generator=_gen(4)),
                               rtol=0, atol=0)
    before = Objective.from_config(ObjectiveSection(), scheduler_config("toy")).sample(LATENTS, _gen(5))
    for a, b in zip(before, plain.sample(LATENTS, _gen(5))):
        assert torch.equal(a, b)
    biased = _objective(timestep_bias_strategy="later", timestep_bias_multiplier=5.0).sample(LATENTS, _gen(5))
    assert biased.noisy.shape == before.noisy.shape and biased.timesteps.dtype == before.timesteps.dtype
    assert not torch.equal(biased.timesteps, before.timesteps)  # the bias does draw differently


def _run(objective: dict) -> dict:
    return {"objective": objective}


@pytest.mark.parametrize("objective, message", [
    ({"prediction": "flow", "timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0},
     "timestep_bias_strategy applies to epsilon / v; flow draws logit-normal"),
    ({"timestep_bias_strategy": "earlier"}, "timestep_bias_multiplier = 1 changes nothing"),
    ({"timestep_bias_strategy": "range", "timestep_bias_multiplier": 2.0, "timestep_bias_begin": 500,
      "timestep_bias_end": 500}, r"timestep_bias_begin \(500\) must be below objective.timestep_bias_end \(500\)"),
    ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "max_timestep": 600},
     r"biases timesteps 750-999, none of the timesteps .* allow \(0-599\)"),
    ({"timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 2.0, "timestep_bias_portion": 0.5,
      "min_timestep": 100, "max_timestep": 400}, r"biases timesteps 0-499, every one of"),
    ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "timestep_bias_portion": 1.0},
     r"biases timesteps 0-999, every one of"),
])
def test_meaningless_biases_are_refused_naming_the_settings(objective, message):
    with pytest.raises(TunelabError, match=message):
        parse_config(_run(objective))


def test_a_bias_and_its_settings_pass_config():
    cfg = parse_config(_run({"timestep_bias_strategy": "range", "timestep_bias_multiplier": 3.0,
                             "timestep_bias_begin": 200, "timestep_bias_end": 500, "min_timestep": 100}))
    assert cfg.objective.timestep_bias_end == 500
    with pytest.raises(TunelabError, match="timestep_bias_multiplier"):
        parse_config(_run({"timestep_bias_multiplier": 0}))  # diffusers' "not allowed", refused here by range
