"""The cross-attention merger and the T5 synthesizer: identity, masks, options, training, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion.merger import AdvancedCrossAttentionMerger, MergerConfig
from fusion.synthesizer import Answer, SynthesisRequest, Synthesizer
from fusion.train import FusionDataError, FusionTrainConfig, read_fusion_jsonl, train_fusion

D = 32


def merger(**kw) -> AdvancedCrossAttentionMerger:
    torch.manual_seed(0)
    return AdvancedCrossAttentionMerger(MergerConfig(d_model=D, num_heads=4, **kw)).eval()


def opened(m: AdvancedCrossAttentionMerger) -> AdvancedCrossAttentionMerger:
    with torch.no_grad():
        m.gate.fill_(0.5)  # as if trained: the attention path now reaches the output
    return m


def inputs(B: int = 2, K: int = 3, L: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(B, K, L, D)
    mask = torch.ones(B, K, L, dtype=torch.bool)
    if K >= 3 and B >= 2:
        mask[0, 1, 3:] = False
        mask[1, 2, 1:] = False
    return x, mask


def test_identity_at_init_bit_for_bit() -> None:
    x, mask = inputs()
    for kw in [{}, {"num_kv_heads": 2, "qk_norm": True, "softcap": 20.0}]:
        m = merger(**kw)
        assert torch.equal(m(x, mask), x)
        assert torch.equal(m(x, mask, torch.tensor([[0.9, 0.5, 0.1], [1.0, 1.0, 1.0]])), x)


def test_k_equals_one_is_identity_even_when_trained() -> None:
    x, mask = inputs(K=1)
    out = opened(merger())(x, mask)
    assert torch.equal(out, x)
    assert torch.isfinite(out).all()


def test_padded_keys_get_no_weight() -> None:
    m = opened(merger())
    x, mask = inputs()
    base = m(x, mask)
    x2 = x.clone()
    x2[0, 1, 3:] = 1e4 * torch.randn_like(x2[0, 1, 3:])  # garbage in padded positions only
    x2[1, 2, 1:] = -1e4
    out = m(x2, mask)
    assert torch.allclose(out[mask], base[mask] + (x2 - x)[mask], atol=1e-5)  # real tokens unchanged


def test_a_token_does_not_attend_to_its_own_answer() -> None:
    m = opened(merger())
    x, mask = inputs(B=1, K=2, L=4)
    base = m(x, mask)
    x2 = x.clone()
    x2[0, 1, 0] += 1.0  # change one token of answer 1
    out = m(x2, mask)
    # Answer 0 attends to answer 1, so it moves; the other tokens of answer 1 never look at answer 1.
    assert not torch.allclose(out[0, 0], base[0, 0])
    assert torch.allclose(out[0, 1, 1:], base[0, 1, 1:], atol=1e-6)


def test_routing_weight_biases_attention() -> None:
    m = opened(merger())
    x, mask = inputs(B=1, K=3, L=4)
    mask[:] = True
    # Token of answer 0 sees answers 1 and 2; make answer 2 dominant and compare against answer 2's values.
    strong_2 = m(x, mask, torch.tensor([[1.0, 1e-3, 1.0]]))
    strong_1 = m(x, mask, torch.tensor([[1.0, 1.0, 1e-3]]))
    only_2 = m(x, mask & torch.tensor([True, False, True])[None, :, None])
    only_1 = m(x, mask & torch.tensor([True, True, False])[None, :, None])
    assert torch.allclose(strong_2[0, 0], only_2[0, 0], atol=1e-2)
    assert torch.allclose(strong_1[0, 0], only_1[0, 0], atol=1e-2)


@pytest.mark.parametrize("option", [{"num_kv_heads": 2}, {"qk_norm": True}, {"softcap": 0.5}])
def test_options_change_output_only_when_enabled(option: dict) -> None:
    x, mask = inputs()
    plain = opened(merger())(x, mask)
    with_option = opened(merger(**option))
    assert not torch.allclose(with_option(x, mask), plain, atol=1e-4)
    disabled = {k: (None if k != "qk_norm" else False) for k in option}
    assert torch.allclose(opened(merger(**disabled))(x, mask), plain)


def test_softcap_large_cap_matches_sdpa_path() -> None:
    x, mask = inputs()
    assert torch.allclose(opened(merger(softcap=1e6))(x, mask), opened(merger())(x, mask), atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    m = opened(merger(num_kv_heads=2, qk_norm=True, softcap=30.0)).train()
    x, mask = inputs()
    m(x, mask, torch.rand(2, 3) + 0.1).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_fully_padded_answer_keeps_gradients_finite() -> None:
    m = opened(merger()).train()
    x, mask = inputs()
    mask[0, 0] = False
    m(x.requires_grad_(), mask).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_shapes_name_the_shapes() -> None:
    m = merger()
    with pytest.raises(ValueError, match=r"\(B, K, L, D\), got shape \(2, 5, 32\)"):
        m(torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(B, K, L\) = \(2, 3, 5\), got \(2, 3, 4\)"):
        m(torch.randn(2, 3, 5, D), torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_model=32"):
        m(torch.randn(2, 3, 5, 16), torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        MergerConfig(d_model=D, num_heads=4, num_kv_heads=3)


def test_save_load_round_trip(tmp_path: Path) -> None:
    m = opened(merger(num_kv_heads=2, qk_norm=True))
    m.save(tmp_path / "m")
    loaded = AdvancedCrossAttentionMerger.load(tmp_path / "m").eval()
    x, mask = inputs()
    assert loaded.config == m.config
    assert torch.equal(loaded(x, mask), m(x, mask))


@pytest.fixture()
def synth(zoo: Path) -> Synthesizer:
    return Synthesizer.from_pretrained(str(zoo / "t5"), max_answer_tokens=48)


def req(q: str, *answers: str) -> SynthesisRequest:
    return SynthesisRequest(q, [Answer(d, t) for d, t in zip(["medical", "code", "general"], answers, strict=False)])


def test_synthesizer_batch_invariance(synth: Synthesizer) -> None:
    opened(synth.merger)  # a non-identity merger, so padding across answers is exercised too
    reqs = [
        req("what helps a fever?", "rest and fluids", "use a thermometer api"),
        req("hi", "hello"),
        req("explain", "a much longer answer " * 5, "short", "third answer here"),
    ]
    alone = [synth.generate([r], max_new_tokens=10)[0] for r in reqs]
    batched = synth.generate(reqs, max_new_tokens=10)
    assert batched == alone


def test_long_answer_is_truncated_not_dropped(synth: Synthesizer) -> None:
    _, mask = synth.encode([req("q", "word " * 1000, "short")])
    per_answer = mask.view(1, 2, -1).sum(-1)
    assert per_answer[0, 0] == 48  # the budget, not zero
    assert per_answer[0, 1] > 0


def test_untrained_merger_is_plain_fid(synth: Synthesizer) -> None:
    from transformers.modeling_outputs import BaseModelOutput

    r = req("what helps a fever?", "rest and fluids", "drink water")
    fused, mask = synth.encode([r])
    enc = synth.tokenizer(
        [f"question: {r.query} expert: {a.domain} answer: {a.text}" for a in r.answers],
        padding=True,
        return_tensors="pt",
    )
    plain = synth.t5.encoder(**enc).last_hidden_state  # (K, L, D)
    assert torch.equal(fused.view(2, -1, plain.shape[-1])[mask.view(2, -1)], plain[enc.attention_mask.bool()])
    out = synth.t5.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=plain.reshape(1, -1, plain.shape[-1])),
        attention_mask=enc.attention_mask.reshape(1, -1),
        max_new_tokens=8,
        do_sample=False,
    )
    assert synth.generate([r], max_new_tokens=8)[0] == synth.tokenizer.decode(out[0], skip_special_tokens=True)


def test_training_lowers_loss_and_saves(synth: Synthesizer, tmp_path: Path) -> None:
    from fusion.train import FusionExample

    data = [FusionExample(req(f"q{i}", f"alpha {i}", f"beta {i}"), f"alpha {i} beta") for i in range(8)]
    for mode in ("full",):
        hist = train_fusion(
            synth, data, data, FusionTrainConfig(mode=mode, epochs=6, lr=3e-3, batch_size=4), progress=False
        )
        assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert synth.merger.gate.abs().sum() > 0  # the merger moved away from identity
    synth.merger.save(tmp_path / "m")
    assert AdvancedCrossAttentionMerger.load(tmp_path / "m").gate.abs().sum() > 0


def test_frozen_mode_trains_only_the_merger(synth: Synthesizer) -> None:
    from fusion.train import FusionExample

    before = {k: v.clone() for k, v in synth.t5.state_dict().items()}
    data = [FusionExample(req("q", "a", "b"), "a b") for _ in range(4)]
    hist = train_fusion(synth, data, data, FusionTrainConfig(mode="frozen", epochs=3, lr=1e-2), progress=False)
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert all(torch.equal(before[k], v) for k, v in synth.t5.state_dict().items())


def test_bad_fusion_data_names_line(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    good = {"query": "q", "answers": [{"domain": "medical", "text": "a"}], "target": "t"}
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answers": []}) + "\n")
    with pytest.raises(FusionDataError, match=r"f.jsonl:2: 'answers' must be a non-empty list"):
        read_fusion_jsonl(p)
    p.write_text(json.dumps({**good, "answers": [{"domain": "x", "text": "a", "weight": -1}]}) + "\n")
    with pytest.raises(FusionDataError, match=r":1: answers\[0\].weight must be > 0"):
        read_fusion_jsonl(p)
    assert len(read_fusion_jsonl(_write(tmp_path / "ok.jsonl", good))) == 1


def _write(p: Path, row: dict) -> Path:
    p.write_text(json.dumps(row) + "\n")
    return p


def test_fusion_cli_trains_and_merger_service_loads_by_path(zoo: Path, tmp_path: Path) -> None:
    import asyncio

    from deployments.cli import main
    from deployments.config import MergerConfig as MergerDeploymentConfig
    from deployments.merger import MergerService

    rows = [
        {
            "query": f"q{i}",
            "answers": [{"domain": "medical", "text": f"alpha {i}"}, {"domain": "code", "text": f"beta {i}"}],
            "target": f"alpha {i} beta",
        }
        for i in range(8)
    ]
    data = tmp_path / "f.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "merger"
    assert (
        main(
            [
                "fusion",
                "train",
                "--model",
                str(zoo / "t5"),
                "--data",
                str(data),
                "--val",
                str(data),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--lr",
                "1e-2",
            ]
        )
        == 0
    )
    trained = AdvancedCrossAttentionMerger.load(out)
    assert trained.gate.abs().sum() > 0
    service = MergerService(MergerDeploymentConfig(model=str(zoo / "t5"), merger_weights=str(out), max_new_tokens=4))
    assert torch.equal(service.synth.merger.gate, trained.gate)
    result = asyncio.run(service.synthesize({"query": "q1", "answers": rows[1]["answers"], "max_tokens": 4}))
    assert result["completion_tokens"] >= 1 and result["synthesis"] == "fusion"


# --- depth-wise (DCA-style) merger input and the per-answer-block attention (issue 16) ---

OPTION_SETS = [
    {},
    {"num_kv_heads": 2},
    {"qk_norm": True},
    {"softcap": 0.5},
    {"num_kv_heads": 2, "qk_norm": True, "softcap": 20.0},
    {"routing_bias": False},
]


def depth_inputs(x: torch.Tensor, n: int = 3) -> torch.Tensor:
    """n hidden states whose last is x; earlier ones at another scale, like T5's raw residual stream."""
    torch.manual_seed(2)
    return torch.stack([*(torch.randn_like(x) * (3.0 + i) for i in range(n - 1)), x])  # (N, B, K, L, D)


