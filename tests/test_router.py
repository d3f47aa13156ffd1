"""Tiny ada and the routing policy: learning, persistence, policy cases and hostile inputs."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import numpy as np
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
    assert TinyAda.load(tmp_path / "r").config.hashing.one_word  # on by default (eighth round)
    main(["router", "train", "--data", str(data), "--out", str(tmp_path / "off"), "--epochs", "1", "--no-one-word"])
    assert not TinyAda.load(tmp_path / "off").config.hashing.one_word
    with pytest.raises(SystemExit, match=r"clean_pools must be in \[0, 1\) \(0: off\), got 1.5"):
        main(["router", "train", "--data", str(data), "--out", str(tmp_path / "bad"), "--clean-pools", "1.5"])
    for value in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit, match=rf"nb_alpha must be a finite number >= 0 \(0: off\), got {value}"):
            main(["router", "train", "--data", str(data), "--out", str(tmp_path / "bad"), "--nb-alpha", value])
    for value in ("0", "-2", "nan", "inf"):
        with pytest.raises(SystemExit, match=rf"c must be a finite number > 0, got {value}"):
            main(["router", "train", "--data", str(data), "--out", str(tmp_path / "bad"), "--c", value])


# ---- the shipped router on real prompts (router/data/SOURCES.md)

CANARIES = {
    "general": [
        "What is the capital of France?",
        "Write a short story about a dragon who learns to fly.",
        "Plan a three-day trip to Rome on a budget.",
        "Give me ten name ideas for a bakery.",
        "How do I get red wine out of a carpet?",
        "What's the difference between a Roth IRA and a traditional IRA?",
        "Set an alarm for 7 am tomorrow.",
        "Who won the World Cup in 2018?",
        "Explain why the sky is blue.",
        "Write a thank-you email to my coworker for covering my shift.",
        "Brainstorm five themes for a company holiday party.",
        "Explain the rules of cricket to a beginner.",
    ],
    "medical": [
        "Can type 2 diabetes be cured?",
        "Is it safe to take ibuprofen while pregnant?",
        "What are the symptoms of strep throat?",
        "How long does the flu last?",
        "My child has had a fever of 39C for two days, should I see a doctor?",
        "What is the usual dose of amoxicillin for an adult with a sinus infection?",
        "What causes high blood pressure?",
        "Can you get shingles twice?",
        "Is it safe to take melatonin every night?",
        "what is metoprolol used for",
    ],
    "code": [
        "Write a Python function that reverses a linked list.",
        "How do I undo the last git commit?",
        "Why does my JavaScript fetch call return a pending promise?",
        "SQL query to find duplicate rows in a table",
        "How do I center a div with CSS?",
        "Fix this error: TypeError: 'NoneType' object is not subscriptable",
        "find all .txt files modified in the last 7 days in bash",
        "What is the difference between a list and a tuple in Python?",
        "How do I read a CSV file with pandas?",
        "My React component re-renders in an infinite loop",
    ],
}


# Misses measured with the shipped artifact, kept visible (strict: the test fails once they route right).
KNOWN_MISSES: dict[str, str] = {}


@pytest.mark.parametrize(
    ("domain", "text"),
    [
        pytest.param(d, t, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[t])] if t in KNOWN_MISSES else [])
        for d, ts in CANARIES.items()
        for t in ts
    ],
)
def test_shipped_router_routes_canaries(shipped: TinyAda, domain: str, text: str) -> None:
    from router.evaluate import routed_top1

    top, _ = routed_top1(shipped.score(text), shipped.config.thresholds, "general")
    assert top == domain, (text, shipped.score(text))


def _heldout_slice(per_source: int = 120) -> list[Example]:
    """Every k-th prompt of each held-out source: whole sources that training never saw."""
    from router.data import CORPUS_DIR

    rows = [ex for ex in read_jsonl(CORPUS_DIR / "heldout.jsonl.gz") if ex.source != "handwritten"]
    by: dict[str, list[Example]] = {}
    for ex in rows:
        by.setdefault(ex.source, []).append(ex)
    return [ex for exs in by.values() for ex in exs[:: max(1, len(exs) // per_source)][:per_source]]


def test_shipped_router_on_unseen_sources(shipped: TinyAda) -> None:
    from router.data import CORPUS_DIR

    train_sources = {ex.source for ex in read_jsonl(CORPUS_DIR / "val.jsonl.gz")}
    sample = _heldout_slice()
    assert {ex.source for ex in sample}.isdisjoint(train_sources)  # source-disjoint by construction
    report = evaluate(shipped, sample, timing=False)
    # Floors a little under the bench's full held-out numbers (docs/router-data.md): a broken
    # featuriser, artifact or threshold calibration falls far below them.
    assert report.accuracy > 0.83, report.render()
    assert report.macro_f1 > 0.83, report.render()
    assert min(m["recall"] for m in report.per_domain.values()) > 0.72, report.render()


# Written before any of them was scored (seventh round); none is in the corpus in this form or needs to be.
CHIT_CHAT = [
    *("hi", "hello", "hello there", "hey", "good morning", "good night", "thanks!", "thank you so much"),
    *("ok", "okay", "lol", "bye", "see you later", "how are you?", "how's it going", "tell me a joke"),
    *("what's your name?", "are you a bot?", "who made you?", "nice to meet you", "yes", "no", "maybe"),
    *("cool", "great, thanks", "what can you do?", "help", "sorry", "I'm bored", "good job"),
]


def test_shipped_router_sends_chit_chat_to_general(shipped: TinyAda) -> None:
    """Small talk goes to general alone. The sixth round's artifact sent 8 of these 30 elsewhere (`hi` and
    `ok` to medical, `lol`, `no`, `help` to code), the seventh 3 (`lol`, `help`, `good job`); the eighth
    round's one-word feature leaves 1 (`good job`), so a regression fails here."""
    from router.policy import RoutingPolicy

    policy = RoutingPolicy(thresholds=shipped.config.thresholds, fallback="general")
    astray = {t: policy.decide(shipped.score(t)).specialists for t in CHIT_CHAT}
    astray = {t: chosen for t, chosen in astray.items() if chosen != ["general"]}
    assert len(astray) <= 1, astray
    fixed = {"hi", "ok", "okay", "no", "cool", "hello", "how are you?", "thanks!", "lol", "help"}
    assert not fixed & set(astray), astray


# Code pasted into a prompt, written before any was scored (eighth round). The sixth and seventh rounds'
# corpus held question titles only, so `def max_profit` with a docstring about stock prices went to general
# and `def is_palindrome` with a doctest to medical: 3 of these 10 went astray (test fails on that artifact).
CODE_SHAPED = [
    'def add(a, b):\n    """Return the sum of a and b."""',
    'def is_palindrome(s: str) -> bool:\n    """Check if the given string is a palindrome.\n'
    '    >>> is_palindrome(\'aba\')\n    True\n    """',
    "from typing import List\n\ndef below_zero(ops: List[int]) -> bool:\n"
    '    """ You\'re given a list of deposit and withdrawal operations.\n'
    '    Return True if the balance falls below zero."""',
    "def max_profit(prices: list[int]) -> int:\n"
    '    """Given the daily prices of a stock, return the best profit from one buy and one sell.\n'
    '    >>> max_profit([7, 1, 5, 3, 6, 4])\n    5\n    """',
    'def fib(n):\n    """Return the n-th Fibonacci number."""',
    'def median(values):\n    """Return the median of a list of numbers.\n    >>> median([3, 1, 2])\n    2\n    """',
    'class Stack:\n    """A last-in first-out stack."""\n    def push(self, item):\n        pass',
    "public static int sum(int[] xs) {\n    // TODO: return the sum of the array\n}",
    "What does this function do?\nfunction debounce(fn, ms) {\n  let t;\n  return (...args) => { clearTimeout(t); "
    "t = setTimeout(() => fn(...args), ms); };\n}",
    "Write unit tests for this function:\ndef slugify(title):\n    return title.lower().replace(' ', '-')",
]


