"""k-diffusion's own sampler and schedule code, loaded for reference tests.

k-diffusion (PyPI `k-diffusion`, installed with --no-deps by `scripts/setup.sh --dev`) is the code
A1111 samples with (`modules/sd_samplers_kdiffusion.py` wraps `k_diffusion.sampling.sample_*`).
Its package `__init__` imports training extras (torchvision, CLIP, clean-fid) that the sampler code
never uses, and PyPI's torchvision would replace the CPU torch. So this loads only `sampling`,
`utils` and `external`, with an empty stand-in for `torchvision.transforms.functional` (used by
utils' image helpers, not by anything sampled here).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def load() -> types.SimpleNamespace:
    """(sampling, external, utils) of the installed k-diffusion; skips the test when it is absent
    outside CI, fails under CI=true (the dev setup installs it)."""
    import os

    if "k_diffusion.sampling" in sys.modules:  # loaded by an earlier test module (its stand-in has no __spec__)
        return _namespace()
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            pytest.fail("k-diffusion is not installed: run scripts/setup.sh --dev")
        pytest.skip("k-diffusion not installed (scripts/setup.sh --dev installs it)")
    if "k_diffusion.sampling" not in sys.modules:
        stubs = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        present = [n for n in stubs if n in sys.modules]
        for name in stubs:
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        try:
            for sub in ("utils", "sampling", "external"):
                importlib.import_module(f"k_diffusion.{sub}")
        finally:  # the stand-in must not be seen by transformers' / diffusers' availability checks
            for name in stubs:
                if name not in present:
                    sys.modules.pop(name, None)
    return _namespace()


def _namespace() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        sampling=sys.modules["k_diffusion.sampling"],
        external=sys.modules["k_diffusion.external"],
        utils=sys.modules["k_diffusion.utils"],
    )
