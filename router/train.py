"""Train tiny ada on labelled JSONL prompts and calibrate per-domain thresholds on a validation split.

Two learners share one artifact format: "linear" (the default) fits one logistic regression per domain
with scikit-learn on L2-normalised hashed n-gram counts and stores it as a TinyAda whose embedding
table holds the weights (dim = number of domains, identity head); "fasttext" trains the low-rank
embedding-bag model with PyTorch. On real prompts the linear model generalised better to unseen
sources and trains in well under the budget (docs/router-data.md).
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import tqdm

from router.data import disease_names, drug_names
from router.model import HashingConfig, TinyAda, TinyAdaConfig, featurize

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A labelled file that cannot be used; the message names the file and line."""


@dataclass
class Example:
    text: str
    labels: list[str]
    source: str = ""  # dataset the prompt came from (router/data/SOURCES.md); empty for user data


@dataclass
class TrainConfig:
    """Training settings (defaults train the shipped router within a few minutes on 2 cores)."""

    kind: str = "linear"  # "linear" (scikit-learn logistic regression) or "fasttext" (PyTorch embedding bag)
    # linear: inverse L2 strength; 16 on unscaled counts (second round), 4 with NB scaling: chosen on the dev
    # score among 16, 8 and 4 with NB (fourteenth round, docs/router-data.md)
    c: float = 4.0
    class_weight: str | None = "balanced"  # linear: reweight so each domain's positives weigh as much as its rest
    linear_buckets: int = 1 << 18  # linear: hash space; 3 domains x 2^18 x fp16 = 1.5 MB artifact
    multi_label_weight: float = 5.0  # linear: weight of a multi-domain prompt (rare, and what top_k > 1 is for)
    source_power: float = 0.0  # linear: prompt weight n_source ** -power (source_weights); 0 = all prompts alike
    # linear: Naive Bayes feature scaling (NBSVM, Wang & Manning 2012): each domain's regression sees every
    # n-gram value times the n-gram's log-count ratio for that domain, smoothed by this alpha (nb_ratios);
    # 0 = off; 1 raised the source-disjoint dev score (fourteenth round). The routers of rounds 1-13 are
    # nb_alpha = 0 with c = 16 (both also set how the pool cleaner fits, for either learner)
    nb_alpha: float = 1.0
    # linear: static token embeddings next to the n-grams, from a causal LM checkpoint directory
    # (model.safetensors + tokenizer.json; its input embeddings, PCA-reduced) or from a router
    # artifact that already has them (its table and tokenizer are reused). "" = n-grams only.
    static_from: str = ""
    static_dim: int = 64  # PCA components kept: 49152 x 64 x fp16 = 6.3 MB of the <= 10 MB artifact
    static_scale: float = 1.0  # weight of the (unit-norm) pooled embedding against the (unit-norm) n-grams
    # linear: drug-lexicon features (HashingConfig.lexicon): "off", "names" (router/data/drugs.txt),
    # "names+suffixes" (also words ending in DRUG_SUFFIXES); "names" improved the dev score (docs/router-data.md)
    drug_feature: str = "names"
    # linear: disease-name feature (HashingConfig.lexicons["disease"]): "off" or "names" (router/data/diseases.txt,
    # one- and multi-word disease/condition/symptom names from the Human Disease Ontology); "names" raised the
    # dev score 0.8444 -> 0.8504 (docs/router-data.md, fifth round)
    disease_feature: str = "names"
    # thresholds on validation: "routing" (calibrate_routing: jointly, as the policy routes, two-domain prompts
    # included) or "f1" (calibrate_thresholds: per-domain F1, the first five rounds); docs/router-data.md, sixth round
    calibration: str = "routing"
    shapes: bool = False  # linear: identifier-shape features (HashingConfig.shapes: camelCase, snake_case, NPE...)
    one_word: bool = True  # linear: the one-word-prompt feature (HashingConfig.one_word; eighth round)
    # both learners: drop an item of a keyword-relabelled pool (relabelled_sources) when a linear model fitted
    # on the source-labelled prompts alone gives its label < 0.5 and another domain > this
    # (confident_disagreements; tenth round); 0 = keep every item
    clean_pools: float = 0.9
    epochs: int = 16
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 0.0
    dim: int = 32
    buckets: int = 1 << 15
    val_fraction: float = 0.125  # used when no separate validation file is given
    feature_dropout: float = 0.5  # drop this share of a prompt's features per step: no single cue dominates
    seed: int = 0


