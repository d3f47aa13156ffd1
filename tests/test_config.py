"""The graph config: valid files load, and each bad one fails naming the field path and bad value."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deployments.config import ConfigError, load_graph_config, parse_graph_config

GOOD = {
    "specialists": [
        {"name": "medical", "model": "/m/medical"},
        {"name": "code", "model": "/m/code", "backend": "hf", "quantization": "nf4"},
        {"name": "general", "model": "/m/general", "generation": {"temperature": 0.2}},
    ],
    "router": {"fallback": "general", "top_k": 2},
    "merger": {"model": "/m/t5"},
}


def with_change(path: list, value) -> dict:
    cfg = copy.deepcopy(GOOD)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


def test_good_config_loads() -> None:
    cfg = parse_graph_config(GOOD)
    assert [s.name for s in cfg.specialists] == ["medical", "code", "general"]
    assert cfg.specialist("code").quantization == "nf4"
    assert cfg.specialist("medical").trust_remote_code is False  # safe default
    assert cfg.groups().keys() == {"medical", "code", "general"}


@pytest.mark.parametrize(
    ("change", "field", "bad"),
    [
        ((["specialists", 0, "backend"], "tensorrt"), "specialists.0.backend", "'tensorrt'"),
        (
            (["specialists", 2, "generation", "temperature"], -0.5),
            "specialists.2.generation.temperature",
            "-0.5",
        ),
        ((["specialists", 1, "generation"], {"top_p": 0}), "specialists.1.generation.top_p", "0"),
        ((["specialists", 0, "model"], KeyError), "specialists.0.model", None),
        ((["specialists", 0, "quantization"], "fp3"), "specialists.0.quantization", "'fp3'"),
        ((["router", "fallback"], "dentist"), "<root>", "'dentist'"),
        ((["router", "top_k"], 0), "router.top_k", "0"),
        ((["specialists", 0, "name"], "Bad Name!"), "specialists.0.name", "'Bad Name!'"),
        ((["specialists", 0, "name"], "auto"), "specialists.0.name", "'auto'"),
        ((["specialists", 0, "colour"], "red"), "specialists.0.colour", "'red'"),
    ],
)
def test_bad_config_names_field_and_value(change, field: str, bad: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        parse_graph_config(with_change(*change))
    msg = str(err.value)
    assert field in msg
    if bad is not None:
        assert bad in msg


def test_duplicate_specialist_names() -> None:
    cfg = copy.deepcopy(GOOD)
    cfg["specialists"].append({"name": "code", "model": "/m/other"})
    with pytest.raises(ConfigError, match=r"duplicate specialist names: \['code'\]"):
        parse_graph_config(cfg)


def test_group_members_must_share_base() -> None:
    cfg = copy.deepcopy(GOOD)
    cfg["specialists"][0]["group"] = "shared"
    cfg["specialists"][1]["group"] = "shared"
    with pytest.raises(ConfigError, match=r"differ in.*model"):
        parse_graph_config(cfg)


def test_default_tokens_within_limit() -> None:
    bad = with_change(["specialists", 0, "generation"], {"max_new_tokens": 500, "max_new_tokens_limit": 100})
    with pytest.raises(ConfigError, match="max_new_tokens=500 exceeds max_new_tokens_limit=100"):
        parse_graph_config(bad)


def test_adapter_must_be_declared() -> None:
    bad = with_change(["specialists", 0, "adapter"], "cardio")
    with pytest.raises(ConfigError, match="adapter 'cardio' is not one of adapters"):
        parse_graph_config(bad)


def test_yaml_file_and_serve_file(tmp_path: Path) -> None:
    plain = tmp_path / "graph.yaml"
    plain.write_text(yaml.safe_dump(GOOD))
    assert load_graph_config(plain).router.fallback == "general"
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "a:b", "args": GOOD}]}))
    assert len(load_graph_config(serve_file).specialists) == 3


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("specialists: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_graph_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_graph_config(tmp_path / "nope.yaml")