def spread_depth(m: AdvancedCrossAttentionMerger) -> AdvancedCrossAttentionMerger:
    """Move the depth mix off the last layer, as training would."""
    with torch.no_grad():
        m.depth.static.add_(0.3 * torch.randn_like(m.depth.static))
        m.depth.dynamic.add_(0.3 * torch.randn_like(m.depth.dynamic))
        for norm in m.depth.norms:
            norm.weight.add_(0.1 * torch.randn_like(norm.weight))
    return m


@pytest.mark.parametrize("kw", OPTION_SETS)
def test_block_attention_equals_dense_mask_path(kw: dict) -> None:
    from fusion.merger import dense_reference_attention

    m = opened(merger(**kw))
    x, mask = inputs(B=3, K=4, L=5)
    mask[0, 1, 3:] = False  # padding inside an answer
    mask[1, 2] = False  # an absent answer
    mask[2, 1:] = False  # only one answer present: its tokens have nothing to attend to
    w = torch.tensor([[0.9, 0.5, 0.1, 0.7], [1.0, 1.0, 1.0, 1.0], [0.2, 0.3, 0.4, 0.5]])
    for weights in (None, w):
        ref = dense_reference_attention(m, x, mask, weights)
        out = m(x, mask, weights)
        assert torch.allclose(out, ref, atol=1e-6, rtol=0), (kw, (out - ref).abs().max())
        assert not torch.allclose(out, x)  # the attention path really contributes
        assert torch.equal(out[2, 0], x[2, 0])  # the only real answer has nothing to read: left as it is


