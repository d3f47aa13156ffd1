"""Structured outputs: xgrammar masks keep a random-weight zoo model's greedy output valid JSON for the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from deployments.engines.structured import StructuredCompiler, StructuredOutputError, vllm_structured_outputs

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def load(zoo: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(zoo / name).eval(), AutoTokenizer.from_pretrained(zoo / name)


@pytest.fixture(scope="module")
def model_and_tokenizer(zoo: Path):
    return load(zoo, "medical")


def greedy(model, tok, processor=None, max_new: int = 200) -> str:
    """A standalone greedy loop calling the hook exactly as the engines do: once per step, generated ids only."""
    ids = tok("hello", return_tensors="pt").input_ids
    gen: list[int] = []
    past = None
    x = ids
    with torch.no_grad():
        for _ in range(max_new):
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
            if processor is not None:
                logits = processor.process(gen, logits)
            nxt = int(logits.argmax())
            gen.append(nxt)
            if nxt == tok.eos_token_id:
                break
            x = torch.tensor([[nxt]])
    if processor is not None:
        processor.process(gen, logits)  # the engine's next step would feed the last id; do it here
    return tok.decode(gen, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("model_name", "response_format", "schema"),
    [
        # Free-form JSON lets a random model write one endless string; the seeded zoo's code model closes it.
        ("code", {"type": "json_object"}, {"type": "object"}),
        ("medical", {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, PERSON),
    ],
)
def test_masked_greedy_output_parses_and_validates(zoo: Path, model_name, response_format, schema) -> None:
    model, tok = load(zoo, model_name)
    compiler = StructuredCompiler(tok, vocab_size=model.config.vocab_size)
    processor = compiler.processor(response_format)
    text = greedy(model, tok, processor)
    assert processor.finished, text  # the grammar reached its end (then EOS), not the token cap
    jsonschema.validate(json.loads(text), schema)


def test_without_the_mask_random_weights_do_not_write_json(model_and_tokenizer) -> None:
    # The control: the same loop unmasked. If this parsed, the test above would prove nothing.
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError):
        json.loads(greedy(model, tok, None))


def test_bad_schema_is_a_client_error(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    compiler = StructuredCompiler(tok, vocab_size=model.config.vocab_size)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}
    with pytest.raises(StructuredOutputError, match="json_schema"):
        compiler.processor(bad)


def test_vllm_mapping() -> None:
    assert vllm_structured_outputs(None) is None
    assert vllm_structured_outputs({"type": "text"}) is None
    assert vllm_structured_outputs({"type": "json_object"}) == {"json": {"type": "object"}}
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert vllm_structured_outputs(rf) == {"json": PERSON}
    assert vllm_structured_outputs({"type": "json_schema", "json_schema": {"name": "any"}}) == {
        "json": {"type": "object"}
    }


def test_hf_engine_constrains_one_row_of_a_mixed_batch(zoo: Path) -> None:
    """Through the real engine: the constrained row validates; its unconstrained neighbour is untouched."""
    import asyncio

    from deployments.config import EngineConfig
    from deployments.engines.base import GenerationRequest, SamplingParams
    from deployments.engines.hf import HFEngine

    engine = HFEngine(EngineConfig(model=str(zoo / "medical")))
    try:
        rf = json.dumps({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        constrained = GenerationRequest(
            prompt="hello", params=SamplingParams(temperature=0, max_new_tokens=200, response_format=rf)
        )
        free = GenerationRequest(prompt="hello", params=SamplingParams(temperature=0, max_new_tokens=12))
        alone = asyncio.run(engine.generate(free))
        both = asyncio.run(engine.generate_batch([constrained, free]))
        jsonschema.validate(json.loads(both[0].text), PERSON)
        assert both[0].finish_reason == "stop"  # the grammar ended the row, not the token cap
        assert both[1].text == alone.text  # the mask is per row
        bad = GenerationRequest(
            prompt="hello",
            params=SamplingParams(
                temperature=0,
                response_format=json.dumps(
                    {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}},
                    }
                ),
            ),
        )
        with pytest.raises(ValueError, match="json_schema"):  # EngineInputError: the service answers 400
            asyncio.run(engine.generate(bad))
    finally:
        engine.close()