def test_shipped_router_sends_code_shaped_prompts_to_code(shipped: TinyAda) -> None:
    from router.evaluate import routed_top1

    wrong = {}
    for text in CODE_SHAPED:
        top, _ = routed_top1(shipped.score(text), shipped.config.thresholds, "general")
        if top != "code":
            wrong[text[:40]] = shipped.score(text)
    assert not wrong, wrong


def test_shipped_artifact_loads_to_identical_scores(shipped: TinyAda) -> None:
    again = TinyAda.load(shipped_router_path())
    for text in [t for ts in CANARIES.values() for t in ts]:
        assert again.score(text) == shipped.score(text)


def test_linear_model_save_load_and_pooling(tmp_path: Path) -> None:
    from router.train import features

    model, _ = train_router(TOY, TOY, TrainConfig(kind="linear", linear_buckets=1 << 12), progress=False)
    assert model.config.pooling == "l2"
    # score() in numpy equals the scikit-learn design matrix times the stored weights
    x = features(["apple pie car car"], model.config.hashing)
    emb, w, b = model._np  # type: ignore[misc]
    logits = (x @ emb) @ w.T + b
    expected = 1 / (1 + np.exp(-logits[0]))
    got = model.score("apple pie car car")
    assert np.allclose([got[d] for d in model.domains], expected, atol=1e-5)
    model.save(tmp_path / "lin")
    loaded = TinyAda.load(tmp_path / "lin")
    assert loaded.config.pooling == "l2" and loaded.config.thresholds == model.config.thresholds
    a, b2 = model.score("garage apple"), loaded.score("garage apple")
    assert all(abs(a[d] - b2[d]) < 2e-3 for d in a)


def test_nb_scaling_ratio_and_folded_weights(tmp_path: Path) -> None:
    import scipy.sparse as sp

    from router.train import features, fit_linear, hashing_for, nb_ratios, sample_weights, targets

    def nb_ratio(x: sp.csr_matrix, positive: np.ndarray, alpha: float, n_hashed: int) -> np.ndarray:
        """nb_ratios for one label column (positive: 1 for its prompts, 0 for the rest)."""
        return nb_ratios(x, np.asarray(positive, dtype=np.float32)[:, None], alpha, n_hashed)[0]

    # known answer: 3 prompts x 3 n-gram columns (+ 1 static column), prompts 0-1 positive
    x = sp.csr_matrix(np.array([[0.6, 0.8, 0, 5.0], [1.0, 0, 0, 2.0], [0, 0.6, 0.8, 7.0]], dtype=np.float32))
    r = nb_ratio(x, np.array([1, 1, 0]), alpha=1.0, n_hashed=3)
    pos, neg = np.array([2, 1, 0]) + 1.0, np.array([0, 1, 1]) + 1.0  # prompts with each n-gram, plus alpha
    assert np.allclose(r[:3], np.log((pos / pos.sum()) / (neg / neg.sum())))
    assert r[3] == 1.0  # a static-embedding column is a value, not a count: never scaled

    # the scaling folds into the weights: the artifact scores raw prompts as the scaled regression does
    from sklearn.linear_model import LogisticRegression

    cfg = TrainConfig(linear_buckets=1 << 12, drug_feature="off", disease_feature="off", nb_alpha=1.0)
    texts, domains = [ex.text for ex in TOY], ["car", "fruit"]
    xs, y = features(texts, hashing_for(cfg)), targets(TOY, domains).numpy()
    weights = sample_weights(y, [""] * len(TOY), cfg)
    fitted = fit_linear(xs, y, weights, cfg)
    probe = features(["apple pie car car", "garage banana"], hashing_for(cfg))
    for j, lr in enumerate(fitted):
        logits = probe @ lr.coef_[0] + lr.intercept_[0]
        assert np.allclose(lr.predict_proba(probe)[:, 1], 1 / (1 + np.exp(-logits)), atol=1e-6)
        # reference: scikit-learn fitted by hand on the columns times the known-answer-checked ratio
        r_ref = sp.diags(nb_ratio(xs, y[:, j], 1.0, xs.shape[1]))
        ref = LogisticRegression(C=cfg.c, solver="liblinear", class_weight="balanced", max_iter=300)
        ref.fit(xs @ r_ref, y[:, j], sample_weight=weights)
        assert np.allclose(lr.predict_proba(probe), ref.predict_proba(probe @ r_ref), atol=1e-6)
    plain = fit_linear(xs, y, weights, TrainConfig(linear_buckets=1 << 12, nb_alpha=0.0))
    assert not np.allclose(fitted[0].coef_, plain[0].coef_)  # the option changes the fit
    # on the training path too, a static-embedding column past the n-gram buckets is fitted unscaled
    static = sp.csr_matrix(np.linspace(-1, 1, len(TOY), dtype=np.float32)[:, None])
    with_static = fit_linear(sp.hstack([xs, static]).tocsr(), y, weights, cfg)[0]
    r_ref = sp.diags(np.append(nb_ratio(xs, y[:, 0], 1.0, xs.shape[1]), 1.0))
    ref = LogisticRegression(C=cfg.c, solver="liblinear", class_weight="balanced", max_iter=300)
    ref.fit(sp.hstack([xs, static]).tocsr() @ r_ref, y[:, 0], sample_weight=weights)
    assert np.allclose(with_static.coef_, ref.coef_ * r_ref.diagonal(), atol=1e-6)
    model, _ = train_router(TOY, TOY, cfg, progress=False)
    got = model.score("apple pie car car")
    expected = [lr.predict_proba(probe[:1])[0, 1] for lr in fitted]
    assert np.allclose([got[d] for d in domains], expected, atol=1e-5)
    model.save(tmp_path / "nb")
    loaded = TinyAda.load(tmp_path / "nb").score("apple pie car car")
    assert all(abs(loaded[d] - got[d]) < 2e-3 for d in domains)  # the artifact stores fp16 weights


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _fixture_mirror(root: Path) -> str:
    """A tiny repo in the fetch tool's layout (ROOT/owner+name/repo), committed; returns the commit."""
    repo = root / "acme+prompts" / "repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q")
    health = ["Can gout be cured?", "What is a normal heart rate?", "Is it safe to fly when pregnant?"]
    health += ["Is it safe to take ibuprofen when I am pregnant?"]
    (repo / "health.jsonl").write_text("".join(json.dumps({"q": q}) + "\n" for q in health))
    mixed = ["How do I sort a list in Python?", "What are the symptoms of flu?", "Best pizza in Naples?"]
    mixed += ["What is the best diet?", "Can gout be cured?", "Who wrote Hamlet?"]
    mixed += ["is it safe to take ibuprofen when I am breastfeeding", "what color is metoprolol"]
    mixed += ["Classify these as birds or fish: owl, trout", "What is a class in Java?", "How do I add a class?"]
    mixed += ["what is the zip code for alliance ohio", "how do I fix this code"]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write("".join(f"{i}\t{q}\n" for i, q in enumerate(mixed)).encode())
    (repo / "mixed.tsv.gz").write_bytes(buf.getvalue())
    chat = ["Doctor, I have been feeling dizzy and my ankles are swollen.", "Hi doctor, my knee clicks when I run."]
    chat += [
        "I get a rash after eating nuts. What is it?",
        "Doctor, I have been feeling dizzy and my ankles are swollen.",
    ]
    (repo / "chat.json").write_text(json.dumps([{"instruction": "x", "input": q, "output": "y"} for q in chat]))
    turns = [["hi", "greeting"], ["no thanks", "no"], ["what is the weather like in boston today", "weather"]]
    clinc = {"train": turns}
    (repo / "clinc.json").write_text(json.dumps({**clinc, "val": [["ok", "yes"]]}))
    head = "answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user\n"
    nlu = '1;general;praise;"well done";"well done";"well done."\n2;alarm;alarm_set;"x";"x";"wake me at six"\n'
    (repo / "nlu.csv").write_text(head + nlu)
    hobby = ["__label__baking __label__bread Kneading bread after rising", "__label__sugar How to caramelize sugar?"]
    hobby += ["__label__food-safety How much gluten sets off celiac disease?", "__label__soup Ramen with egg :: why?"]
    hobby += ["__label__software Best Python app for my recipes?"]
    (repo / "hobby.txt").write_text("\n".join(hobby) + "\n")
    so = ["Add a custom field to the WordPress admin", "SVN merge merged extra stuff", "Excel detect inactivity"]
    (repo / "so_titles.txt").write_text("\n".join(so) + "\n")
    (repo / "so_labels.txt").write_text("1\n3\n5\n")  # 1 is wordpress
    (repo / "so_short.txt").write_text("2\n")  # fewer category lines than titles
    (repo / "so_words.txt").write_text("3\nsvn\n5\n")  # a category that is not a number
    # Yahoo! Answers topic set: CRLF lines, a quoted title with doubled quotes, topics 0-9 (2 Health, 4 Computers)
    yahoo = ["sentence\tlabel", "Who won the 1984 Stanley Cup?\t5", '"What does ""on the cusp"" mean?"\t7']
    yahoo += ["how long does a cold last?\t2", "why is my computer so slow?\t4"]
    yahoo += ["How many calories does a marathon burn?\t5"]
    (repo / "yahoo.tsv").write_bytes(("\r\n".join(yahoo) + "\r\n").encode())
    (repo / "yahoo_bad.tsv").write_text("sentence\tlabel\nWho won?\t12\n")  # no topic 12
    (repo / "yahoo_headless.tsv").write_text("Who won?\t5\n")  # no header: not the file the reader knows
    code = repo / "src" / "maths"
    code.mkdir(parents=True)
    area = 'def circle_area(r: float) -> float:\n    """Area of a circle.\n\n    >>> circle_area(0)\n    0\n    """\n'
    area += "    return 3.14 * r * r\n\n\ndef undocumented(x):\n    return x\n\n\nclass Shape:\n"
    area += '    def sides(self) -> int:\n        """How many sides the shape has."""\n        return 0\n'
    (code / "area.py").write_text(area)
    (repo / "src" / "broken.py").write_text('def f(:\n    """Never parsed."""\n')
    (repo / "src" / "euler").mkdir()
    (repo / "src" / "euler" / "p1.py").write_text('def solution(n):\n    """Sum the multiples of 3 below n."""\n')
    (repo / "src" / "README.md").write_text('def not_python():\n    """A markdown file."""\n')
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "fixture")
    return _git(repo, "rev-parse", "HEAD")


