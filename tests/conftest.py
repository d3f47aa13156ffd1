"""Shared fixtures: one tiny zoo per test session, built with the same code users run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deployments.zoo import build_zoo

    out = tmp_path_factory.mktemp("zoo")
    build_zoo(out, seed=0)
    return out
