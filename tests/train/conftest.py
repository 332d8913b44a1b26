"""Models for the trainer's building blocks: full-size SDXL on the meta device (shapes only, no
memory) and a real toy model, each built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sdxl_meta():
    from tunelab.models.arch import build_components

    return build_components("sdxl", device="meta")


@pytest.fixture(scope="session")
def toy():
    from tunelab.models.arch import build_components

    return build_components("toy", seed=0)