def test_depth_off_keeps_the_merger_unchanged() -> None:
    # Same parameters, same initial values and same checkpoint keys as a merger without the option:
    # old merger directories load, and the depth-off path has no new code in it.
    m = merger()
    assert m.depth is None
    assert set(m.state_dict()) == {"norm.weight", "wq.weight", "wk.weight", "wv.weight", "wo.weight", "gate"}
    on = merger(depth_layers=3)
    for k, v in m.state_dict().items():
        assert torch.equal(on.state_dict()[k], v), k


@pytest.mark.parametrize("kw", OPTION_SETS[:1] + OPTION_SETS[4:5])
def test_identity_at_init_with_depth(kw: dict) -> None:
    x, mask = inputs()
    layers = depth_inputs(x)
    m = merger(depth_layers=3, **kw)
    assert torch.equal(m(x, mask, None, layers), x)
    assert torch.equal(m(x, mask, torch.tensor([[0.9, 0.5, 0.1], [1.0, 1.0, 1.0]]), layers), x)
    # With the gate open, the untrained depth mix is exactly the last layer: the same output as depth off.
    opened(m)
    off = opened(merger(**kw))
    assert torch.equal(m(x, mask, None, layers), off(x, mask))


def test_depth_mix_reads_earlier_layers_once_trained() -> None:
    x, mask = inputs()
    layers = depth_inputs(x)
    m = spread_depth(opened(merger(depth_layers=3)))
    base = m(x, mask, None, layers)
    assert not torch.allclose(base, opened(merger())(x, mask))
    moved = layers.clone()
    moved[0] += 1.0  # change only the earliest hidden state
    assert not torch.allclose(m(x, mask, None, moved), base)


