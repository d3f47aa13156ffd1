"""Tiny ada and the routing policy: learning, persistence, policy cases and hostile inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.evaluate import evaluate
from router.model import RouterInputError, TinyAda, featurize, shipped_router_path
from router.policy import RoutingPolicy
from router.train import DataError, Example, TrainConfig, read_jsonl, train_router

TOY = (
    [Example(f"apple banana fruit salad {i}", ["fruit"]) for i in range(30)]
    + [Example(f"engine wheel car garage {i}", ["car"]) for i in range(30)]
    + [Example(f"apple pie in the car {i} banana wheel", ["car", "fruit"]) for i in range(30)]
)


@pytest.fixture(scope="module")
def toy_model() -> TinyAda:
    model, _ = train_router(TOY, TOY, TrainConfig(epochs=30, seed=1, buckets=1 << 12, dim=8), progress=False)
    return model


def test_learns_separable_toy_set_perfectly(toy_model: TinyAda) -> None:
    assert toy_model.domains == ["car", "fruit"]
    report = evaluate(toy_model, TOY)
    assert report.accuracy == 1.0
    assert report.exact_match == 1.0
    assert report.multi_both_chosen == 1.0


def test_save_load_identical_scores(toy_model: TinyAda, tmp_path: Path) -> None:
    toy_model.save(tmp_path / "r")
    loaded = TinyAda.load(tmp_path / "r")
    assert loaded.domains == toy_model.domains
    assert loaded.config.thresholds == toy_model.config.thresholds
    for text in ["apple banana", "garage wheel", "something else entirely"]:
        a, b = toy_model.score(text), loaded.score(text)
        assert all(abs(a[d] - b[d]) < 2e-3 for d in a)  # fp16 storage
    assert loaded.score("apple banana") == TinyAda.load(tmp_path / "r").score("apple banana")


def test_training_is_seeded() -> None:
    cfg = TrainConfig(epochs=3, seed=7, buckets=1 << 12, dim=8)
    a, _ = train_router(TOY, TOY, cfg, progress=False)
    b, _ = train_router(TOY, TOY, cfg, progress=False)
    assert a.score("apple car") == b.score("apple car")


def test_policy_threshold_topk_and_fallback() -> None:
    policy = RoutingPolicy(thresholds={"medical": 0.5, "code": 0.3, "general": 0.9}, fallback="general", top_k=2)
    d = policy.decide({"medical": 0.8, "code": 0.35, "general": 0.1})
    assert d.specialists == ["medical", "code"] and not d.fell_back
    assert policy.decide({"medical": 0.2, "code": 0.9, "general": 0.95}).specialists == ["general", "code"]
    d = policy.decide({"medical": 0.49, "code": 0.29, "general": 0.89})
    assert d.specialists == ["general"] and d.fell_back
    one = RoutingPolicy(thresholds={}, fallback="general", top_k=1)
    assert one.decide({"medical": 0.9, "code": 0.95}).specialists == ["code"]
    mapped = RoutingPolicy(thresholds={}, fallback="g", domain_to_specialist={"medical": "doc", "bio": "doc"})
    assert mapped.decide({"medical": 0.9, "bio": 0.8}).specialists == ["doc"]  # two domains, one specialist
    pinned = RoutingPolicy.pin("code")
    assert pinned.pinned and pinned.specialists == ["code"]
    assert d.to_dict()["fell_back"] is True
    with pytest.raises(ValueError, match="top_k"):
        RoutingPolicy(thresholds={}, fallback="g", top_k=0)


@pytest.fixture(scope="module")
def shipped() -> TinyAda:
    return TinyAda.load(shipped_router_path())


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_prompt_is_clear_error(shipped: TinyAda, bad: str) -> None:
    with pytest.raises(RouterInputError, match="empty"):
        shipped.score(bad)


def test_huge_prompt_uses_bounded_prefix(shipped: TinyAda) -> None:
    huge = "def f(x): return x\n" * 60_000  # ~1 MB
    assert len(huge) > 1_000_000
    assert len(featurize(huge, shipped.config.hashing)) == len(featurize(huge[:5000], shipped.config.hashing))
    scores = shipped.score(huge)  # its latency is measured in bench/router_bench.py, not here
    assert max(scores, key=scores.get) == "code"


@pytest.mark.parametrize("text", ["¿Qué es la diabetes?", "糖尿病の症状は?", "🙂🙂🙂", "Ω≈ç√∫", "\u0000x", "a"])
def test_any_unicode_scores(shipped: TinyAda, text: str) -> None:
    scores = shipped.score(text)
    assert set(scores) == {"code", "general", "medical"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_shipped_router_is_small_and_good(shipped: TinyAda) -> None:
    size = sum(f.stat().st_size for f in shipped_router_path().iterdir())
    assert size < 5 * 1024 * 1024
    heldout = read_jsonl(Path(__file__).parents[1] / "router" / "data" / "heldout.jsonl")
    report = evaluate(shipped, heldout)
    # Floors well below the measured numbers (README): a broken artifact or featuriser fails this.
    assert report.accuracy > 0.9
    assert report.macro_f1 > 0.85


def test_bad_data_lines_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok", "labels": ["a"]}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(p)
    p.write_text(json.dumps({"text": "ok", "labels": []}) + "\n")
    with pytest.raises(DataError, match=r":1: 'labels' must be a non-empty list"):
        read_jsonl(p)


def test_cli_train_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deployments.cli import main

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "labels": e.labels}) + "\n" for e in TOY))
    assert main(["router", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "20"]) == 0
    assert (tmp_path / "r" / "router.safetensors").is_file()
    assert main(["router", "eval", "--model", str(tmp_path / "r"), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "single-label accuracy" in out and "confusion" in out