def test_corpus_builder_is_deterministic_and_source_disjoint(tmp_path: Path) -> None:
    from router.data import build_corpus as bc

    commit = _fixture_mirror(tmp_path / "mirrors")
    sources = [
        bc.Source(
            "health", "acme/prompts", commit, ["health.jsonl"], bc._jsonl_field("q"), "medical", "MIT", heldout=True
        ),
        bc.Source("mixed", "acme/prompts", commit, ["mixed.tsv.gz"], bc._tsv_gz_column(1), "relabel", "MIT"),
        bc.Source("chat", "acme/prompts", commit, ["chat.json"], bc._genmedgpt, "medical", "Apache-2.0"),
        # CLINC's short turns, kept though under 2 words / 8 characters; the same file read as a plain source
        bc.Source("clinc-short", "acme/prompts", commit, ["clinc.json"], bc._clinc_short, "general", "-", short=True),
        bc.Source("clinc150", "acme/prompts", commit, ["clinc.json"], bc._clinc, "general", "-"),
        bc.Source("nlu", "acme/prompts", commit, ["nlu.csv"], bc._nlu_general, "general", "-", short=True),
        bc.Source("heads", "acme/prompts", commit, ["src"], bc._python_function_heads(("src/euler/",)), "code", "-"),
        bc.Source("hobby", "acme/prompts", commit, ["hobby.txt"], bc._fasttext_titles, "general-screened", "-"),
        bc.Source("so", "acme/prompts", commit, ["so_titles.txt", "so_labels.txt"], bc._so_short_text, "code", "-"),
        bc.Source("ya", "acme/prompts", commit, ["yahoo.tsv"], bc._yahoo_topics(bc.YAHOO_GENERAL), "relabel", "-"),
        bc.Source("ya-health", "acme/prompts", commit, ["yahoo.tsv"], bc._yahoo_topics({"Health"}), "medical", "-"),
    ]
    first = bc.write(bc.build(tmp_path / "mirrors", sources, handwritten=None), tmp_path / "a")
    second = bc.write(bc.build(tmp_path / "mirrors", sources, handwritten=None), tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    rows = [ex for s in ("train", "val") for ex in read_jsonl(tmp_path / "a" / f"{s}.jsonl.gz")]
    trained = {ex.text: ex.labels for ex in rows}
    assert "Can gout be cured?" not in trained  # held out: never in train or val, even from another source
    assert trained["How do I sort a list in Python?"] == ["code"]
    assert trained["What are the symptoms of flu?"] == ["medical"]
    assert trained["Who wrote Hamlet?"] == ["general"]
    assert "What is the best diet?" not in trained  # weak health cue: ambiguous, dropped rather than guessed
    assert "How do I add a class?" not in trained  # weak code cue: a class may be a yoga class or a Python one
    assert trained["What is a class in Java?"] == ["code"]
    assert trained["Classify these as birds or fish: owl, trout"] == ["general"]  # "classify" is no code cue
    assert trained["what is the zip code for alliance ohio"] == ["general"] and "how do I fix this code" not in trained
    assert trained["what color is metoprolol"] == ["medical"]  # a drug's name alone is a medical cue
    # GenMedGPT-style patient turns: the salutation to the doctor is cut, the symptoms stay; duplicates once
    chat = sorted(ex.text for ex in rows if ex.source == "chat")
    assert chat == [
        "I get a rash after eating nuts. What is it?",
        "I have been feeling dizzy and my ankles are swollen.",
        "My knee clicks when I run.",
    ]
    # opens like a held-out prompt (same first 8 words): an edited copy, kept out of training
    assert "is it safe to take ibuprofen when I am breastfeeding" not in trained
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    by_name = {m["name"]: m for m in manifest["sources"]}
    assert by_name["mixed"]["dropped_near_heldout"] == 1
    assert by_name["chat"]["dropped_duplicate"] == 1
    assert [m["commit"] for m in manifest["sources"]] == [commit] * 11
    # the Stack Overflow short-text titles, but for the wordpress category (a held-out source's product)
    assert trained["SVN merge merged extra stuff"] == trained["Excel detect inactivity"] == ["code"]
    assert by_name["so"]["read"] == 2 and "Add a custom field to the WordPress admin" not in trained
    # a screened general pool: its tags are cut, a weak cue ("sugar") stays general (the keyword rules would
    # drop it), a strong specialist cue ("celiac disease", a code-shaped "::") is dropped as ambiguous
    assert trained["Kneading bread after rising"] == trained["How to caramelize sugar?"] == ["general"]
    assert by_name["hobby"]["kept"] == 2 and by_name["hobby"]["dropped_ambiguous"] == 3  # and a "Python" one
    # documented functions and methods, as their def line and docstring (no body), from .py files only,
    # not under the skipped directory, and a file this Python cannot parse is passed over
    heads = sorted(ex.text for ex in rows if ex.source == "heads")
    assert heads == [
        'def circle_area(r: float) -> float: """Area of a circle. >>> circle_area(0) 0 """',
        'def sides(self) -> int: """How many sides the shape has."""',
    ]
    assert trained["well done."] == ["general"] and "wake me at six" not in trained  # the general scenario only
    assert trained["hi"] == trained["ok"] == trained["no thanks"] == ["general"]
    assert by_name["clinc-short"]["kept"] == 3 and by_name["clinc150"]["kept"] == 1  # the 8-word one
    assert by_name["clinc150"]["dropped_unusable"] == 2  # "hi" and "ok" are fragments to a plain source
    assert by_name["clinc150"]["dropped_duplicate_across_sources"] == 1  # "no thanks", taken by clinc-short
    # Yahoo! Answers titles by topic: quotes unescaped, Computers & Internet in neither source, Health medical
    assert trained["Who won the 1984 Stanley Cup?"] == trained['What does "on the cusp" mean?'] == ["general"]
    assert trained["how long does a cold last?"] == ["medical"] and "why is my computer so slow?" not in trained
    assert by_name["ya"]["read"] == 3 and by_name["ya"]["dropped_ambiguous"] == 1  # "calories": a weak cue
    assert by_name["ya-health"]["read"] == 1
    bad_topic = bc._yahoo_topics({"Sports"})
    yahoo_bad = [bc.Source("yb", "acme/prompts", commit, ["yahoo_bad.tsv"], bad_topic, "general", "-")]
    with pytest.raises(bc.CorpusError, match=r"yahoo_bad\.tsv line 2: expected a title and a topic number 0-9"):
        bc.build(tmp_path / "mirrors", yahoo_bad, handwritten=None)
    headless = [bc.Source("yh", "acme/prompts", commit, ["yahoo_headless.tsv"], bad_topic, "general", "-")]
    with pytest.raises(bc.CorpusError, match=r"yahoo_headless\.tsv: expected a 'sentence<TAB>label' header"):
        bc.build(tmp_path / "mirrors", headless, handwritten=None)
    with pytest.raises(bc.CorpusError, match=r"unknown Yahoo! Answers topics \['Sport'\]"):
        bc._yahoo_topics({"Sport"})
    short = [bc.Source("s", "acme/prompts", commit, ["so_titles.txt", "so_short.txt"], bc._so_short_text, "code", "-")]
    with pytest.raises(bc.CorpusError, match=r"so_titles\.txt has 3 lines but so_short\.txt has 1"):
        bc.build(tmp_path / "mirrors", short, handwritten=None)
    words = [bc.Source("w", "acme/prompts", commit, ["so_titles.txt", "so_words.txt"], bc._so_short_text, "code", "-")]
    with pytest.raises(bc.CorpusError, match=r"so_words\.txt line 2: category 'svn' is not a number"):
        bc.build(tmp_path / "mirrors", words, handwritten=None)
    bad = [bc.Source("x", "acme/prompts", "0" * 40, ["health.jsonl"], bc._jsonl_field("q"), "medical", "MIT")]
    with pytest.raises(bc.CorpusError, match="lacks pinned commit"):
        bc.build(tmp_path / "mirrors", bad, handwritten=None)
    with pytest.raises(bc.CorpusError, match="no mirror of acme/missing"):
        bc.build(tmp_path / "mirrors", [bc.Source("y", "acme/missing", commit, [], bc._lines, "code", "-")], None)


def test_cli_eval_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deployments.cli import main

    data = tmp_path / "slice.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "labels": e.labels}) + "\n" for e in _heldout_slice(10)))
    png = tmp_path / "router.png"
    assert main(["router", "eval", "--data", str(data), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "confusion" in capsys.readouterr().out


def _tiny_checkpoint(path: Path) -> Path:
    """A causal-LM-shaped checkpoint dir: a word-level tokenizer and a random embed_tokens table."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for ex in TOY for w in ex.text.split()} | {"[UNK]", "garage", "pie"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    gen = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(len(words), 16, generator=gen)}, path / "model.safetensors")
    return path


def test_linear_model_with_static_embeddings(tmp_path: Path) -> None:
    from router.model import static_features
    from router.train import features

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    cfg = TrainConfig(kind="linear", linear_buckets=1 << 12, static_from=str(ckpt), static_dim=4, static_scale=2.0)
    model, _ = train_router(TOY, TOY, cfg, progress=False)
    assert model.config.static_dim == 4 and model.static_table.shape == (model.config.static_vocab, 4)
    report = evaluate(model, TOY)
    assert report.accuracy == 1.0
    # score() = n-gram block + static block, recomputed by hand from the stored tensors
    text = "apple pie car car"
    emb, w, b = model._np  # type: ignore[misc]
    table, sw = model._static_np  # type: ignore[misc]
    pooled = table[[model.tokenizer.token_to_id(t) for t in text.split()]].mean(axis=0)
    assert np.allclose(static_features(text, model.tokenizer, table, 2000), pooled / np.linalg.norm(pooled), atol=1e-6)
    logits = (features([text], model.config.hashing) @ emb) @ w.T + b + sw @ (pooled / np.linalg.norm(pooled))
    got = model.score(text)
    assert np.allclose([got[d] for d in model.domains], 1 / (1 + np.exp(-logits[0])), atol=1e-5)
    # save/load keeps table, weights and tokenizer; retraining from the artifact reuses its table
    model.save(tmp_path / "art")
    loaded = TinyAda.load(tmp_path / "art")
    a, b2 = model.score("garage apple"), loaded.score("garage apple")
    assert all(abs(a[d] - b2[d]) < 2e-3 for d in a)
    again, _ = train_router(
        TOY,
        TOY,
        TrainConfig(kind="linear", linear_buckets=1 << 12, static_from=str(tmp_path / "art"), static_dim=4),
        progress=False,
    )
    assert np.array_equal(again._static_np[0], loaded._static_np[0])  # type: ignore[index]
    with pytest.raises(DataError, match=r"tokenizer\.json"):
        train_router(TOY, TOY, TrainConfig(kind="linear", static_from=str(tmp_path)), progress=False)


def _lexicon_toy_data(medical_names: list[str]) -> list[Example]:
    """The same words around a medical name and a food: only the name (and a lexicon feature) tells them apart."""
    return (
        [Example(f"tell me about {d} {i}", ["medical"]) for d in medical_names for i in range(4)]
        + [Example(f"tell me about {f} {i}", ["general"]) for f in ["bread", "rice", "milk", "paris"] for i in range(7)]
        + [Example(f"how do i sort a list in python {i}", ["code"]) for i in range(20)]
    )


def test_drug_lexicon_feature_generalises_to_unseen_drugs(tmp_path: Path) -> None:
    from router.train import drug_lexicon

    seen = ["lisinopril", "metoprolol", "warfarin", "ibuprofen", "sertraline", "omeprazole", "atorvastatin"]
    unseen = "prochlorperazine"  # in router/data/drugs.txt, never in this training data
    names, suffixes = drug_lexicon("names+suffixes")
    assert unseen in names and all(d in names for d in seen) and "sartan" in suffixes
    data = _lexicon_toy_data(seen)
    on, _ = train_router(data, data, TrainConfig(linear_buckets=1 << 14, drug_feature="names+suffixes"), False)
    off, _ = train_router(data, data, TrainConfig(linear_buckets=1 << 14, drug_feature="off"), False)
    h, h_off = on.config.hashing, off.config.hashing
    extra = {
        t: featurize(t, h)[len(featurize(t, h_off)) :]
        for t in [f"what is {unseen}", "is zorbisartan safe", "what is the capital of france", "april loops in java"]
    }
    # the same shared "lexicon" id for an unseen listed name as for a seen one; suffix id for a made-up
    # "-sartan"; nothing for ordinary text ("april" ends in -pril but its stem is too short)
    assert extra[f"what is {unseen}"] == featurize("lisinopril dose", h)[len(featurize("lisinopril dose", h_off)) :]
    assert len(extra["is zorbisartan safe"]) == 1 and extra["is zorbisartan safe"] != extra[f"what is {unseen}"]
    assert extra["what is the capital of france"] == [] and extra["april loops in java"] == []
    with pytest.raises(DataError, match="drug_feature"):
        drug_lexicon("drugs")
    # the feature makes the unseen drug medical; without it only its character n-grams speak for it
    q = f"tell me about {unseen}"
    assert on.score(q)["medical"] > 0.5 and on.score(q)["medical"] > off.score(q)["medical"] + 0.03
    # the lexicon ships in the artifact: loading reproduces features and scores
    on.save(tmp_path / "drug")
    loaded = TinyAda.load(tmp_path / "drug")
    assert loaded.config.hashing.lexicon == names and featurize(q, loaded.config.hashing) == featurize(q, h)
    a, b = on.score(q), loaded.score(q)
    assert all(abs(a[d] - b[d]) < 2e-3 for d in a)


def test_disease_lexicon_feature_matches_names_and_generalises(tmp_path: Path) -> None:
    from router.train import disease_lexicon

    lexicon = disease_lexicon("names")["disease"]
    listed = set(lexicon)
    # one-word and multi-word ontology names are in the committed list; the measured filter took out
    # names that are ordinary words in general and code prompts ("can", "all" and "php" are disease synonyms)
    assert {"scurvy", "ataxia", "takayasu arteritis", "marfan syndrome"} <= listed
    assert not {"can", "all", "php", "pca"} & listed
    seen = ["gout", "asthma", "measles", "psoriasis", "marfan syndrome", "bell s palsy", "anemia"]
    data = _lexicon_toy_data(seen)
    on, _ = train_router(data, data, TrainConfig(linear_buckets=1 << 14, disease_feature="names"), False)
    off, _ = train_router(data, data, TrainConfig(linear_buckets=1 << 14, disease_feature="off"), False)
    h, h_off = on.config.hashing, off.config.hashing

    def extra(text: str) -> list[int]:
        return featurize(text, h)[len(featurize(text, h_off)) :]

    hit = extra("has gout")  # two words: a one-word prompt also gets the one-word feature
    assert len(hit) == 1
    # an unseen one-word name, an unseen two-word name whose words are not names alone, any case and
    # punctuation: the same shared id as a seen name; longest match first ("common cold" counts once)
    assert extra("Is SCURVY life-threatening?") == hit
    assert extra("what causes takayasu arteritis") == hit
    assert extra("takayasu or arteritis") == []
    assert extra("a common cold, then a cold") == hit * 2
    assert extra("what are the 3 types of migraines") == hit  # plurals are listed too
    assert extra("what is the capital of france") == [] and extra("fix npe when the cache is evicted") == []
    assert extra("can i sort all php arrays with pca") == []
    # the feature makes the unseen disease medical; without it only its character n-grams speak for it
    q = "tell me about scurvy"
    assert on.score(q)["medical"] > 0.5 and on.score(q)["medical"] > off.score(q)["medical"] + 0.03
    with pytest.raises(DataError, match="disease_feature"):
        disease_lexicon("rare")
    # the lexicon ships in the artifact: loading reproduces features and scores
    on.save(tmp_path / "disease")
    loaded = TinyAda.load(tmp_path / "disease")
    assert loaded.config.hashing.lexicons == {"disease": lexicon}
    assert featurize(q, loaded.config.hashing) == featurize(q, h)
    a, b = on.score(q), loaded.score(q)
    assert all(abs(a[d] - b[d]) < 2e-3 for d in a)


def _fixture_ontology(root: Path) -> str:
    """A tiny repo shaped like the Human Disease Ontology's (the files build_diseases reads); returns the commit."""
    from router.data import build_diseases as bd

    repo = root / "DiseaseOntology+HumanDiseaseOntology" / "repo"
    (repo / "DOreports").mkdir(parents=True)
    (repo / "LICENSE").write_text("Creative Commons Legal Code\n\nCC0 1.0 Universal\n")
    labels = [
        "scurvy",
        "Gout",
        "Takayasu arteritis",
        "castle disease",
        "can",
        "gas",
        "THI",
        "allergic contact dermatitis caused by a nickel belt",
    ]
    (repo / bd.LABELS).write_text(
        "id\tlabel\tsubClassOf\n" + "".join(f'"DOID:{i}"\t"{n}"\t"x"\n' for i, n in enumerate(labels))
    )
    subset = repo / "subset.obo"
    subset.write_text(
        'format-version: 1.2\n\n[Term]\nid: DOID:1\nname: gout\nsynonym: "podagra" EXACT []\n'
        'synonym: "rich man\'s disease" RELATED []\n\n[Term]\nid: DOID:2\nname: old name\nis_obsolete: true\n\n'
        '[Term]\nid: DOID:3\nname: cranial arteritis\nsynonym: "GCA" EXACT []\nsynonym: "ALS2" EXACT []\n'
    )
    symp = repo / bd.SYMPTOMS
    symp.parent.mkdir(parents=True)
    symp.write_text(
        '<?xml version="1.0"?>\n<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:owl="http://www.w3.org/2002/07/owl#" xmlns:rdfs="http://www.w3.org/2000/01/rdf-schema#" '
        'xmlns:oboInOwl="http://www.geneontology.org/formats/oboInOwl#">\n'
        "<owl:Class><oboInOwl:hasOBONamespace>symptoms</oboInOwl:hasOBONamespace><rdfs:label>ataxia</rdfs:label>"
        "<oboInOwl:hasExactSynonym>uncoordination</oboInOwl:hasExactSynonym></owl:Class>\n"
        "<owl:Class><rdfs:label>anatomy part</rdfs:label></owl:Class>\n</rdf:RDF>\n"
    )
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "fixture")
    return _git(repo, "rev-parse", "HEAD")


def test_tweac_sources_read_only_their_allow_listed_sites() -> None:
    """TWEAC's folder holds the held-out Stack Exchange sites too; the builder must never read them."""
    from router.data import build_corpus as bc

    tweac = [s for s in bc.SOURCES if s.repo == bc.TWEAC]
    assert sorted(s.name for s in tweac) == ["tweac-code", "tweac-health", "tweac-hobby"]
    site_lists = [{p.rsplit("/", 1)[1].removesuffix(".txt") for p in s.paths} for s in tweac]
    sites = set().union(*site_lists)
    assert sum(map(len, site_lists)) == len(sites)  # no site in two sources (two labels)
    assert all(len(s.paths) == 3 * len(names) for s, names in zip(tweac, site_lists, strict=True))  # 3 splits
    assert "data/stackexchange/dev/stackoverflow.com.txt" in bc._tweac(bc.TWEAC_CODE)
    heldout = {"gaming", "wordpress"}  # cqa-gaming and cqa-wordpress are held-out sources
    # CQADupStack sites (the dev folds' among them) and cooking, which another source reads: a fold would
    # score prompts of a site it trained on, or a site would be read twice
    cqadupstack = {"english", "physics", "programmers", "softwareengineering", "unix", "webmasters", "tex"}
    cqadupstack |= {"mathematica", "android", "gis", "stats", "cooking", "askubuntu", "serverfault"}
    hosts = {s.removesuffix(".stackexchange.com").removesuffix(".com") for s in sites}
    assert not hosts & (heldout | cqadupstack), hosts & (heldout | cqadupstack)


def test_chat_prompt_sources_label_by_category_and_topic_cluster() -> None:
    """The seventeenth round's chat sources: a category or a topic cluster's name gives the domain."""
    from router.data import build_corpus as bc

    # a JSON-lines field filtered by category; a list field (MT-bench's turns) gives its first turn only
    lines = [
        {"category": "writing", "turns": ["Write a poem about rain.", "Now make it rhyme."]},
        {"category": "coding", "turns": ["Write a Python function that reverses a list."]},
        {"category": "writing", "prompt": "no turns here"},
    ]
    data = "\n".join(json.dumps(r) for r in lines).encode()
    read = bc._jsonl_field("turns", category=("writing", "roleplay"))
    assert list(read(lambda path: data, ["q.jsonl"])) == ["Write a poem about rain."]
    # the Vicuna questions next to MT-bench's are an evaluation set: never read
    fastchat = [p for s in bc.SOURCES if s.repo == "lm-sys/FastChat" for p in s.paths]
    assert fastchat and all(p.endswith("mt_bench/question.jsonl") for p in fastchat)
    domains = {
        "Python Coding Challenges": "code",
        "Rust programming language": "code",
        "SQL Query Troubleshooting": "code",
        "Cryptography and Decoding": "general",  # puzzles: "decoding" is not "coding"
        "Creative Writing Prompts": "general",
        "Video Game Recommendations and Discussions": "general",
        "Medication and Health Queries": "medical",
        "Vision and Eye Health": "medical",
        "Sleep Habits and Optimization": None,  # health or lifestyle: neither label is safe
        "Healthcare Strategy and Communication": None,
        "Prompt Engineering and Optimization": None,
        "Excel Formulas and VBA Programming": None,  # the keyword rules call spreadsheets ambiguous too
    }
    assert {name: bc.arena_topic_domain(name) for name in domains} == domains
    clusters = [{"name": "Python Coding Challenges", "examples": ["fix my loop"]}]
    clusters.append({"name": "Sleep Habits and Optimization", "examples": ["how long should I nap"]})
    blob = json.dumps(clusters).encode()
    assert list(bc._arena_topics("code")(lambda path: blob, ["e.json"])) == ["fix my loop"]
    assert list(bc._arena_topics("general")(lambda path: blob, ["e.json"])) == []


def test_disease_lexicon_builder_is_deterministic_and_filters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.data import build_diseases as bd

    commit = _fixture_ontology(tmp_path / "mirrors")
    monkeypatch.setattr(bd, "COMMIT", commit)
    monkeypatch.setattr(bd, "SUBSETS", ["subset.obo"])
    rows = (
        [
            ("my gout and podagra hurt", ["medical"]),
            ("gout again", ["medical"]),
            ("is ataxia curable", ["medical"]),
            ("gca and gca", ["medical"]),
            ("a gca flare", ["medical"]),
        ]
        + [("a castle disease? no, the castle in the castle town", ["general"])]
        + [(f"visit the castle {i}", ["general"]) for i in range(3)]
        + [("gas i", ["code"]), ("how much is gas", ["general"]), ("gas and bloating", ["medical"])]
        + [("can this spread", ["medical"]), ("is this normal", ["medical"])]
    )
    paths = []
    for out in ("a.txt", "b.txt"):
        kept, stats = bd.build(tmp_path / "mirrors", rows)
        paths.append(bd.write(kept, stats["dropped"], tmp_path / out))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    names = [line for line in paths[0].read_text().splitlines() if not line.startswith("#")]
    # labels, EXACT synonyms and symptom names, lower-cased and split like the featuriser; no RELATED
    # synonym, obsolete term, non-symptom class or over-long name
    expected = ["scurvy", "gout", "takayasu arteritis", "castle disease", "podagra", "cranial arteritis", "gca"]
    expected += ["ataxia", "uncoordination"]
    # names of up to 3 words also get the regular plural of their last word; "arteritis" ends in -s: none
    expected += ["scurvies", "gouts", "castle diseases", "podagras", "ataxias", "uncoordinations"]
    assert names == sorted(expected)
    # "gas" fires in general and code prompts: dropped by the measured filter; "castle disease" fires only
    # once outside medical: kept; "gout" and "gca" are short with medical evidence (2 prompts): kept; "als2"
    # and the initials "thi" are not. Function words are never names: "can", and "this" (the plural of
    # "thi"), are gone before the filter, though they fire in medical prompts only.
    dropped = dict(stats["dropped"])
    assert set(dropped) == {"gas", "cans", "als2", "gcas", "thi"}
    assert dropped["gas"] == {"code": 1, "general": 1, "medical": 1}
    assert commit in paths[0].read_text().splitlines()[2]
    monkeypatch.setattr(bd, "SUBSETS", ["missing.obo"])
    with pytest.raises(bd.CorpusError, match=r"missing\.obo"):
        bd.build(tmp_path / "mirrors", rows)


def test_committed_disease_list_names_its_pinned_source() -> None:
    from router.data import DATA_DIR
    from router.data import build_diseases as bd

    header = [line for line in (DATA_DIR / "diseases.txt").read_text().splitlines() if line.startswith("#")]
    assert f"{bd.REPO} @ {bd.COMMIT}" in header[2]  # the builder's pinned commit wrote this file


def test_identifier_shape_features() -> None:
    import zlib

    from router.model import HashingConfig

    on, off = HashingConfig(buckets=1 << 16, shapes=True), HashingConfig(buckets=1 << 16)
    kind = {zlib.crc32(f"S {k}".encode()) % (1 << 16): k for k in ("camel", "snake", "dotted", "acronym")}
    kind |= {zlib.crc32(f"S {k}".encode()) % (1 << 16): k for k in ("call", "path", "flag", "ext")}

    def shapes(text: str) -> list[str]:
        extra = featurize(text, on)[len(featurize(text, off)) :]
        return sorted(kind[i] for i in extra)

    # read before lower-casing: "NPE" and "getElementById" keep their shape
    assert shapes("Fix NPE in getElementById") == ["acronym", "camel"]
    assert shapes("call os.path.join(a, b) in main.py") == ["call", "dotted", "dotted", "ext"]
    assert shapes("rm -rf /usr/local/bin and read max_chars") == ["flag", "path", "snake"]
    # prose: a space before "(", one-letter "e.g.", no capitals inside words
    assert shapes("What is the capital of France (e.g. for a quiz)?") == []
    assert featurize("Fix NPE", off) == featurize("fix npe", off)  # off: case never matters


def test_one_word_feature() -> None:
    import zlib

    from router.model import HashingConfig

    # punctuation off, as the linear router featurises (hashing_for): "Help!" is one word
    on = HashingConfig(buckets=1 << 16, punctuation=False, one_word=True)
    off = HashingConfig(buckets=1 << 16, punctuation=False)
    one_word = zlib.crc32(b"N one word") % (1 << 16)
    for text in ("cool", "  Help!  ", "lol?"):  # one word, whatever the case, spacing or punctuation
        assert featurize(text, on) == [*featurize(text, off), one_word]
    for text in ("good job", "what is gout", "x = 1"):
        assert featurize(text, on) == featurize(text, off)


def _chosen_by_policy(probs: np.ndarray, thresholds: dict[str, float], domains: list[str]) -> list[set[str]]:
    policy = RoutingPolicy(thresholds=thresholds, fallback="general", top_k=2)
    return [set(policy.decide(dict(zip(domains, map(float, p), strict=True))).specialists) for p in probs]


def test_routing_objective_matches_the_policy() -> None:
    """The calibration's vectorised objective scores exactly what RoutingPolicy.decide chooses."""
    from router.train import _routing_objective

    domains = ["code", "general", "medical"]
    rng = np.random.default_rng(0)
    probs = rng.random((400, 3))
    y = np.zeros((400, 3))
    y[np.arange(400), rng.integers(0, 3, 400)] = 1
    y[:60, 0] = y[:60, 2] = 1  # code+medical rows
    y[:60, 1] = 0
    for t in ([0.5, 0.5, 0.5], [0.3, 0.8, 0.4], [0.9, 0.2, 0.6]):
        chosen = _chosen_by_policy(probs, dict(zip(domains, t, strict=True)), domains)
        truth = [{d for d, v in zip(domains, row, strict=True) if v} for row in y]
        single = [c == s for c, s in zip(chosen, truth, strict=True) if len(s) == 1]
        multi = [s <= c for c, s in zip(chosen, truth, strict=True) if len(s) > 1]
        for w in (0.0, 0.25, 1.0):
            want = (1 - w) * np.mean(single) + w * np.mean(multi) if w else np.mean(single)
            assert _routing_objective(probs, y, np.array(t), 1, 2, w) == pytest.approx(want)


def test_routing_calibration_chooses_both_domains_where_f1_does_not() -> None:
    """Per-domain F1 keeps the medical threshold above the two-domain prompts' medical score (60 general
    prompts sit at the same score); the routing calibration weighs the 40 two-domain prompts it loses."""
    from router.train import calibrate_routing, calibrate_thresholds

    domains = ["code", "general", "medical"]
    rows = (
        [([0.9, 0.05, 0.4], [1, 0, 1])] * 40  # code+medical, medical side weak
        + [([0.05, 0.05, 0.9], [0, 0, 1])] * 400
        + [([0.9, 0.05, 0.05], [1, 0, 0])] * 400
        + [([0.05, 0.9, 0.05], [0, 1, 0])] * 400
        + [([0.05, 0.9, 0.4], [0, 1, 0])] * 60  # general prompts with the same medical score
    )
    probs = np.array([p for p, _ in rows])
    y = np.array([t for _, t in rows], dtype=float)
    f1 = calibrate_thresholds(probs, y, domains)
    routed = calibrate_routing(probs, y, domains)
    assert f1["medical"] > 0.4 >= routed["medical"]
    assert _chosen_by_policy(probs[:1], f1, domains) == [{"code"}]
    assert _chosen_by_policy(probs[:1], routed, domains) == [{"code", "medical"}]
    # without two-domain prompts nothing is gained by moving: every threshold stays at its 0.5 prior
    assert calibrate_routing(probs[40:], y[40:], domains) == dict.fromkeys(domains, 0.5)
    # and a single-label prompt never gets a needless second specialist under the routing thresholds
    assert all(len(c) == 1 for c in _chosen_by_policy(probs[40:], routed, domains)[:1200])


def test_train_config_calibration_mode(tmp_path: Path) -> None:
    cfg = TrainConfig(c=4.0, linear_buckets=1 << 12, drug_feature="off", disease_feature="off")
    model, _ = train_router(TOY, TOY, cfg, progress=False)
    assert set(model.config.thresholds) == {"car", "fruit"}
    with pytest.raises(DataError, match="calibration must be one of routing, f1, got 'x'"):
        # no examples at all: the mode is refused before any fitting starts
        train_router([], [], TrainConfig(calibration="x", linear_buckets=1 << 12, drug_feature="off"), progress=False)


def test_clean_pools_drops_only_disputed_items_of_relabelled_pools() -> None:
    import dataclasses

    from router.train import confident_disagreements, features, hashing_for, relabelled_sources, targets

    assert {"quora", "msmarco", "dolly"} <= relabelled_sources() and "clinc150" not in relabelled_sources()
    trusted = [Example(f"apple banana fruit salad {i}", ["fruit"], "orchard") for i in range(40)]
    trusted += [Example(f"engine wheel car garage {i}", ["car"], "garage") for i in range(40)]
    # a keyword rule gave these pool items the wrong label; the same text in a source-labelled set is kept
    wrong = [Example(f"apple banana fruit salad bowl {i}", ["car"], "quora") for i in range(3)]
    right = [Example(f"engine wheel car {i}", ["car"], "quora") for i in range(5)]
    unsure = [Example(f"a quiet evening {i}", ["car"], "quora") for i in range(3)]  # nothing to dispute it with
    own_error = [Example("apple banana fruit salad 99", ["car"], "garage")]  # disputed too, but not a pool item
    rows = trusted + wrong + right + unsure + own_error
    cfg = TrainConfig(linear_buckets=1 << 12, drug_feature="off", disease_feature="off", one_word=False)
    x, y = features([ex.text for ex in rows], hashing_for(cfg)), targets(rows, ["car", "fruit"]).numpy()
    drop, _ = confident_disagreements(x, y, [ex.source for ex in rows], relabelled_sources(), cfg)
    assert [ex.text for ex, d in zip(rows, drop, strict=True) if d] == [ex.text for ex in wrong]
    off, _ = confident_disagreements(x, y, [ex.source for ex in rows], relabelled_sources(), TrainConfig(clean_pools=0))
    assert not off.any()
    # a domain known only from pools has no source-labelled judge: nothing is flagged, nothing fails
    no_judge = [ex if ex.source != "garage" else Example(ex.text, ex.labels, "quora") for ex in rows]
    drop_none, _ = confident_disagreements(x, y, [ex.source for ex in no_judge], relabelled_sources(), cfg)
    assert not drop_none.any()
    # training drops them from train and validation: the same model as one trained without them
    val = trusted[::4] + wrong[:1] + right[:2]
    cleaned, _ = train_router(rows, val, cfg, progress=False)
    by_hand, val_by_hand = [ex for ex in rows if ex not in wrong], [ex for ex in val if ex not in wrong]
    reference, _ = train_router(by_hand, val_by_hand, cfg, progress=False)
    for text in ["apple banana fruit salad bowl", "engine car", "a quiet evening"]:
        assert cleaned.score(text) == reference.score(text)
    assert cleaned.config.thresholds == reference.config.thresholds
    kept, _ = train_router(rows, val, dataclasses.replace(cfg, clean_pools=0.0), progress=False)
    assert kept.score("apple banana fruit salad bowl")["car"] > cleaned.score("apple banana fruit salad bowl")["car"]
    with pytest.raises(DataError, match="clean_pools must be in"):
        train_router(rows, val, dataclasses.replace(cfg, clean_pools=1.5), progress=False)
    # the fastText learner cleans its data the same way (the cleaner is the linear model either way)
    ft = dataclasses.replace(cfg, kind="fasttext", epochs=2, dim=8, buckets=1 << 10)
    ft_cleaned, _ = train_router(rows, val, ft, progress=False)
    ft_reference, _ = train_router(by_hand, val_by_hand, ft, progress=False)
    ft_kept, _ = train_router(rows, val, dataclasses.replace(ft, clean_pools=0.0), progress=False)
    text = "apple banana fruit salad bowl"
    assert ft_cleaned.score(text) == ft_reference.score(text) != ft_kept.score(text)


def test_dev_folds_leave_out_training_sources_only_once() -> None:
    """Every dev fold names training sources of the builder (never a held-out one), each in one fold only."""
    from router import dev_eval
    from router.data import build_corpus as bc

    training = {s.name for s in bc.SOURCES if not s.heldout}
    named = [s for fold in dev_eval.FOLDS for s in fold]
    assert len(named) == len(set(named)) and set(named) <= training, set(named) - training
    assert [len(fold) for _, _, fold in dev_eval.SUMMARIES] == [4, 5, 1]  # folds 1-4, 1-5, the chat fold


def test_dev_eval_routed_matches_the_trained_router(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """dev_eval --routed scores a fold as the trainer would ship it: fit on train, thresholds from val."""
    import random
    import re

    from router import dev_eval
    from router.evaluate import routed_top1

    rng = random.Random(0)
    words = {
        "code": ["python", "function", "list", "sort", "error", "compile", "bug", "loop", "array"],
        "medical": ["symptoms", "pain", "doctor", "fever", "dose", "rash", "blood", "heart"],
        "general": ["capital", "city", "travel", "weather", "recipe", "movie", "history", "river"],
    }
    shared = ["what", "how", "why", "is", "the", "best", "way"]

    def prompts(domain: str, source: str, n: int, foreign: int = 1) -> list[Example]:
        out = []
        for _ in range(n):
            mix = rng.sample(words[domain], 2) + rng.sample(shared, 2)
            for _ in range(rng.randint(0, foreign)):  # words of another domain: scores overlap, thresholds matter
                mix.append(rng.choice(words[rng.choice([d for d in words if d != domain])]))
            label = domain if rng.random() > 0.1 else rng.choice(list(words))  # and some labels are wrong
            out.append(Example(" ".join(rng.sample(mix, len(mix))), [label], source))
        return out

    # fold 1 leaves out cqa-webmasters (code), healthsearchqa (medical), clinc150 (general)
    left_out = prompts("code", "cqa-webmasters", 40, 3) + prompts("medical", "healthsearchqa", 40, 3)
    left_out += prompts("general", "clinc150", 40, 3)
    train = prompts("code", "staqc", 60) + prompts("medical", "k-qa", 60) + prompts("general", "nlu-general", 30)
    train += prompts("general", "quora", 30) + prompts("medical", "quora", 2)  # pool items the cleaner may dispute
    val = prompts("code", "staqc", 25) + prompts("medical", "k-qa", 25) + prompts("general", "quora", 25)
    for name, rows in (("train", train + left_out[::2]), ("val", val + left_out[1::2])):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as f:
            for ex in rows:
                f.write(json.dumps({"text": ex.text, "labels": ex.labels, "source": ex.source}) + "\n")
    argv = ["dev_eval", "--corpus", str(tmp_path), "--folds", "1", "--routed"]
    monkeypatch.setattr("sys.argv", [*argv, "--drug-feature", "off", "--disease-feature", "off"])
    dev_eval.main()
    out = capsys.readouterr().out
    printed = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"(\S+)\s+([\d.]+)\s+routed ([\d.]+)", out)}

    cfg = TrainConfig(drug_feature="off", disease_feature="off")
    model, _ = train_router(train, val, cfg, progress=False)
    assert f"thresholds: {model.config.thresholds}" in out
    for source in ("cqa-webmasters", "healthsearchqa", "clinc150"):
        rows = [ex for ex in left_out if ex.source == source]
        scores = [model.score(ex.text) for ex in rows]
        top = [max(s, key=s.get) for s in scores]
        routed = [routed_top1(s, model.config.thresholds, "general")[0] for s in scores]
        argmax_acc = np.mean([t == ex.labels[0] for t, ex in zip(top, rows, strict=True)])
        routed_acc = np.mean([r == ex.labels[0] for r, ex in zip(routed, rows, strict=True)])
        assert printed[source] == (round(argmax_acc, 3), round(routed_acc, 3)), (source, printed)
    assert "mean routed accuracy over all 3 left-out sources" in out
    # a setting no fit can use is refused by name before the corpus is read, as the train command does
    monkeypatch.setattr("sys.argv", [*argv, "--nb-alpha", "-1"])
    with pytest.raises(SystemExit, match=r"dev_eval: error: nb_alpha must be a finite number >= 0"):
        dev_eval.main()
    monkeypatch.setattr("sys.argv", [*argv, "--buckets", "0"])
    with pytest.raises(SystemExit, match=r"dev_eval: error: linear_buckets must be >= 1, got 0"):
        dev_eval.main()