def test_depth_needs_layers_of_the_right_shape() -> None:
    m = merger(depth_layers=3)
    x, mask = inputs()
    with pytest.raises(
        ValueError, match=r"depth_layers=3 needs layers of shape \(N, B, K, L, D\) = \(3, 2, 3, 5, 32\)"
    ):
        m(x, mask)
    with pytest.raises(ValueError, match=r"got \(2, 2, 3, 5, 32\)"):
        m(x, mask, None, depth_inputs(x, n=2))
    with pytest.raises(ValueError, match=r"depth_layers must be 0 .* got 1"):
        MergerConfig(d_model=D, num_heads=4, depth_layers=1)


def test_gradients_reach_every_depth_parameter() -> None:
    m = spread_depth(opened(merger(depth_layers=3, num_kv_heads=2, qk_norm=True, softcap=30.0))).train()
    x, mask = inputs()
    m(x, mask, torch.rand(2, 3) + 0.1, depth_inputs(x)).pow(2).sum().backward()
    names = [n for n, _ in m.named_parameters()]
    assert {"depth.static", "depth.dynamic", "depth.norms.0.weight", "depth.norms.1.weight"} <= set(names)
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_depth_save_load_round_trip(tmp_path: Path) -> None:
    m = spread_depth(opened(merger(depth_layers=3, num_kv_heads=2)))
    m.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "merger.json").read_text())["depth_layers"] == 3
    loaded = AdvancedCrossAttentionMerger.load(tmp_path / "m").eval()
    assert loaded.config == m.config
    x, mask = inputs()
    layers = depth_inputs(x)
    assert torch.equal(loaded(x, mask, None, layers), m(x, mask, None, layers))