DRUG_FEATURES = ("off", "names", "names+suffixes")
# Suffixes of drug-class stems (WHO INN stems): -mab antibodies, -pril ACE inhibitors, -olol beta blockers...
DRUG_SUFFIXES = (
    "mab", "pril", "olol", "statin", "azole", "cillin", "mycin", "prazole", "sartan", "tidine", "oxacin", "vir",
)  # fmt: skip


def drug_lexicon(mode: str) -> tuple[list[str], list[str]]:
    """(names, suffixes) for HashingConfig.lexicon* under a drug_feature mode (names: drugs.txt's one-word entries)."""
    if mode not in DRUG_FEATURES:
        raise DataError(f"drug_feature must be one of {', '.join(DRUG_FEATURES)}, got {mode!r}")
    if mode == "off":
        return [], []
    # featurize matches single \w+ words; a hyphenated entry ("retin-a") would never match whole
    names = sorted({w.lower() for w in drug_names() if w.isalnum()})
    return names, list(DRUG_SUFFIXES) if mode == "names+suffixes" else []


DISEASE_FEATURES = ("off", "names")


def disease_lexicon(mode: str) -> dict[str, list[str]]:
    """HashingConfig.lexicons under a disease_feature mode: {"disease": diseases.txt's names} or {}."""
    if mode not in DISEASE_FEATURES:
        raise DataError(f"disease_feature must be one of {', '.join(DISEASE_FEATURES)}, got {mode!r}")
    return {"disease": disease_names()} if mode == "names" else {}


def hashing_for(cfg: TrainConfig) -> HashingConfig:
    """The linear learner's featuriser settings under a training config (lexicons included)."""
    names, suffixes = drug_lexicon(cfg.drug_feature)
    return HashingConfig(
        buckets=cfg.linear_buckets,
        punctuation=False,
        lexicon=names,
        lexicon_suffixes=suffixes,
        lexicons=disease_lexicon(cfg.disease_feature),
        shapes=cfg.shapes,
        one_word=cfg.one_word,
    )


def sample_weights(y: np.ndarray, sources: list[str], cfg: TrainConfig) -> np.ndarray:
    """Per-prompt fit weights: multi-domain prompts count cfg.multi_label_weight, times source_weights."""
    weight = np.where(y.sum(axis=1) > 1, cfg.multi_label_weight, 1.0)
    if cfg.source_power:
        weight = weight * source_weights(sources, cfg.source_power)
    return weight


def relabelled_sources() -> frozenset[str]:
    """Names of the corpus sources labelled item by item by keyword rules (router/data/relabel.py)."""
    from router.data.build_corpus import SOURCES

    return frozenset(s.name for s in SOURCES if s.label == "relabel")


def nb_ratios(x: sp.csr_matrix, y: np.ndarray, alpha: float, n_hashed: int) -> np.ndarray:
    """(label columns, x columns) log-count ratios r = log((p / |p|_1) / (q / |q|_1)) of NBSVM (Wang & Manning 2012).

    p and q count the positive and negative prompts of a label that have each n-gram, plus alpha. An
    n-gram that only one side uses gets a large |r|, one both sides use alike gets r near 0. Columns past
    the n_hashed n-gram buckets (static embeddings) are continuous values, not counts: they keep r = 1.
    Presence is binarised once for every label (the matrix is the whole corpus).
    """
    present = x[:, :n_hashed].copy()  # explicit: the caller's matrix must keep its values
    present.data[:] = 1.0  # binarised: does the prompt have the n-gram
    pos = np.ascontiguousarray(np.asarray(present.T @ y, dtype=np.float32).T)  # exact: integer counts below 2^24
    neg = np.asarray(present.sum(axis=0), dtype=np.float32) - pos
    pos, neg = pos + np.float32(alpha), neg + np.float32(alpha)
    r = np.ones((y.shape[1], x.shape[1]), dtype=np.float32)
    r[:, :n_hashed] = np.log((pos / pos.sum(axis=1, keepdims=True)) / (neg / neg.sum(axis=1, keepdims=True)))
    return r


