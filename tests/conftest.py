"""Shared test set-up: offline Hugging Face hub, a per-session crdiff cache, the embedded tiny models.

The tiny models are built once per test session into a fresh ``CRDIFF_CACHE`` (so every run exercises
the build, and nothing is read from or written to the user's ``~/.cache/crdiff``). Tests that mutate
weights take a fresh copy with ``load_tiny(name)``; loading from the cached folder is fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Must be set before huggingface_hub / diffusers are imported anywhere (they read it at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="crdiff-test-cache-"))
os.environ["CRDIFF_CACHE"] = str(_SESSION_CACHE)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests (tests/test_fuzz_parsers.py): a short budget in CI; CRDIFF_FUZZ=long for a long run
# (docs/testing.md), with CRDIFF_FUZZ_EXAMPLES examples per test.
settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("CRDIFF_FUZZ_EXAMPLES", "20000")), deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("CRDIFF_FUZZ", "ci"))

TINY_NAMES = ("tiny", "tiny-sdxl")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def crdiff_cache() -> Path:
    """The per-session ``CRDIFF_CACHE`` folder."""
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def tiny_dirs(crdiff_cache) -> dict[str, Path]:
    """``{"tiny": folder, "tiny-sdxl": folder}``: the tiny pipelines, built once per session."""
    from crdiff_cli.pipelines.tiny import tiny_model_path

    return {name: tiny_model_path(name) for name in TINY_NAMES}


@pytest.fixture
def load_tiny(tiny_dirs):
    """``load_tiny(name, dtype="fp32")``: a fresh, independently mutable LoadedModel of a tiny model."""
    from crdiff_cli.pipelines.loading import load_model

    def load(name: str = "tiny", dtype: str = "fp32"):
        return load_model(name, dtype=dtype)

    return load


@pytest.fixture(scope="session")
def tiny_readonly(tiny_dirs):
    """Session-shared LoadedModels of both tiny models. Do not mutate them: use ``load_tiny`` for that."""
    from crdiff_cli.pipelines.loading import load_model

    return {name: load_model(name) for name in TINY_NAMES}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's FID Inception with seeded random weights, saved where ``fid:PATH`` reads it."""
    from unittest import mock

    import torch

    from crdiff_cli.evaluation.fid import fid_class

    fid_class()  # makes torch_fidelity importable
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
                mock.patch("torch.load", return_value={}):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path

