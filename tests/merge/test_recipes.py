"""Recipes as users have them: a 2024-era recipe (no version header, `model PATH "sdxl" "base"`,
`call`, the three-model add_difference, the add_difference_ties helper, a per-component
dictionary, Windows paths) and a 2025 one (subtract -> TIES with DARE -> add difference -> VAE
bake-in -> fallback), run end to end on toy checkpoints through --map; upgrade; errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.merge.conftest import tensors
from tunelab.errors import TunelabError
from tunelab.merge.recipe import parse_maps
from tunelab.merge.run import prepare, run_file

K_UNET = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
K_TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
K_VAE = "first_stage_model.decoder.conv_in.weight"

RECIPE_2024 = r"""# merged by hand, spring 2024
model "D:\sd\models\Stable-diffusion\base" "sdxl" "base"
model "D:\sd\models\Stable-diffusion\ft1" "sdxl" "base"
model "D:\sd\models\Stable-diffusion\ft2" "sdxl" "base"
call "add_difference" &0 &1 &2 alpha=0.5
dict clip_l=0.0 clip_g=0.0 diffuser=0.7 vae=0.0
call "weighted_sum" &3 &1 alpha=&4
"""

RECIPE_2025 = """version 0.1.0
model "models/base.safetensors" model_config="sdxl-sgm" merge_space="weight"
model "models/ft1.safetensors" model_config="sdxl-sgm" merge_space="weight"
model "models/ft2.safetensors" model_config="sdxl-sgm" merge_space="weight"
model "models/vae.safetensors" model_config="sdxl-sgm" merge_space="weight"
merge "subtract" &1 &0
merge "subtract" &2 &0
merge "ties_sum_with_dropout" &4 &5 probability=0.5 rescale=true k=1.0 seed=7
merge "add_difference" &0 &6 alpha=0.8
merge "fallback" &3 &7
merge "fallback" &8 &0
"""


def _maps(toy_models) -> list[tuple[str, str]]:
    return [("D:\\sd\\models\\Stable-diffusion", str(toy_models["base"].parent))]


def test_a_2024_recipe_is_upgraded_and_merges_as_it_meant(toy_models, tmp_path):
    (tmp_path / "old.mecha").write_text(RECIPE_2024)
    merged = run_file(tmp_path / "old.mecha", tmp_path / "old.safetensors", maps=_maps(toy_models), dtype="fp32",
                      progress=False)
    assert any("add_difference(a, b, c)" in n for n in merged.recipe.notes)
    assert any("per-component dictionary" in n for n in merged.recipe.notes)
    base, f1, f2 = (tensors(toy_models[n]) for n in ("base", "ft1", "ft2"))
    out = tensors(merged.path)
    for key, alpha in ((K_UNET, 0.7), (K_TE1, 0.0), (K_VAE, 0.0)):
        mid = base[key] + 0.5 * (f1[key] - f2[key])
        torch.testing.assert_close(out[key], (1 - alpha) * mid + alpha * f1[key], rtol=0, atol=1e-6)
    from safetensors import safe_open

    with safe_open(str(merged.path), "pt") as f:
        assert f.metadata()["mecha_recipe"].startswith("version 0.1.0")  # the recipe that made it
    # `merge upgrade` writes the same recipe to disk, and running that gives the same file
    run_cli("merge", "upgrade", tmp_path / "old.mecha", "--out", tmp_path / "new.mecha",
            "--map", f"D:\\sd\\models\\Stable-diffusion={toy_models['base'].parent}")
    text = (tmp_path / "new.mecha").read_text()
    assert text.startswith("version 0.1.0\n") and 'merge "subtract"' in text and "call" not in text
    again = run_file(tmp_path / "new.mecha", tmp_path / "again.safetensors", dtype="fp32", progress=False)
    assert all(torch.equal(v, out[k]) for k, v in tensors(again.path).items())


def test_a_2025_recipe_runs_from_the_command_line_through_map(toy_models, tmp_path):
    (tmp_path / "r.mecha").write_text(RECIPE_2025)
    out = tmp_path / "out" / "merged.safetensors"
    proc = run_cli("merge", "run", tmp_path / "r.mecha", "--out", out, "--map", f"models={toy_models['base'].parent}",
                   "--dtype", "fp32")
    assert "merged:" in proc.stdout and (tmp_path / "out" / "merged.mecha").is_file()
    base, f1, f2, vae, merged = (tensors(p) for p in (toy_models["base"], toy_models["ft1"], toy_models["ft2"],
                                                      toy_models["vae"], out))
    torch.testing.assert_close(merged[K_VAE], vae[K_VAE], rtol=0, atol=0)  # baked in
    import sd_mecha
    from sd_mecha.extensions import merge_methods

    r = merge_methods.resolve  # the same graph built with sd-mecha's own API
    mb, m1, m2, mv = (sd_mecha.model(str(toy_models[n])) for n in ("base", "ft1", "ft2", "vae"))
    summed = r("ties_sum_with_dropout")(r("subtract")(m1, mb), r("subtract")(m2, mb), probability=0.5, rescale=True,
                                        k=1.0, seed=7)
    node = r("fallback")(r("fallback")(mv, r("add_difference")(mb, summed, alpha=0.8)), mb)
    theirs = sd_mecha.merge(node, output=None, output_dtype=torch.float32, merge_dtype=torch.float64,
                            strict_mandatory_keys=False)
    theirs.pop("__metadata__", None)
    for key in (K_UNET, K_TE1, K_VAE):
        torch.testing.assert_close(merged[key], theirs[key].double(), rtol=0, atol=0)
    assert not torch.equal(merged[K_UNET], base[K_UNET]) and not torch.equal(merged[K_UNET], f1[K_UNET])
    assert f2  # all three models took part


def test_recipe_errors_name_the_line(toy_models, tmp_path):
    maps = parse_maps([f"models={toy_models['base'].parent}"])
    fork = 'version 0.1.0\nmodel "models/base"\nmodel "models/ft1"\nmerge "slerp_plus_plus" &0 &1 t=0.3\n'
    with pytest.raises(TunelabError, match=r"r.mecha:4: merge method 'slerp_plus_plus' is not in sd-mecha .*fork"):
        prepare(fork, "r.mecha", maps=maps)
    with pytest.raises(TunelabError, match=r"r.mecha:2: model 'gone/base' not found"):
        prepare('version 0.1.0\nmodel "gone/base"\n', "r.mecha", maps=maps)
    with pytest.raises(TunelabError, match=r"r.mecha:1: a lora input"):
        prepare(f'model "{toy_models["base"]}" "sdxl" "lora"\n', "r.mecha")
    with pytest.raises(TunelabError, match="refers to a line that does not come before it"):
        prepare('version 0.1.0\nmerge "weighted_sum" &0 &1\n', "r.mecha")
    with pytest.raises(TunelabError, match="--map 'x'"):
        parse_maps(["x"])
    assert Path(toy_models["base"]).is_file()
