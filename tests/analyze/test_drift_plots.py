"""The drift plots' own maths (the checkpoint map's placement) and their edge cases, drawn for real."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tunelab.analyze import drift_plots


def _distances(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)


def test_map_places_planar_points_at_their_distances():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(6, 2)) * [5.0, 0.3]
    d = _distances(plane)
    points, kept = drift_plots.mds_2d(d)
    np.testing.assert_allclose(_distances(points), d, atol=1e-9)
    assert kept == pytest.approx(1.0)


def test_map_says_how_much_a_plane_keeps():
    tetrahedron = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float)
    _, kept = drift_plots.mds_2d(_distances(tetrahedron))
    assert kept == pytest.approx(2 / 3)  # three equal axes, two drawn
    line = np.array([[0.0], [1.0], [3.0]])
    points, kept = drift_plots.mds_2d(_distances(line))  # two models or a straight run: one axis
    np.testing.assert_allclose(_distances(points), _distances(line), atol=1e-9)
    assert kept == pytest.approx(1.0)


def test_map_draws_identical_and_incomparable_components(tmp_path):
    doc = {"ml": ["a.safetensors", "b.safetensors"],
           "dm": {"unet": [[0.0, 2.0], [2.0, 0.0]], "vae": [[0.0, 0.0], [0.0, 0.0]],
                  "other": [[0.0, None], [None, 0.0]]}}
    path = drift_plots.plot_map(doc, tmp_path / "map.png")
    with Image.open(path) as im:
        assert im.size[0] > 800 and im.getextrema() != ((255, 255),) * len(im.getbands())