class ScaledLogistic:
    """A logistic regression fitted on columns scaled by r; it scores unscaled rows, and coef_ is weights * r."""

    def __init__(self, lr, r: np.ndarray) -> None:
        self.lr, self.r, self.scale = lr, r, sp.diags(r)

    def fit(self, x: sp.csr_matrix, y: np.ndarray, sample_weight: np.ndarray) -> ScaledLogistic:
        self.lr.fit(x @ self.scale, y, sample_weight=sample_weight)
        return self

    @property
    def coef_(self) -> np.ndarray:
        return self.lr.coef_ * self.r  # what the TinyAda artifact stores

    @property
    def intercept_(self) -> np.ndarray:
        return self.lr.intercept_

    def decision_function(self, x: sp.csr_matrix) -> np.ndarray:
        return self.lr.decision_function(x @ self.scale)

    def predict_proba(self, x: sp.csr_matrix) -> np.ndarray:
        return self.lr.predict_proba(x @ self.scale)


def fit_linear(x: sp.csr_matrix, y: np.ndarray, sample_weight: np.ndarray, cfg: TrainConfig) -> list:
    """One liblinear logistic regression per label column (the linear learner and its cleaner share it).

    With cfg.nb_alpha > 0 each column's regression is fitted on NB-scaled features (nb_ratios): the L2
    prior then costs less for the n-grams that separate the domain and pulls the uninformative ones to
    zero harder. The scaling folds into the weights, so serving is unchanged.
    """
    from sklearn.linear_model import LogisticRegression  # import here: serving never needs scikit-learn

    def new() -> LogisticRegression:
        return LogisticRegression(C=cfg.c, solver="liblinear", class_weight=cfg.class_weight, max_iter=300)

    if cfg.nb_alpha <= 0:
        return [new().fit(x, y[:, j], sample_weight=sample_weight) for j in range(y.shape[1])]
    ratios = nb_ratios(x, y, cfg.nb_alpha, min(x.shape[1], cfg.linear_buckets))
    return [ScaledLogistic(new(), r).fit(x, y[:, j], sample_weight) for j, r in enumerate(ratios)]


