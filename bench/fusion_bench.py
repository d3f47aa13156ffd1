"""Does fusion learn? Three arms on a two-hop task, plus merger forward time vs one plain SDPA call.

Task ("ward door codes"): the medical expert's answer says which ward each of three patients is in;
the code expert's answer gives the door code of each of three wards. The query asks for the door code
a named patient needs, so the right output needs a fact from each answer. Names, wards and codes are
drawn afresh for every example, so nothing can be memorised: the model has to join the two answers.
Arms (same tiny T5 from scratch, same steps, same seed): one answer only; FiD without merger
(merger held at identity); FiD with the merger.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

from bench.common import print_table, save
from deployments.models.zoo import t5_tokenizer, tiny_t5
from fusion.merger import AdvancedCrossAttentionMerger, MergerConfig
from fusion.synthesizer import Answer, SynthesisRequest, Synthesizer
from fusion.train import FusionExample, FusionTrainConfig, train_fusion

NAMES = ["anna", "ben", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "jude", "kim", "lou"]
WARDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "lime"]


def example(rng: random.Random, one_answer: bool, facts: int = 3) -> FusionExample:
    names = rng.sample(NAMES, facts)
    wards = rng.sample(WARDS, facts)
    codes = [str(rng.randint(10, 99)) for _ in wards]
    who = rng.randrange(facts)
    a1 = " ".join(f"{n} is in {w} ward." for n, w in zip(names, wards, strict=True))
    order = rng.sample(range(facts), facts)  # the second answer lists wards in another order
    a2 = " ".join(f"{wards[i]} ward code {codes[i]}." for i in order)
    answers = [Answer("medical", a1)] if one_answer else [Answer("medical", a1), Answer("code", a2)]
    return FusionExample(SynthesisRequest(f"door code for {names[who]}?", answers), codes[who])


def run_arm(arm: str, train_n: int, test_n: int, epochs: int, seed: int, facts: int, lr: float) -> dict:
    rng = random.Random(seed)
    one = arm == "one answer"
    train = [example(rng, one, facts) for _ in range(train_n)]
    test = [example(random.Random(10_000 + i), one, facts) for i in range(test_n)]
    torch.manual_seed(seed)
    tok = t5_tokenizer(0)
    t5 = tiny_t5(tok, d_model=128)
    synth = Synthesizer(t5, tok, AdvancedCrossAttentionMerger(MergerConfig(d_model=128, num_heads=4)), 96)
    mode = "fid" if arm != "FiD + merger" else "full"
    t0 = time.perf_counter()
    hist = train_fusion(
        synth,
        train,
        test[:64],
        FusionTrainConfig(mode=mode, epochs=epochs, lr=lr, batch_size=32, seed=seed),
        progress=False,
    )
    secs = time.perf_counter() - t0
    hits = 0
    for i in range(0, len(test), 64):
        batch = test[i : i + 64]
        outs = synth.generate([e.request for e in batch], max_new_tokens=6)
        hits += sum(o.strip() == e.target for o, e in zip(outs, batch, strict=True))
    return {
        "arm": arm,
        "exact_match": hits / len(test),
        "final_val_loss": hist[-1]["val_loss"],
        "train_s": secs,
        "merger_gate_mean": float(synth.merger.gate.detach().abs().mean()),
    }


def _ms(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def time_merger(K: int, L: int = 256, D: int = 1024, heads: int = 16, reps: int = 5) -> dict:
    """Merger forward vs one plain SDPA call over the same tokens, and vs nn.MultiheadAttention
    (which, like the merger, has the four D x D projections that plain SDPA lacks)."""
    torch.manual_seed(0)
    m = AdvancedCrossAttentionMerger(MergerConfig(d_model=D, num_heads=heads)).eval()
    with torch.no_grad():
        m.gate.fill_(0.1)
    x = torch.randn(1, K, L, D)
    mask = torch.ones(1, K, L, dtype=torch.bool)
    q = torch.randn(1, heads, K * L, D // heads)
    flat = x.view(1, K * L, D)
    mha = torch.nn.MultiheadAttention(D, heads, batch_first=True).eval()
    with torch.inference_mode():
        merger_ms = _ms(lambda: m(x, mask), reps)
        sdpa_ms = _ms(lambda: F.scaled_dot_product_attention(q, q, q), reps)
        mha_ms = _ms(lambda: mha(flat, flat, flat, need_weights=False), reps)
    return {
        "K": K,
        "tokens": K * L,
        "merger_ms": merger_ms,
        "plain_sdpa_ms": sdpa_ms,
        "mha_ms": mha_ms,
        "merger/sdpa": merger_ms / sdpa_ms,
        "merger/mha": merger_ms / mha_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--facts", type=int, default=3, help="patients (and wards) per example")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true")
    args = ap.parse_args()
    if args.timing_only:
        timing = [time_merger(K) for K in (2, 4, 8)]
        print_table("merger forward, L=256 per answer, D=1024, 16 heads, CPU", timing)
        print("saved", save("fusion_timing", timing))
        return
    rows = []
    for arm in ("one answer", "FiD, no merger", "FiD + merger"):
        rows.append(run_arm(arm, args.train, args.test, args.epochs, args.seed, args.facts, args.lr))
        print("arm done:", json.dumps(rows[-1]), flush=True)  # a long run keeps what it finished
    print_table(
        f"two-hop fusion task, {args.facts} facts per answer: exact match on {args.test} held-out examples "
        "(chance ~ 1/90)",
        rows,
    )
    timing = [] if args.skip_timing else [time_merger(K) for K in (2, 4, 8)]
    if timing:
        print_table(
            "merger forward, L=256 per answer, D=1024, 16 heads, CPU (plain SDPA: one call, same tokens)", timing
        )
    print("saved", save(f"fusion_facts{args.facts}", rows + timing, **vars(args)))


if __name__ == "__main__":
    main()
