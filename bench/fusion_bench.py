"""Does fusion earn its place? A seeded ablation on three multi-answer tasks, and the merger's memory and time.

Ablation (`python -m bench.fusion_bench`): a tiny T5 (word-level vocabulary, trained from scratch) on
three synthetic tasks whose answer needs several experts' answers:
  two-hop        one expert says which ward a patient is in, another gives each ward's door code;
                 the target is the named patient's door code (needs a fact from each answer).
  agreement      four experts give a value, two agree and two give distinct wrong values; the target
                 is the value most experts give (the first answer is right half of the time).
  contradiction  two experts say which ward a patient is in and disagree, a third gives the door codes;
                 the wrong one has a low routing score (0.05-0.3 against 0.7-1.0) and the target is the
                 code of the ward the trusted expert names. The score reaches the model only through
                 the merger's routing bias, as in production (the passages never show it).
Arms: the first answer only; FiD (every answer encoded apart, merger held at identity); FiD + merger;
FiD + depth-wise merger (DCA mix of every encoder hidden state); text concatenation (all answers in
one passage). Recipes: `full` trains everything for warm-up + main epochs; `production` starts the
merger arms from the FiD arm's warm-up checkpoint and trains only the merger for the main epochs, T5
frozen (the arms without a merger are the same runs in both recipes). Same data, epochs, batch size
and learning rate for every arm; the optimiser restarts between the two phases for every arm.

Memory (`--memory`): the merger's per-answer-block attention against the dense (B, T, T) mask it
replaced (fusion.merger.dense_reference_attention), at K = 2, 4, 8: peak RSS growth of a fresh process
during one forward, and the time of a forward.

Sliding window (`--window`): the same measurement for the per-block attention with the window off and
with `sliding_window` W (each token sees positions within +-W of the other answers), for long answers,
with PyTorch's SDPA (whose CPU kernel does not materialise the logits) and with soft-capping (explicit
logits).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import multiprocessing as mp
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from bench.common import print_table, save
from fusion.merger import AdvancedCrossAttentionMerger, MergerConfig, dense_reference_attention
from fusion.synthesizer import Answer, SynthesisRequest, Synthesizer, fid_passage
from fusion.train import FusionExample, FusionTrainConfig, train_fusion

NAMES = ["anna", "ben", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "jude", "kim", "lou"]
WARDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "lime"]
CODES = [f"c{i}" for i in range(10, 40)]  # 30 door codes
DOSES = [f"d{i}" for i in range(1, 21)]  # 20 values for the agreement task
DOMAINS = ["medical", "code", "general", "science", "legal", "math"]
# fid_passage writes "question: ... expert: ... answer: ..."; the rest are the tasks' words.
WORDS = [
    "question:",
    "expert:",
    "answer:",
    "is",
    "in",
    "ward",
    "code",
    ".",
    "door",
    "for",
    "?",
    "the",
    "dose",
    "what",
    "all",
]
TASKS = ("two-hop", "agreement", "contradiction")
ARMS = ("first answer", "FiD", "FiD + merger", "FiD + depth merger", "text concat")
MERGER_ARMS = ("FiD + merger", "FiD + depth merger")


def tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of the tasks, so a target is one token and sequences stay short."""
    vocab = list(dict.fromkeys(["<pad>", "</s>", "<unk>", *WORDS, *NAMES, *WARDS, *CODES, *DOSES, *DOMAINS]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(tok: PreTrainedTokenizerFast, d_model: int, layers: int) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=layers,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # FLAN-T5's MLP
            dropout_rate=0.0,  # short runs: dropout only slows learning here, for every arm alike
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


def _shuffled(rng: random.Random, answers: list[Answer]) -> list[Answer]:
    return rng.sample(answers, len(answers))  # position never tells which answer matters


def two_hop(rng: random.Random) -> FusionExample:
    names, wards, codes = rng.sample(NAMES, 2), rng.sample(WARDS, 2), rng.sample(CODES, 2)
    who = rng.randrange(2)
    a1 = " ".join(f"{n} is in {w} ward ." for n, w in zip(names, wards, strict=True))
    a2 = " ".join(f"{wards[i]} ward code {codes[i]} ." for i in rng.sample(range(2), 2))
    answers = _shuffled(rng, [Answer("medical", a1), Answer("code", a2)])
    return FusionExample(SynthesisRequest(f"door code for {names[who]} ?", answers), codes[who])


def agreement(rng: random.Random) -> FusionExample:
    right, wrong1, wrong2 = rng.sample(DOSES, 3)
    domains = rng.sample(DOMAINS, 4)
    answers = [Answer(d, f"the dose is {v} .") for d, v in zip(domains, [right, right, wrong1, wrong2], strict=True)]
    return FusionExample(SynthesisRequest("what dose ?", _shuffled(rng, answers)), right)


def contradiction(rng: random.Random) -> FusionExample:
    name = rng.choice(NAMES)
    good_ward, bad_ward = rng.sample(WARDS, 2)
    codes = rng.sample(CODES, 2)
    d = rng.sample(DOMAINS, 3)
    table = " ".join(
        f"{w} ward code {c} ." for w, c in rng.sample(list(zip([good_ward, bad_ward], codes, strict=True)), 2)
    )
    answers = [
        Answer(d[0], f"{name} is in {good_ward} ward .", rng.uniform(0.7, 1.0)),
        Answer(d[1], f"{name} is in {bad_ward} ward .", rng.uniform(0.05, 0.3)),
        Answer(d[2], table, rng.uniform(0.7, 1.0)),
    ]
    return FusionExample(SynthesisRequest(f"door code for {name} ?", _shuffled(rng, answers)), codes[0])


TASK_FN: dict[str, Callable[[random.Random], FusionExample]] = {
    "two-hop": two_hop,
    "agreement": agreement,
    "contradiction": contradiction,
}


def as_arm(e: FusionExample, arm: str) -> FusionExample:
    """The same example as the arm sees it."""
    r = e.request
    if arm == "first answer":
        return FusionExample(SynthesisRequest(r.query, r.answers[:1]), e.target)
    if arm == "text concat":
        text = " ".join(f"expert: {a.domain} answer: {a.text}" for a in r.answers)
        return FusionExample(SynthesisRequest(r.query, [Answer("all", text)]), e.target)
    return e


@dataclass
class Budget:
    d_model: int = 64
    enc_layers: int = 3
    train: int = 256
    test: int = 200
    warm_epochs: int = 6
    main_epochs: int = 6
    batch: int = 32
    lr: float = 3e-3


def exact_match(synth: Synthesizer, test: list[FusionExample]) -> float:
    hits = 0
    for i in range(0, len(test), 128):
        batch = test[i : i + 128]
        outs = synth.generate([e.request for e in batch], max_new_tokens=2)
        hits += sum(o.strip() == e.target for o, e in zip(outs, batch, strict=True))
    return hits / len(test)


def _train(synth: Synthesizer, data: list[FusionExample], mode: str, epochs: int, b: Budget, seed: int) -> float:
    t0 = time.perf_counter()
    cfg = FusionTrainConfig(mode=mode, epochs=epochs, lr=b.lr, batch_size=b.batch, seed=seed)
    with contextlib.redirect_stdout(io.StringIO()):  # train_fusion logs every epoch; the table is enough here
        train_fusion(synth, data, None, cfg, progress=False)
    return time.perf_counter() - t0


def _merger(arm: str, b: Budget) -> AdvancedCrossAttentionMerger:
    depth = b.enc_layers + 1 if arm == "FiD + depth merger" else 0  # every hidden state, embeddings included
    return AdvancedCrossAttentionMerger(MergerConfig(d_model=b.d_model, num_heads=4, depth_layers=depth))


def run_task_seed(task: str, seed: int, b: Budget) -> list[dict]:
    """Every arm and recipe on one task and seed; one process, one thread."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    train = [TASK_FN[task](rng) for _ in range(b.train)]
    test_rng = random.Random(1_000_000 + seed)
    test = [TASK_FN[task](test_rng) for _ in range(b.test)]
    tok = tokenizer()
    for arm in ARMS:  # a word outside the vocabulary would silently become <unk> and blunt an arm
        r = as_arm(train[0], arm).request
        for a in r.answers:
            if tok.unk_token_id in tok(fid_passage(r.query, a)).input_ids:
                raise ValueError(f"{task}/{arm}: passage has words outside the vocabulary: {fid_passage(r.query, a)!r}")
    rows = []

    def row(arm: str, recipe: str, synth: Synthesizer, secs: float, steps: int) -> dict:
        data = [as_arm(e, arm) for e in test]
        gate = float(torch.tanh(synth.merger.gate.detach()).abs().mean()) if arm in MERGER_ARMS else 0.0
        return {
            "task": task,
            "seed": seed,
            "recipe": recipe,
            "arm": arm,
            "exact_match": exact_match(synth, data),
            "train_s": secs,
            "steps": steps,
            "gate": gate,
        }

    per_epoch = -(-b.train // b.batch)
    warm_steps, main_steps = b.warm_epochs * per_epoch, b.main_epochs * per_epoch
    warm_fid = None
    for arm in ARMS:
        data = [as_arm(e, arm) for e in train]
        torch.manual_seed(seed)  # same T5 initialisation for every arm
        t5 = tiny_t5(tok, b.d_model, b.enc_layers)
        synth = Synthesizer(t5, tok, _merger(arm, b), max_answer_tokens=128)
        mode = "full" if arm in MERGER_ARMS else "fid"
        secs = _train(synth, data, mode, b.warm_epochs, b, seed)
        if arm == "FiD":
            warm_fid = (copy.deepcopy(synth.t5.state_dict()), secs)
            rows.append(row("FiD", "warm-up only", synth, secs, warm_steps))
        secs += _train(synth, data, mode, b.main_epochs, b, seed + 1)
        rows.append(row(arm, "full", synth, secs, warm_steps + main_steps))
        if arm not in MERGER_ARMS:
            rows.append({**rows[-1], "recipe": "production"})  # no merger: the production run is the same run
    # Production recipe: FiD warm-up checkpoint, T5 frozen, only the merger trains.
    assert warm_fid is not None
    for arm in MERGER_ARMS:
        t5 = tiny_t5(tok, b.d_model, b.enc_layers)
        t5.load_state_dict(warm_fid[0])
        torch.manual_seed(seed)
        synth = Synthesizer(t5, tok, _merger(arm, b), max_answer_tokens=128)
        secs = warm_fid[1] + _train(synth, train, "frozen", b.main_epochs, b, seed + 1)
        rows.append(row(arm, "production", synth, secs, warm_steps + main_steps))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample std, min-max) of exact match over seeds, per task, recipe and arm."""
    out = []
    keys = sorted({(r["task"], r["recipe"], r["arm"]) for r in rows}, key=_order)
    for task, recipe, arm in keys:
        sel = [r for r in rows if (r["task"], r["recipe"], r["arm"]) == (task, recipe, arm)]
        em = [r["exact_match"] for r in sel]
        out.append(
            {
                "task": task,
                "recipe": recipe,
                "arm": arm,
                "seeds": len(sel),
                "exact_match": statistics.fmean(em),
                "std": statistics.stdev(em) if len(em) > 1 else 0.0,
                "min": min(em),
                "max": max(em),
                "steps": sel[0]["steps"],
                "train_s": statistics.fmean(r["train_s"] for r in sel),
                "gate": statistics.fmean(r["gate"] for r in sel),
            }
        )
    return out


def _order(key: tuple[str, str, str]) -> tuple[int, int, int]:
    task, recipe, arm = key
    recipes = ["warm-up only", "production", "full"]
    return TASKS.index(task), recipes.index(recipe), ARMS.index(arm)


def _run_job(job: tuple[str, int, Budget]) -> list[dict]:
    return run_task_seed(*job)


def ablation(args: argparse.Namespace) -> None:
    b = Budget(
        d_model=args.d_model,
        enc_layers=args.enc_layers,
        train=args.train,
        test=args.test,
        warm_epochs=args.warm_epochs,
        main_epochs=args.main_epochs,
        lr=args.lr,
    )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(task, seed, b) for seed in seeds for task in args.tasks]
    runs_name = f"fusion_ablation_runs_seeds{seeds[0]}-{seeds[-1]}"
    t0 = time.perf_counter()
    rows: list[dict] = []
    # One thread per process and one process per core: tiny models are overhead-bound, so two
    # single-threaded runs side by side finish sooner than one run on two threads.
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for done in pool.imap_unordered(_run_job, jobs):
            rows += done
            save(runs_name, rows, budget=vars(b))  # a long run keeps what it finished: see --summarize
            print(f"[{time.perf_counter() - t0:6.0f}s] {done[0]['task']} seed {done[0]['seed']} done", flush=True)
    report(rows, b, time.perf_counter() - t0)


def report(rows: list[dict], b: Budget, wall: float) -> None:
    """Print the mean/spread table and write bench/results/fusion_ablation.json."""
    table = summarize(rows)
    n_seeds = len({r["seed"] for r in rows})
    show = [
        {
            "task": r["task"],
            "recipe": r["recipe"],
            "arm": r["arm"],
            "exact match (mean ± std)": f"{r['exact_match']:.3f} ± {r['std']:.3f}",
            "min-max": f"{r['min']:.3f}-{r['max']:.3f}",
            "steps": r["steps"],
            "train wall s": r["train_s"],
            "|tanh gate|": r["gate"],
        }
        for r in table
    ]
    print_table(
        f"fusion ablation: exact match on {b.test} held-out examples per seed, {n_seeds} seeds, "
        f"tiny T5 d_model={b.d_model}, {b.enc_layers} encoder layers, {b.train} training examples, "
        f"{b.warm_epochs}+{b.main_epochs} epochs" + ("" if wall != wall else f", wall {wall:.0f} s"),  # nan: merged
        show,
    )
    print("saved", save("fusion_ablation", table, runs=rows, wall_s=wall, budget=vars(b), seeds=n_seeds))


def summarize_files(paths: list[str]) -> None:
    """The table from runs saved by one or more (possibly interrupted, possibly parallel) ablations."""
    rows: list[dict] = []
    budgets = set()
    for p in paths:
        record = json.loads(Path(p).read_text())
        rows += record["rows"]
        budgets.add(json.dumps(record["meta"].get("budget", vars(Budget())), sort_keys=True))  # older files: defaults
    if len(budgets) != 1:
        raise SystemExit(f"error: the files were run with different budgets: {sorted(budgets)}")
    keys = [(r["task"], r["seed"], r["recipe"], r["arm"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit("error: the files overlap (a task and seed appears twice); pass each run once")
    b = Budget(**json.loads(budgets.pop()))
    per_epoch = -(-b.train // b.batch)
    expected = {per_epoch * b.warm_epochs, per_epoch * (b.warm_epochs + b.main_epochs)}
    if {r["steps"] for r in rows} - expected:
        raise SystemExit(f"error: step counts {sorted({r['steps'] for r in rows})} do not match the budget {b}")
    report(rows, b, wall=float("nan"))


# --- memory and time of the merger's attention ---------------------------------------------------


def _measure(
    path: str, K: int, L: int, D: int, heads: int, reps: int, window: int | None = None, softcap: float | None = None
) -> dict:
    """In a fresh process: peak RSS growth during one forward, then the median time of `reps` forwards.

    One thread, and CPU time as well as wall time: on a shared machine the wall time mostly measures
    the neighbours, the process's own CPU time much less so.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = MergerConfig(d_model=D, num_heads=heads, sliding_window=window, softcap=softcap)
    m = AdvancedCrossAttentionMerger(cfg).eval()
    with torch.no_grad():
        m.gate.fill_(0.1)
    x = torch.randn(1, K, L, D)
    mask = torch.ones(1, K, L, dtype=torch.bool)
    mask[0, 0, L // 2 :] = False  # a padded answer, so masks are really exercised
    w = torch.rand(1, K) + 0.1
    fn = (lambda: m(x, mask, w)) if path == "blocks" else (lambda: dense_reference_attention(m, x, mask, w))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wall, cpu = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {
        "peak_mb": (peak - before) / 1024,
        "ms": statistics.median(wall) * 1000,
        "cpu_ms": statistics.median(cpu) * 1000,
    }


def _measure_job(job: tuple) -> dict:
    return _measure(*job)


def memory(args: argparse.Namespace) -> None:
    D, heads = 1024, 16
    rows = []
    ctx = mp.get_context("spawn")
    for L in args.mem_lengths:
        for K in (2, 4, 8):
            res = {}
            for path in ("dense", "blocks"):
                with ctx.Pool(1) as pool:  # a fresh process: ru_maxrss is a high-water mark
                    res[path] = pool.apply(_measure_job, ((path, K, L, D, heads, args.reps),))
            T = K * L
            rows.append(
                {
                    "K": K,
                    "L": L,
                    "T=K*L": T,
                    "dense mask MB": T * T * 4 / 2**20,
                    "dense peak MB": res["dense"]["peak_mb"],
                    "blocks peak MB": res["blocks"]["peak_mb"],
                    "dense CPU ms": res["dense"]["cpu_ms"],
                    "blocks CPU ms": res["blocks"]["cpu_ms"],
                    "blocks/dense CPU": res["blocks"]["cpu_ms"] / res["dense"]["cpu_ms"],
                    "dense wall ms": res["dense"]["ms"],
                    "blocks wall ms": res["blocks"]["ms"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print_table(
        f"merger forward, B=1, D={D}, {heads} heads, one CPU thread: peak RSS growth of a fresh process "
        f"during one forward; median CPU and wall time of {args.reps} forwards",
        rows,
    )
    print("saved", save("fusion_memory", rows, reps=args.reps))


def window_bench(args: argparse.Namespace) -> None:
    D, heads, K = 1024, 16, args.window_answers
    rows = []
    ctx = mp.get_context("spawn")
    # SDPA (PyTorch's CPU kernel never materialises the logits) and soft-capping (explicit logits).
    for softcap in (None, 30.0):
        for L in args.window_lengths:
            for window in [None, *args.windows]:
                with ctx.Pool(1) as pool:  # a fresh process: ru_maxrss is a high-water mark
                    res = pool.apply(_measure_job, (("blocks", K, L, D, heads, args.reps, window, softcap),))
                rows.append(
                    {
                        "attention": "sdpa" if softcap is None else f"softcap {softcap:g}",
                        "K": K,
                        "L": L,
                        "T=K*L": K * L,
                        "window": "off" if window is None else window,
                        "keys/query": (K - 1) * (L if window is None else min(L, 2 * window + 1)),
                        "peak MB": res["peak_mb"],
                        "CPU ms": res["cpu_ms"],
                        "wall ms": res["ms"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:  # relative to the same length with the window off
        off = next(o for o in rows if (o["attention"], o["L"], o["window"]) == (r["attention"], r["L"], "off"))
        r["CPU vs off"] = r["CPU ms"] / off["CPU ms"]
        r["peak vs off"] = r["peak MB"] / off["peak MB"] if off["peak MB"] > 0 else float("nan")
    print_table(
        f"merger forward with sliding-window attention, B=1, K={K}, D={D}, {heads} heads, one CPU thread: "
        f"peak RSS growth of a fresh process during one forward; median CPU and wall time of {args.reps} forwards",
        rows,
    )
    print("saved", save("fusion_window", rows, reps=args.reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="the attention memory/time bench instead of the ablation")
    ap.add_argument("--mem-lengths", type=int, nargs="+", default=[256, 512], help="tokens per answer (--memory)")
    ap.add_argument("--window", action="store_true", help="the sliding-window memory/time bench")
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 128], help="window sizes W (--window)")
    ap.add_argument("--window-lengths", type=int, nargs="+", default=[512, 1024, 2048], help="L (--window)")
    ap.add_argument("--window-answers", type=int, default=4, help="K answers (--window)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first..first+seeds-1 (split a run)")
    ap.add_argument("--summarize", nargs="+", metavar="RUNS_JSON", help="only print the table from saved runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train", type=int, default=256, help="training examples per task and seed")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--warm-epochs", type=int, default=6)
    ap.add_argument("--main-epochs", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--enc-layers", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    if args.summarize:
        summarize_files(args.summarize)
    elif args.memory:
        memory(args)
    elif args.window:
        window_bench(args)
    else:
        ablation(args)


if __name__ == "__main__":
    main()