def confident_disagreements(
    x: sp.csr_matrix,
    y: np.ndarray,
    sources: list[str],
    pools: frozenset[str],
    cfg: TrainConfig,
    score_rows: tuple[sp.csr_matrix, np.ndarray, list[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of pool items whose keyword label a source-labelled model confidently disputes.

    Keyword rules label a mixed pool (Quora, MS MARCO, Dolly...) item by item, and miss what they have
    no cue for: "why do my fingers go numb" has no strong medical word, so it is labelled general and
    teaches the router that such questions are general. A model fitted on the other sources, whose
    labels come from the source itself, catches many such items: an item is flagged when that model
    gives its label < 0.5 and some other domain > cfg.clean_pools. Single-label items of pools only;
    every source-labelled prompt is kept. Of a seeded sample of 40 flagged items, 11 were mislabelled, 3 moot
    and the rest hard but right (science trivia flagged medical): it trades general recall for medical
    recall, which the dev score weighed (docs/router-data.md, tenth round). score_rows (x, y, sources)
    are flagged by the same model (the validation split); without them the second mask is empty.
    """
    score_rows = score_rows or (x[:0], y[:0], [])
    src = np.asarray(sources)
    trusted = ~np.isin(src, list(pools))
    nothing = np.zeros(len(src), dtype=bool), np.zeros(len(score_rows[2]), dtype=bool)
    if cfg.clean_pools <= 0 or trusted.all():
        return nothing
    if (y[trusted].min(axis=0) == y[trusted].max(axis=0)).any():
        # a domain whose prompts all come from pools (or that labels every trusted prompt) has no judge
        logger.warning("clean_pools: a domain has no source-labelled positives or negatives; nothing flagged")
        return nothing
    fitted = fit_linear(x[trusted], y[trusted], sample_weights(y[trusted], list(src[trusted]), cfg), cfg)

    def flag(xs: sp.csr_matrix, ys: np.ndarray, ss: list[str]) -> np.ndarray:
        rows = np.isin(np.asarray(ss), list(pools)) & (ys.sum(axis=1) == 1)
        out = np.zeros(len(ss), dtype=bool)
        if rows.any():
            probs = np.stack([lr.predict_proba(xs[rows])[:, 1] for lr in fitted], axis=1)
            own = (probs * ys[rows]).sum(axis=1)
            other = np.where(ys[rows] == 1, 0.0, probs).max(axis=1)
            out[rows] = (own < 0.5) & (other > cfg.clean_pools)
        return out

    return flag(x, y, sources), flag(*score_rows)


def pool_disputes(
    train: list[Example],
    val: list[Example],
    domains: list[str],
    cfg: TrainConfig,
    x: sp.csr_matrix | None = None,
    xv: sp.csr_matrix | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """confident_disagreements over a train/val pair, as masks to drop; both learners clean their data with it.

    x and xv are the design matrices when the caller has them (the linear learner); otherwise the prompts
    are featurised with the linear learner's hashing, since the cleaner is that learner.
    """
    if cfg.clean_pools <= 0:
        return np.zeros(len(train), dtype=bool), np.zeros(len(val), dtype=bool)
    hashing = hashing_for(cfg)
    x = features([ex.text for ex in train], hashing) if x is None else x
    xv = features([ex.text for ex in val], hashing) if xv is None else xv
    y, yv = targets(train, domains).numpy(), targets(val, domains).numpy()
    sources, val_sources = [ex.source for ex in train], [ex.source for ex in val]
    drop, drop_val = confident_disagreements(x, y, sources, relabelled_sources(), cfg, (xv, yv, val_sources))
    if drop.any() or drop_val.any():
        logger.info("clean_pools: dropped %d training and %d validation pool items", drop.sum(), drop_val.sum())
    return drop, drop_val


def _keep(examples: list[Example], drop: np.ndarray) -> list[Example]:
    return [ex for ex, d in zip(examples, drop, strict=True) if not d]


def read_jsonl(path: str | Path) -> list[Example]:
    """{"text": str, "labels": [str, ...], "source"?: str} per line (.jsonl or .jsonl.gz); bad lines name their line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            text, labels = row.get("text") if isinstance(row, dict) else None, None
            if isinstance(row, dict):
                labels = row.get("labels")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{n}: 'text' must be a non-empty string")
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise DataError(f"{path}:{n}: 'labels' must be a non-empty list of strings, got {labels!r}")
            source = row.get("source", "")
            out.append(Example(text, labels, source if isinstance(source, str) else ""))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def targets(examples: list[Example], domains: list[str]) -> torch.Tensor:
    index = {d: i for i, d in enumerate(domains)}
    y = torch.zeros(len(examples), len(domains))
    for i, ex in enumerate(examples):
        for label in ex.labels:
            y[i, index[label]] = 1.0
    return y


def source_weights(sources: list[str], power: float) -> np.ndarray:
    """Per-row weight n_source ** -power, scaled to mean 1: power 0 weighs every prompt alike, power 1
    every source alike; in between, a big pool (CLINC, MS MARCO) still counts more, but less than its size."""
    _, inverse, counts = np.unique(np.asarray(sources), return_inverse=True, return_counts=True)
    w = counts[inverse].astype(np.float64) ** -power
    return w / w.mean()


def calibrate_thresholds(probs: np.ndarray, y: np.ndarray, domains: list[str]) -> dict[str, float]:
    """Per domain, the threshold maximising F1 on validation (ties: the one closest to 0.5)."""
    grid = np.round(np.arange(0.05, 0.951, 0.025), 3)
    out = {}
    for j, d in enumerate(domains):
        best = (-1.0, 0.0, 0.5)
        for t in grid:
            pred = probs[:, j] >= t
            tp = float((pred & (y[:, j] == 1)).sum())
            fp = float((pred & (y[:, j] == 0)).sum())
            fn = float((~pred & (y[:, j] == 1)).sum())
            f1 = 2 * tp / max(1.0, 2 * tp + fp + fn)
            key = (f1, -abs(t - 0.5), t)
            if key > best:
                best = key
        out[d] = float(best[2])
    return out


CALIBRATIONS = ("routing", "f1")


def calibrate(probs: np.ndarray, y: np.ndarray, domains: list[str], mode: str) -> dict[str, float]:
    """Validation thresholds under TrainConfig.calibration."""
    if mode == "routing":
        return calibrate_routing(probs, y, domains)
    if mode == "f1":
        return calibrate_thresholds(probs, y, domains)
    raise DataError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {mode!r}")


def routed_choices(probs: np.ndarray, t: np.ndarray, fallback: int | None, top_k: int) -> np.ndarray:
    """(N, domains) mask of the domains each row is sent to, as router.policy.RoutingPolicy chooses: every
    domain whose score reaches its threshold, at most top_k, highest first; none: the fallback column (None:
    the argmax)."""
    passed = probs >= t
    masked = np.where(passed, probs, -1.0)
    rank = (-masked).argsort(axis=1).argsort(axis=1)  # 0 = highest passing score
    chosen = passed & (rank < top_k)
    none = ~chosen.any(axis=1)
    chosen[none, probs[none].argmax(axis=1) if fallback is None else fallback] = True
    return chosen


def _routing_objective(
    probs: np.ndarray, y: np.ndarray, t: np.ndarray, fallback: int | None, top_k: int, multi_weight: float
) -> float:
    """(1 - w) * share of single-label rows routed to exactly their domain + w * share of multi-domain rows
    with every labelled domain chosen.

    Domains are chosen as served (routed_choices). A single-label row counts only if
    the chosen set is its one domain, so a low threshold that adds a needless second specialist costs
    as much as a wrong one (otherwise the two-domain term alone would push thresholds towards 0).
    """
    chosen = routed_choices(probs, t, fallback, top_k)
    truth = y == 1
    single, multi = truth.sum(axis=1) == 1, truth.sum(axis=1) > 1
    exact = float((chosen[single] == truth[single]).all(axis=1).mean()) if single.any() else 0.0
    if not multi.any() or multi_weight <= 0:
        return exact
    all_chosen = float((truth[multi] <= chosen[multi]).all(axis=1).mean())
    return (1 - multi_weight) * exact + multi_weight * all_chosen


def calibrate_routing(
    probs: np.ndarray,
    y: np.ndarray,
    domains: list[str],
    fallback: str | None = "general",
    top_k: int = 2,
    multi_weight: float = 0.25,
    min_gain: float = 0.002,
) -> dict[str, float]:
    """Thresholds for how prompts are routed: single-label prompts to exactly their domain, multi-domain ones
    to every labelled domain (weighted multi_weight), jointly over the domains (_routing_objective).

    Per-domain F1 (calibrate_thresholds) judges each domain alone, so it ignores that a two-domain prompt
    needs both domains over threshold, that a single-label prompt under every threshold goes to the
    fallback, and that a second domain over threshold calls a second specialist. Coordinate ascent from
    0.5 over the same grid; a move must raise the objective by min_gain (0.002: about 8 of 4,000 validation
    prompts), so thresholds leave 0.5 only for a clear gain. Chosen on validation by cross-fitting over
    source halves (docs/router-data.md, sixth round): per-domain F1 thresholds and small moves fitted the
    validation sources, not new ones.
    """
    grid = np.round(np.arange(0.05, 0.951, 0.025), 3)
    t = np.full(len(domains), 0.5)
    fb = domains.index(fallback) if fallback in domains else None
    best = _routing_objective(probs, y, t, fb, top_k, multi_weight)
    for _ in range(10):  # passes; converges in two or three on real validation data
        moved = False
        for j in range(len(domains)):
            for v in sorted(grid, key=lambda g: abs(g - t[j])):  # nearest first: ties keep the nearer value
                trial = t.copy()
                trial[j] = v
                score = _routing_objective(probs, y, trial, fb, top_k, multi_weight)
                if score > best + min_gain:
                    best, t, moved = score, trial, True
        if not moved:
            break
    return {d: float(t[j]) for j, d in enumerate(domains)}


def _dropout(ids: torch.Tensor, p: float) -> torch.Tensor:
    if p <= 0 or len(ids) < 2:
        return ids
    keep = torch.rand(len(ids)) >= p
    return ids[keep] if keep.any() else ids[:1]


def _split_val(train: list[Example], val: list[Example] | None, cfg: TrainConfig) -> tuple[list, list, list[str]]:
    if val is None:
        shuffled = train[:]
        random.Random(cfg.seed).shuffle(shuffled)
        n_val = max(1, int(len(shuffled) * cfg.val_fraction))
        val, train = shuffled[:n_val], shuffled[n_val:]
    domains = sorted({label for ex in train for label in ex.labels})
    unknown = sorted({label for ex in val for label in ex.labels} - set(domains))
    if unknown:
        raise DataError(f"validation labels {unknown} never occur in training data")
    return train, val, domains


def features(texts: list[str], cfg: HashingConfig) -> sp.csr_matrix:
    """(N, buckets) L2-normalised n-gram counts: exactly what TinyAda.score computes with pooling="l2"."""
    indptr, cols, vals = [0], [], []
    for text in texts:
        ids = featurize(text, cfg) or [0]
        u, c = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        cols.append(u)
        vals.append(c / np.sqrt(float((c * c).sum())))
        indptr.append(indptr[-1] + len(u))
    return sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), np.concatenate(cols), np.asarray(indptr)),
        shape=(len(texts), cfg.buckets),
    )


