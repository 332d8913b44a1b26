"""Each merge preset equals a direct tensor computation of its formula (on seeded toy
checkpoints), and sd-mecha's own result where the formula is sd-mecha's implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.merge.conftest import tensors
from tunelab.errors import TunelabError
from tunelab.merge.presets import build, parse_ratio
from tunelab.merge.run import merge_recipe

K_UNET = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"  # block IN01
K_UNET2 = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight"  # block OUT03
K_TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
K_TE2 = "conditioner.embedders.1.model.ln_final.weight"
KEYS = (K_UNET, K_UNET2, K_TE1, K_TE2)


def _merge(recipe, tmp_path, name):
    return tensors(merge_recipe(recipe, tmp_path / f"{name}.safetensors", dtype="fp32", progress=False).path)


def test_weighted_sum_per_component_and_block_and_the_mecha_beside_it(toy_models, tmp_path):
    a, b = tensors(toy_models["base"]), tensors(toy_models["ft1"])
    ratio = parse_ratio("unet=0.25,IN01=0.8,te1=0,default=0.5")
    out = _merge(build("weighted_sum", [toy_models["base"], toy_models["ft1"]], alpha=ratio), tmp_path, "ws")
    for key, alpha in ((K_UNET, 0.8), (K_UNET2, 0.25), (K_TE1, 0.0), (K_TE2, 0.5)):
        torch.testing.assert_close(out[key], (1 - alpha) * a[key] + alpha * b[key], rtol=0, atol=1e-7)
    mecha = (tmp_path / "ws.mecha").read_text()
    assert mecha.startswith("version 0.1.0\n") and 'merge "weighted_sum"' in mecha and f"{K_UNET}=0.8" in mecha
    with pytest.raises(TunelabError, match="unknown component|IN04"):
        parse_ratio("unett=0.3")


def test_add_difference_amplifies_and_ties_elects_signs_by_count(toy_models, tmp_path):
    base, f1, f2 = (tensors(toy_models[n]) for n in ("base", "ft1", "ft2"))
    out = _merge(build("add_difference", [toy_models["base"], toy_models["ft1"], toy_models["ft2"]],
                       alpha=parse_ratio(1.5)), tmp_path, "ad")
    for key in KEYS:
        torch.testing.assert_close(out[key], base[key] + 1.5 * (f1[key] - f2[key]), rtol=0, atol=1e-6)
    out = _merge(build("ties", [toy_models["ft1"], toy_models["ft2"]], base=toy_models["base"], k=0.3), tmp_path, "ties")
    for key in KEYS:
        deltas = torch.stack([_top_k(f1[key] - base[key], 0.3), _top_k(f2[key] - base[key], 0.3)])
        elected = torch.sign(torch.sign(deltas).sum(0))  # by count, not by mass
        agree = (torch.sign(deltas) == elected).double()
        expected = base[key] + torch.nan_to_num((deltas * agree).sum(0) / agree.sum(0), nan=0.0)
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)


def _top_k(d: torch.Tensor, k: float) -> torch.Tensor:
    """The share k of the largest |d| (TIES' trim), as sd-mecha's filter_top_k counts it."""
    kth = d.flatten().abs().kthvalue(max(int((1 - k) * d.numel()), 1)).values
    return d * (d.abs() >= kth)


def test_dare_drops_with_probability_p_and_rescales_and_a_vae_is_baked_in(toy_models, tmp_path):
    base, f1, vae = tensors(toy_models["base"]), tensors(toy_models["ft1"]), tensors(toy_models["vae"])
    out = _merge(build("dare", [toy_models["ft1"]], base=toy_models["base"], p=0.9, seed=3, vae=toy_models["vae"]),
                 tmp_path, "dare")
    for key in (K_UNET, K_TE1):
        keep = torch.from_numpy(np.random.default_rng(3).binomial(1, 0.1, size=base[key].shape)).bool()  # per key, seeded
        torch.testing.assert_close(out[key], base[key] + torch.where(keep, f1[key] - base[key], 0.0) / 0.1,
                                   rtol=0, atol=1e-6)
        assert 0.08 < keep.double().mean() < 0.12
    for key in vae:  # baked in: the VAE file's own tensors
        torch.testing.assert_close(out[key], vae[key], rtol=0, atol=0)
    off = _merge(build("dare", [toy_models["ft1"]], base=toy_models["base"], p=0.5, rescale=False, seed=1), tmp_path, "d2")
    keep = torch.from_numpy(np.random.default_rng(1).binomial(1, 0.5, size=base[K_UNET].shape)).bool()
    torch.testing.assert_close(off[K_UNET], base[K_UNET] + torch.where(keep, f1[K_UNET] - base[K_UNET], 0.0), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_della_median_stock_and_dgmla_equal_sd_mechas_own_methods(toy_models, tmp_path):
    import sd_mecha
    from sd_mecha.extensions import merge_methods

    base, f1, f2 = (tensors(toy_models[n]) for n in ("base", "ft1", "ft2"))
    median = _merge(build("geometric_median", [toy_models["base"], toy_models["ft1"], toy_models["ft2"]]), tmp_path, "gm")
    for key in (K_UNET, K_TE2):  # Weiszfeld, written out
        pts = [base[key], f1[key], f2[key]]
        m, w = sum(pts) / 3, torch.ones(3, dtype=torch.float64)
        for _ in range(100):
            w_new = w / torch.stack([torch.dist(p, m) for p in pts]).clamp(min=1e-6)
            m = sum(p * w_new[i] for i, p in enumerate(pts)) / w_new.sum()
        torch.testing.assert_close(median[key], m, rtol=0, atol=1e-5)
    resolve = merge_methods.resolve
    mb, m1, m2 = (sd_mecha.model(str(toy_models[n])) for n in ("base", "ft1", "ft2"))
    d1, d2 = resolve("subtract")(m1, mb), resolve("subtract")(m2, mb)
    direct = {
        "model_stock": resolve("add_difference")(mb, resolve("model_stock")(d1, d2), alpha=1.0),
        "della": resolve("add_difference")(mb, resolve("ties_sum_with_dropout")(
            d1, d2, probability=0.9, della_eps=0.1, rescale=True, k=0.2, vote_sgn=False, seed=0), alpha=1.0),
        "dgmla": resolve("add_difference")(mb, resolve("ties_sum_with_dropout")(
            d1, d2, probability=0.9, della_eps=0.1, rescale=True, k=0.2, vote_sgn=False, apply_stock=True,
            apply_median=True, seed=0), alpha=1.0),
    }
    for method, node in direct.items():
        ours = _merge(build(method, [toy_models["ft1"], toy_models["ft2"]], base=toy_models["base"]), tmp_path, method)
        theirs = sd_mecha.merge(node, output=None, output_dtype=torch.float32, merge_dtype=torch.float64,
                                strict_mandatory_keys=False)
        theirs.pop("__metadata__", None)
        for key in KEYS:
            torch.testing.assert_close(ours[key], theirs[key].double(), rtol=0, atol=0, equal_nan=True)


def test_presets_refuse_what_cannot_merge(toy_models):
    with pytest.raises(TunelabError, match="give --base"):
        build("ties", [toy_models["ft1"], toy_models["ft2"]])
    with pytest.raises(TunelabError, match="takes 3 models"):
        build("add_difference", [toy_models["ft1"], toy_models["ft2"]])
    with pytest.raises(TunelabError, match="no such checkpoint"):
        build("weighted_sum", [toy_models["ft1"], "nope.safetensors"])
    with pytest.raises(TunelabError, match="unknown merge preset"):
        build("slerpp", [toy_models["ft1"], toy_models["ft2"]])