def test_synthesizer_depth_untrained_is_plain_fid_and_trains(synth: Synthesizer, tmp_path: Path) -> None:
    from fusion.train import FusionExample

    depth = Synthesizer(synth.t5, synth.tokenizer, max_answer_tokens=48, depth_layers=3).eval()  # 2 layers + emb
    reqs = [req("what helps a fever?", "rest and fluids", "drink water"), req("hi", "hello", "hey", "yo")]
    assert torch.equal(depth.encode(reqs)[0], synth.encode(reqs)[0])  # identity at init, bit for bit
    assert depth.generate(reqs, max_new_tokens=6) == synth.generate(reqs, max_new_tokens=6)

    # Training the depth-wise merger alone (T5 frozen, the production recipe) lowers the loss and
    # moves the depth mix off the last layer.
    data = [FusionExample(req(f"q{i}", f"alpha {i}", f"beta {i}"), f"alpha {i} beta") for i in range(8)]
    hist = train_fusion(depth, data, data, FusionTrainConfig(mode="frozen", epochs=4, lr=1e-2), progress=False)
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    static = depth.merger.depth.static.detach()
    assert static[:, :-1].abs().sum() > 0
    depth.merger.save(tmp_path / "m")
    reloaded = Synthesizer(synth.t5, synth.tokenizer, AdvancedCrossAttentionMerger.load(tmp_path / "m"), 48).eval()
    assert torch.equal(reloaded.encode(reqs)[0], depth.encode(reqs)[0])


def test_depth_layers_bounds_name_the_value(zoo: Path) -> None:
    from pydantic import ValidationError

    from deployments.config import MergerConfig as MergerDeploymentConfig

    with pytest.raises(ValidationError, match="depth_layers"):
        MergerDeploymentConfig(model=str(zoo / "t5"), depth_layers=1)
    with pytest.raises(ValueError, match=r"depth_layers=9 exceeds the 3 hidden states"):
        Synthesizer.from_pretrained(str(zoo / "t5"), depth_layers=9)
    # The deployment's field reaches the merger the service builds.
    from deployments.merger import MergerService

    service = MergerService(MergerDeploymentConfig(model=str(zoo / "t5"), depth_layers=3, max_new_tokens=4))
    assert service.synth.merger.config.depth_layers == 3


# ---- sliding-window attention ---------------------------------------------------------------------

WINDOW_BASE = "e212ff6"  # the last commit before the sliding-window option: its merger is the reference when off


def long_inputs(B: int = 3, K: int = 4, L: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    x = torch.randn(B, K, L, D)
    mask = torch.ones(B, K, L, dtype=torch.bool)
    mask[0, 1, 10:] = False  # a short answer: late tokens of the others find nothing of it in their window
    mask[0, 2, 4:] = False
    mask[1, 3] = False  # an absent answer
    mask[2, 1:] = False  # one answer only: nothing to read anywhere
    w = torch.tensor([[0.9, 0.5, 0.1, 0.7], [1.0, 1.0, 1.0, 1.0], [0.2, 0.3, 0.4, 0.5]])
    return x, mask, w


@pytest.mark.parametrize("kw", OPTION_SETS)
def test_sliding_window_equals_dense_band_mask(kw: dict) -> None:
    from fusion.merger import dense_reference_attention

    x, mask, w = long_inputs()
    dense = opened(merger(**kw))
    for window in (1, 5):
        m = opened(merger(sliding_window=window, **kw))
        for weights in (None, w):
            ref = dense_reference_attention(m, x, mask, weights)  # explicit (T, T) mask with the |i - p| <= W band
            out = m(x, mask, weights)
            assert torch.allclose(out, ref, atol=1e-6, rtol=0), (window, kw, (out - ref).abs().max())
            assert not torch.allclose(out, dense(x, mask, weights), atol=1e-4)  # the window really restricts
            assert torch.equal(out[2, 0], x[2, 0])  # the only real answer has nothing to read
        # Answers 1 and 2 of batch 0 end at positions 10 and 4, answer 3 has all 16: answer 0's last token
        # sees positions 15-W..15 of the others, so with W <= 5 only answer 3 counts for it.
        solo = mask.clone()
        solo[0, 1:3] = False
        assert torch.allclose(m(x, mask)[0, 0, 15], m(x, solo)[0, 0, 15], atol=1e-6)


def test_sliding_window_isolated_query_keeps_its_input() -> None:
    """A query whose window holds no real token of another answer is left as it is (no NaN)."""
    m = opened(merger(sliding_window=2))
    x = torch.randn(1, 2, 20, D)
    mask = torch.ones(1, 2, 20, dtype=torch.bool)
    mask[0, 1, 5:] = False  # answer 1 has 5 tokens; answer 0's tokens 7.. see nothing within 2 positions
    out = m(x, mask)
    assert torch.equal(out[0, 0, 7:], x[0, 0, 7:]) and not torch.allclose(out[0, 0, :7], x[0, 0, :7])
    assert torch.isfinite(out).all()


def test_sliding_window_covering_the_answer_is_no_window() -> None:
    x, mask, w = long_inputs(L=10)
    for window in (9, 50):  # |i - p| <= L - 1 always holds
        assert torch.equal(opened(merger(sliding_window=window))(x, mask, w), opened(merger())(x, mask, w))


def test_sliding_window_off_is_the_merger_before_it_bit_for_bit(tmp_path: Path) -> None:
    """With the window off, the output is exactly what the merger computed before the option existed."""
    import importlib.util
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{WINDOW_BASE}:fusion/merger.py"], cwd=repo, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with commit {WINDOW_BASE} is not available (e.g. a shallow clone)")
    path = tmp_path / "merger_before_window.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("merger_before_window", path)
    before = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = before
    spec.loader.exec_module(before)
    x, mask, w = long_inputs()
    for kw in [*OPTION_SETS, {"depth_layers": 3}]:
        torch.manual_seed(0)
        old = before.AdvancedCrossAttentionMerger(before.MergerConfig(d_model=D, num_heads=4, **kw)).eval()
        new = merger(**kw)
        assert new.state_dict().keys() == old.state_dict().keys()
        assert all(torch.equal(new.state_dict()[k], v) for k, v in old.state_dict().items())
        opened(old), opened(new)
        layers = depth_inputs(x) if kw.get("depth_layers") else None
        for weights in (None, w):
            assert torch.equal(new(x, mask, weights, layers), old(x, mask, weights, layers)), kw