def load_static(source: str | Path, dim: int) -> tuple[np.ndarray, object]:
    """(vocab, dim) reduced embedding table and tokenizer from a checkpoint dir or a router artifact."""
    from tokenizers import Tokenizer

    source = Path(source)
    if (source / "router.json").is_file():
        model = TinyAda.load(source)
        if not model.config.static_dim:
            raise DataError(f"static_from: router artifact {str(source)!r} has no static embeddings")
        return model.static_table.float().numpy(), model.tokenizer
    weights, tok = source / "model.safetensors", source / "tokenizer.json"
    if not weights.is_file() or not tok.is_file():
        raise DataError(
            f"static_from: {str(source)!r} needs model.safetensors and tokenizer.json (or be a router artifact)"
        )
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as fh:
        names = [k for k in fh.keys() if k.endswith("embed_tokens.weight")]  # noqa: SIM118 (not a dict)
        if not names:
            raise DataError(f"static_from: {str(weights)!r} has no embed_tokens.weight tensor")
        emb = fh.get_tensor(names[0]).float().numpy()
    if not 0 < dim <= emb.shape[1]:
        raise DataError(f"static_dim must be in 1..{emb.shape[1]}, got {dim}")
    centred = emb - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # principal directions of the token space
    vt = vt[:dim] * np.sign(vt[:dim, :1] + 1e-12)  # fixed sign per component: same table every run
    return (centred @ vt.T).astype(np.float32), Tokenizer.from_file(str(tok))


