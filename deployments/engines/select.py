"""Picks the engine class for a specialist: vLLM where it can run and supports the model, HF otherwise."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from deployments.config import EngineConfig

logger = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """`backend: vllm` was asked for where vLLM cannot run; raised at start-up with the reason."""


def model_architectures(model: str) -> list[str]:
    """Architectures named in a local checkpoint's config.json ([] when unknown, e.g. a hub id)."""
    cfg = Path(model).expanduser() / "config.json"
    if not cfg.is_file():
        return []
    try:
        return list(json.loads(cfg.read_text()).get("architectures") or [])
    except (OSError, json.JSONDecodeError):
        return []


def vllm_supported_architectures() -> set[str] | None:
    """Architectures the installed vLLM can run; None when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm import ModelRegistry

        return set(ModelRegistry.get_supported_archs())
    except Exception as err:  # a broken vLLM install must not take the HF path down with it
        logger.warning("vllm is installed but its model registry failed: %r", err)
        return None


def choose_backend(
    requested: str,
    quantization: str,
    vllm_archs: set[str] | None,
    gpu_present: bool,
    architectures: list[str],
) -> tuple[str, str]:
    """Pure decision: ("vllm" | "hf", why). Raises BackendUnavailableError for an impossible `vllm`."""
    problems = []
    if vllm_archs is None:
        problems.append("vllm is not installed")
    if not gpu_present:
        problems.append("no CUDA GPU is present")
    if vllm_archs is not None and architectures and not set(architectures) & vllm_archs:
        problems.append(f"vllm does not support architecture {architectures}")
    if quantization == "int8":
        problems.append("int8 (bitsandbytes LLM.int8) is served by the hf backend only")
    if requested == "hf":
        return "hf", "backend: hf in config"
    if requested == "vllm":
        if problems:
            raise BackendUnavailableError("backend: vllm cannot run here: " + "; ".join(problems))
        return "vllm", "backend: vllm in config"
    if problems:
        return "hf", "auto: " + "; ".join(problems)
    return "vllm", f"auto: vllm supports {architectures or 'this model'} and a GPU is present"


def select_engine_class(config: EngineConfig) -> type:
    import torch

    gpu = torch.cuda.is_available() and (config.device is None or config.device.startswith("cuda"))
    backend, why = choose_backend(
        config.backend, config.quantization, vllm_supported_architectures(), gpu, model_architectures(config.model)
    )
    logger.info("%s: using the %s engine (%s)", config.model, backend, why)
    if backend == "vllm":
        from deployments.engines.vllm import VLLMEngine

        return VLLMEngine
    from deployments.engines.hf import HFEngine

    return HFEngine
