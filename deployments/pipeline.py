"""MultiSpecializedLanguageModelPipeline: the same council in one process, with no Ray."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from deployments.config import GraphConfig, load_graph_config, parse_graph_config
from deployments.council import Council, CouncilAnswer, load_router
from deployments.merger import MergerService
from deployments.specialist import SpecialistGroup

logger = logging.getLogger(__name__)

REPO_TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zoo.yaml"


def default_zoo_dir() -> Path:
    return Path(os.environ.get("CONSILIUM_ZOO", Path.home() / ".cache" / "consilium" / "zoo"))


def tiny_graph_config(zoo: Path) -> dict[str, Any]:
    """The embedded default graph over a zoo directory (built on first use)."""
    if not (zoo / "zoo.json").is_file():
        from deployments.models.zoo import build_zoo

        logger.info("building the tiny model zoo in %s (seconds)", zoo)
        build_zoo(zoo)
    return {
        "specialists": [
            {"name": name, "model": str(zoo / name), "generation": {"temperature": 0.7, "max_new_tokens": 64}}
            for name in ("medical", "code", "general")
        ],
        "router": {"fallback": "general", "top_k": 2},
        "merger": {"model": str(zoo / "t5"), "max_new_tokens": 64},
    }


class LocalSpecialists:
    """SpecialistClient over in-process SpecialistGroups."""

    def __init__(self, groups: dict[str, SpecialistGroup], group_of: dict[str, str]) -> None:
        self.groups, self.group_of = groups, group_of

    async def generate(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.groups[self.group_of[name]].generate(payload)

    async def stream(self, name: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.groups[self.group_of[name]].stream(payload):
            yield item


class MultiSpecializedLanguageModelPipeline:
    """Route a query to specialists, generate, and merge, all in this process.

    models_config: a GraphConfig, a dict, or a YAML path; None builds the tiny zoo and uses it.
    device: overrides every specialist's and the merger's device ("cpu", "cuda:0", ...).
    """

    def __init__(
        self, models_config: GraphConfig | dict[str, Any] | str | Path | None = None, device: str | None = None
    ) -> None:
        if models_config is None:
            config = parse_graph_config(tiny_graph_config(default_zoo_dir()), source="<tiny default>")
        elif isinstance(models_config, GraphConfig):
            config = models_config
        elif isinstance(models_config, (str, Path)):
            config = load_graph_config(models_config)
        else:
            config = parse_graph_config(models_config)
        if device is not None:
            config = config.model_copy(deep=True)
            for s in config.specialists:
                s.device = device
            config.merger.device = device
        self.config = config
        router, policy = load_router(config)
        self._groups = {g: SpecialistGroup(members) for g, members in config.groups().items()}
        group_of = {s.name: g for g, members in config.groups().items() for s in members}
        self._merger = MergerService(config.merger)
        self.council: Council | None = Council(
            config, LocalSpecialists(self._groups, group_of), self._merger, router=router, policy=policy
        )
        self.last_answer: CouncilAnswer | None = None

    def _require(self) -> Council:
        if self.council is None:
            raise RuntimeError("this pipeline's resources were cleared; create a new pipeline")
        return self.council

    def route(self, query: str) -> list[str]:
        """The specialists the router picks for this query (the Serve graph picks the same)."""
        return self._require().decide("auto", query).specialists

    def generate(
        self, query: str, max_length: int = 512, temperature: float = 0.7, top_p: float = 0.9, model: str = "auto"
    ) -> CouncilAnswer:
        """The full answer with routing details and token counts."""
        council = self._require()
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": query}],
            "max_tokens": max_length,
            "temperature": temperature,
            "top_p": top_p,
        }
        self.last_answer = asyncio.run(council.answer(payload))
        return self.last_answer

    def generate_response(self, query: str, max_length: int = 512, temperature: float = 0.7, top_p: float = 0.9) -> str:
        """The original design's API: the council's answer as text."""
        return self.generate(query, max_length=max_length, temperature=temperature, top_p=top_p).text

    def clear_resources(self) -> None:
        """Free every model; calling it twice is harmless."""
        for group in self._groups.values():
            group.close()
        self._groups = {}
        self.council = None
        self._merger = None  # type: ignore[assignment]
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