def test_sliding_window_adds_no_parameters_and_round_trips(tmp_path: Path) -> None:
    assert MergerConfig(d_model=D).sliding_window is None  # off by default
    on, off = merger(sliding_window=4), merger()
    assert on.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(on.state_dict()[k], v) for k, v in off.state_dict().items())
    x, mask, _ = long_inputs()
    loaded = AdvancedCrossAttentionMerger.load(opened(on).save(tmp_path / "m"))
    assert loaded.config.sliding_window == 4 and torch.equal(loaded(x, mask), on(x, mask))
    cfg = json.loads((tmp_path / "m" / "merger.json").read_text())
    del cfg["sliding_window"]  # a merger saved before the option existed
    (tmp_path / "m" / "merger.json").write_text(json.dumps(cfg))
    assert AdvancedCrossAttentionMerger.load(tmp_path / "m").config.sliding_window is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_sliding_window_bad_values_name_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"sliding_window must be None \(off\) or an integer >= 1.*got {bad!r}"):
        MergerConfig(d_model=D, sliding_window=bad)


def test_sliding_window_trains() -> None:
    m = opened(merger(sliding_window=2, num_kv_heads=2, qk_norm=True, dropout=0.1)).train()
    x, mask, w = long_inputs()
    m(x, mask, w).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_synthesizer_and_serve_config_take_a_sliding_window(synth: Synthesizer, zoo: Path) -> None:
    from deployments.config import ConfigError, parse_graph_config
    from deployments.config import MergerConfig as ServeMergerConfig

    windowed = Synthesizer(synth.t5, synth.tokenizer, None, max_answer_tokens=48, sliding_window=3)
    assert windowed.merger.config.sliding_window == 3
    r = req("explain", "a much longer answer " * 5, "short", "third answer here")
    assert torch.equal(windowed.encode([r])[0], synth.encode([r])[0])  # untrained: identity with or without
    with pytest.raises(ValueError, match="sliding_window must be None"):
        Synthesizer(synth.t5, synth.tokenizer, None, sliding_window=0)
    assert ServeMergerConfig(model="m", sliding_window=64).sliding_window == 64
    args = {
        "specialists": [{"name": "general", "model": str(zoo / "general")}],
        "router": {"fallback": "general"},
        "merger": {"model": str(zoo / "t5"), "sliding_window": 0},
    }
    with pytest.raises(ConfigError, match=r"merger\.sliding_window"):
        parse_graph_config(args)