def static_matrix(texts: list[str], tokenizer, table: np.ndarray, max_chars: int) -> np.ndarray:
    """(N, k) pooled static features, exactly as TinyAda.score computes them."""
    from router.model import static_features

    return np.stack([static_features(t, tokenizer, table, max_chars) for t in texts]).astype(np.float32)


def train_linear(
    train: list[Example], val: list[Example] | None = None, config: TrainConfig | None = None
) -> tuple[TinyAda, dict[str, float]]:
    """One-vs-rest logistic regression per domain on hashed n-grams, stored as an identity-head TinyAda."""
    cfg = config or TrainConfig()
    train, val, domains = _split_val(train, val, cfg)
    t0 = time.perf_counter()
    hashing = hashing_for(cfg)
    static = None
    if cfg.static_from:
        table, tokenizer = load_static(cfg.static_from, cfg.static_dim)
        table = table.astype(np.float16).astype(np.float32)  # train on what the fp16 artifact will serve
        static = (table, tokenizer)

    def design(examples: list[Example]) -> sp.csr_matrix:
        x = features([ex.text for ex in examples], hashing)
        if static is None:
            return x
        s_x = static_matrix([ex.text for ex in examples], static[1], static[0], hashing.max_chars)
        return sp.hstack([x, sp.csr_matrix(s_x * cfg.static_scale)]).tocsr()

    x, xv = design(train), design(val)
    y = targets(train, domains).numpy()
    for j, domain in enumerate(domains):
        if y[:, j].min() == y[:, j].max():
            raise DataError(f"domain {domain!r} labels every training prompt: a classifier needs negatives too")
    yv = targets(val, domains).numpy()
    drop, drop_val = pool_disputes(train, val, domains, cfg, x, xv)
    x, y, train = x[~drop], y[~drop], _keep(train, drop)
    val, yv = _keep(val, drop_val), yv[~drop_val]
    fitted = fit_linear(x, y, sample_weights(y, [ex.source for ex in train], cfg), cfg)
    weights, biases = [lr.coef_[0] for lr in fitted], [lr.intercept_[0] for lr in fitted]
    n, b = len(domains), hashing.buckets
    w_all = np.stack(weights, axis=1)  # (buckets [+ k], n_domains)
    model = TinyAda(
        TinyAdaConfig(
            domains=domains,
            dim=n,
            hashing=hashing,
            pooling="l2",
            static_dim=static[0].shape[1] if static else 0,
            static_vocab=static[0].shape[0] if static else 0,
        )
    )
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(w_all[:b]))
        if static:
            model.static_table.copy_(torch.from_numpy(static[0]))
            model.static_weight.copy_(torch.from_numpy(w_all[b:].T * cfg.static_scale))  # scale folded in
            model.tokenizer = static[1]
        model.head.weight.copy_(torch.eye(n))
        model.head.bias.copy_(torch.tensor(biases))
    model.eval()
    model.refresh()
    probs = np.array([[s[d] for d in domains] for s in model.score_batch([ex.text for ex in val])])
    model.config.thresholds = calibrate(probs, yv, domains, cfg.calibration)
    seconds = time.perf_counter() - t0
    logger.info("trained linear router on %d prompts, %d domains in %.1fs", len(train), n, seconds)
    eps = 1e-6
    val_loss = float(-(yv * np.log(probs + eps) + (1 - yv) * np.log(1 - probs + eps)).mean())
    return model, {"val_loss": val_loss, "train_seconds": seconds}


