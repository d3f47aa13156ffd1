"""The in-process council: routing, fan-out, merge, and degradation when the merger dies."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.config import ConfigError
from deployments.pipeline import MultiSpecializedLanguageModelPipeline, tiny_graph_config

TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."


@pytest.fixture(scope="module")
def pipe(zoo: Path):
    p = MultiSpecializedLanguageModelPipeline(tiny_graph_config(zoo))
    yield p
    p.clear_resources()


def test_single_route_answers_without_merge(pipe) -> None:
    ans = pipe.generate("What are the early symptoms of hypertension?", max_length=8, temperature=0.0)
    assert ans.routing.used == ["medical"] and not ans.routing.merged
    assert ans.completion_tokens >= 1 and set(ans.routing.timings_ms) >= {"medical", "fan_out"}


def test_two_routes_merge(pipe) -> None:
    ans = pipe.generate(TWO_DOMAIN, max_length=8, temperature=0.0)
    assert set(ans.routing.used) == {"code", "medical"} and ans.routing.merged
    assert "merge" in ans.routing.timings_ms


class _DeadMerger:
    async def synthesize(self, payload):
        raise RuntimeError("injected fault: merger down")

    async def stream(self, payload):
        raise RuntimeError("injected fault: merger down")
        yield {}


def test_dead_merger_degrades_to_best_answer(pipe) -> None:
    council = pipe.council
    real = council.merger
    council.merger = _DeadMerger()
    try:
        ans = pipe.generate(TWO_DOMAIN, max_length=8, temperature=0.0)
    finally:
        council.merger = real
    assert not ans.routing.merged
    assert ans.routing.failed["merger"] == "RuntimeError: injected fault: merger down"
    best = max(ans.routing.used, key=lambda n: ans.routing.scores[n])
    alone = pipe.generate(TWO_DOMAIN, max_length=8, temperature=0.0, model=best)
    assert ans.text == alone.text


def test_bad_config_is_a_config_error(zoo: Path) -> None:
    cfg = tiny_graph_config(zoo)
    cfg["router"]["fallback"] = "dentist"
    with pytest.raises(ConfigError, match=r"router\.fallback 'dentist'"):
        MultiSpecializedLanguageModelPipeline(cfg)


def test_build_rejects_router_domains_without_specialists(zoo: Path) -> None:
    from deployments.app import build_app

    cfg = tiny_graph_config(zoo)
    cfg["specialists"] = [s for s in cfg["specialists"] if s["name"] != "code"]
    with pytest.raises(ConfigError, match=r"router domains \['code'\] map to no configured specialist"):
        build_app(cfg)
    cfg = tiny_graph_config(zoo)
    cfg["specialists"][0]["model"] = "./does/not/exist"
    with pytest.raises(ConfigError, match=r"specialists.0.model: './does/not/exist' does not exist"):
        build_app(cfg)


def test_dead_merger_degrades_when_streaming_too(pipe) -> None:
    import asyncio

    council = pipe.council
    real = council.merger
    council.merger = _DeadMerger()
    payload = {
        "model": "auto",
        "messages": [{"role": "user", "content": TWO_DOMAIN}],
        "max_tokens": 8,
        "temperature": 0.0,
    }

    async def collect():
        return [e async for e in council.stream(payload)]

    try:
        events = asyncio.run(collect())
    finally:
        council.merger = real
    final = events[-1]
    assert final.done and not final.routing.merged
    assert final.routing.failed["merger"] == "RuntimeError: injected fault: merger down"
    best = max(final.routing.used, key=lambda n: final.routing.scores[n])
    alone = pipe.generate(TWO_DOMAIN, max_length=8, temperature=0.0, model=best)
    assert "".join(e.text for e in events) == alone.text