def check_config(cfg: TrainConfig) -> None:
    """Refuse, by field name, settings no fit can use; before the fit, not after it (dev_eval calls it too)."""
    if cfg.calibration not in CALIBRATIONS:
        raise DataError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {cfg.calibration!r}")
    if not 0.0 <= cfg.clean_pools < 1.0:
        raise DataError(f"clean_pools must be in [0, 1) (0: off), got {cfg.clean_pools!r}")
    # isfinite: liblinear refuses an infinite C, and an infinite alpha makes every NB ratio NaN
    if not (np.isfinite(cfg.c) and cfg.c > 0.0):
        raise DataError(f"c must be a finite number > 0, got {cfg.c!r}")
    if not (np.isfinite(cfg.nb_alpha) and cfg.nb_alpha >= 0.0):
        raise DataError(f"nb_alpha must be a finite number >= 0 (0: off), got {cfg.nb_alpha!r}")
    if cfg.linear_buckets < 1:
        raise DataError(f"linear_buckets must be >= 1, got {cfg.linear_buckets!r}")


def train_router(
    train: list[Example],
    val: list[Example] | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[TinyAda, dict[str, float]]:
    """Fit a TinyAda; return it with its validation metrics. Domains are the sorted labels in the data."""
    cfg = config or TrainConfig()
    check_config(cfg)
    if cfg.kind == "linear":
        return train_linear(train, val, cfg)
    if cfg.kind != "fasttext":
        raise ValueError(f"kind must be 'linear' or 'fasttext', got {cfg.kind!r}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train, val, domains = _split_val(train, val, cfg)
    drop, drop_val = pool_disputes(train, val, domains, cfg)  # the same data step as the linear learner
    train, val = _keep(train, drop), _keep(val, drop_val)
    model = TinyAda(TinyAdaConfig(domains=domains, dim=cfg.dim, hashing=HashingConfig(buckets=cfg.buckets)))
    feats = [model.batch([ex.text]) for ex in train]  # featurise once, reuse each epoch
    ids = [f[0] for f in feats]
    y = targets(train, domains)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    order = list(range(len(train)))
    bar = tqdm(
        total=cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size),
        disable=not progress,
        desc="router train",
        unit="step",
    )
    model.train()
    for epoch in range(cfg.epochs):
        random.Random(cfg.seed + epoch).shuffle(order)
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            bags = [_dropout(ids[i], cfg.feature_dropout) for i in idx]
            flat = torch.cat(bags)
            offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
            loss = loss_fn(model(flat, offsets), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / len(train):.4f}")
    bar.close()
    model.eval()
    model.refresh()
    probs = np.array([[s[d] for d in domains] for s in model.score_batch([ex.text for ex in val])])
    yv = targets(val, domains).numpy()
    model.config.thresholds = calibrate(probs, yv, domains, cfg.calibration)
    logger.info("trained on %d prompts, %d domains in %.1fs", len(train), len(domains), time.perf_counter() - t0)
    val_loss = float(loss_fn(torch.logit(torch.tensor(probs).clamp(1e-6, 1 - 1e-6)), torch.tensor(yv)))
    return model, {"val_loss": val_loss, "train_seconds": time.perf_counter() - t0}
