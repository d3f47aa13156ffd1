"""Tiny ada: a multi-label domain classifier over hashed word and character n-grams (fastText-style or linear)."""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "router.safetensors"
META_FILE = "router.json"
TOKENIZER_FILE = "tokenizer.json.gz"  # static-embedding tokenizer, gzipped (3.5 MB -> under 1 MB)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)


def phrase_words(text: str) -> tuple[str, ...]:
    """A lexicon name's words as the featuriser matches them (NFKC, lower case, \\w+ runs)."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


class RouterInputError(ValueError):
    """A prompt the router cannot score (empty or whitespace only)."""


@dataclass
class HashingConfig:
    """How text becomes feature ids; saved with the weights so scoring never drifts from training."""

    buckets: int = 1 << 15  # hash space shared by all feature kinds
    char_ngrams: tuple[int, int] = (3, 5)  # inclusive n range of character n-grams inside "<word>"
    word_ngrams: int = 2  # word unigrams .. n-grams
    max_chars: int = 2000  # only this prefix is featurised: a 1 MB prompt costs the same as a long one
    max_word_len: int = 30  # longer "words" (base64, hashes) give no char n-grams
    # Punctuation tokens ("?", ".") mark a source's style (search queries and issue titles have none)
    # more than a domain; the linear router leaves them out. True keeps older artifacts' features.
    punctuation: bool = True
    # Lexicon feature: a word in `lexicon` (drug names) adds one shared "lexicon" feature, a word ending
    # in one of `lexicon_suffixes` (-pril, -olol) another, so a drug the training data never names still
    # counts like one it does. Stored in the artifact (a few kB) so scoring never depends on repo files.
    lexicon: list[str] = field(default_factory=list)
    lexicon_suffixes: list[str] = field(default_factory=list)
    # Phrase lexicons, by feature name (e.g. "disease": router/data/diseases.txt): every occurrence of a
    # listed name, one word or several ("scurvy", "spinocerebellar ataxia"), adds the one shared feature
    # "L <name>", longest match first. Names are matched on the prompt's words (\w+ runs, lower case).
    lexicons: dict[str, list[str]] = field(default_factory=dict)
    # Identifier-shape features: each camelCase, snake_case, dotted.name, ALLCAPS acronym, call(), /path,
    # --flag or file.ext in the prompt (read before lower-casing) adds the shared id of its shape, so
    # project jargon ("Fix NPE in CacheManager.evict") looks like code even when its words were never seen.
    shapes: bool = False
    # A one-word prompt ("cool", "help", "lol") adds one shared feature. Its few n-grams otherwise decide
    # alone, and short words share endings with code tokens ("cool" and "bool"); every one-word training
    # prompt is small talk, so the feature learns that one word is too little to pick a specialist on.
    one_word: bool = False

    def __post_init__(self) -> None:
        # set and tuple built once: featurize is on the hot path
        self._lexicon_set = frozenset(w.lower() for w in self.lexicon)
        self._suffixes = tuple(s.lower() for s in self.lexicon_suffixes)
        self._lexicon_id = zlib.crc32(b"L lexicon") % self.buckets
        self._suffix_id = zlib.crc32(b"L suffix") % self.buckets
        # per lexicon: (feature id, {first word: name lengths, longest first}, {word tuples})
        self._phrases: list[tuple[int, dict[str, tuple[int, ...]], frozenset[tuple[str, ...]]]] = []
        for name in sorted(self.lexicons):
            names = {phrase_words(e) for e in self.lexicons[name]}
            names.discard(())
            lengths: dict[str, set[int]] = {}
            for words in names:
                lengths.setdefault(words[0], set()).add(len(words))
            first = {w: tuple(sorted(ns, reverse=True)) for w, ns in lengths.items()}
            self._phrases.append((zlib.crc32(b"L " + name.encode()) % self.buckets, first, frozenset(names)))
        self._shape_ids = [(zlib.crc32(b"S " + k.encode()) % self.buckets, rx) for k, rx in _SHAPES.items()]
        self._one_word_id = zlib.crc32(b"N one word") % self.buckets


# Written forms of identifiers and commands (HashingConfig.shapes), matched on the original-case prefix.
_SHAPES = {
    "camel": re.compile(r"\b[a-z]+[A-Z][A-Za-z0-9]*|\b[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*"),  # getElementById, ArrayList
    "snake": re.compile(r"\b[A-Za-z_][A-Za-z0-9]*_[A-Za-z0-9_]+"),  # max_chars, __init__
    "dotted": re.compile(r"\b[A-Za-z_]\w+\.[A-Za-z_]\w+"),  # os.path, Node.js, System.out ("e.g." has 1-letter parts)
    "acronym": re.compile(r"\b[A-Z]{2,6}s?\b"),  # NPE, API, CLI (and HIV, USA: the learned weight decides)
    "call": re.compile(r"\w\((?:[\w ,.'\"]*)\)"),  # foo(), f(x); "symptoms (fever)" has a space before "("
    "path": re.compile(r"(?<![\w:/])/[A-Za-z_.][\w.-]*/|\b[A-Za-z]:\\\w"),  # /usr/bin/, C:\\Users
    "flag": re.compile(r"(?<!\S)--?[A-Za-z][\w-]*"),  # -r, --force
    "ext": re.compile(
        r"\w\.(?:py|js|ts|jsx|tsx|java|cpp|hpp|c|h|cs|rb|go|rs|php|html|css|json|xml|ya?ml|sh|sql|jar|dll|exe|"
        r"so|csv|txt|log|conf|ini|toml|lock|md)\b"
    ),  # file.ext
}


_LEXICON_MIN_STEM = 3  # "-vir" on "vir" or "-mab" on "mab" alone is no drug name


def featurize(text: str, cfg: HashingConfig) -> list[int]:
    """Hashed feature ids of a prompt (duplicates kept: the bag is a mean, like fastText)."""
    text = unicodedata.normalize("NFKC", text[: cfg.max_chars])
    shape_ids = [i for i, rx in cfg._shape_ids for _ in rx.finditer(text)] if cfg.shapes else []
    text = text.lower()
    tokens = (_TOKEN if cfg.punctuation else _WORD).findall(text)
    b = cfg.buckets
    ids = [zlib.crc32(b"w" + t.encode()) % b for t in tokens]
    for n in range(2, cfg.word_ngrams + 1):
        ids += [zlib.crc32(("g " + " ".join(tokens[i : i + n])).encode()) % b for i in range(len(tokens) - n + 1)]
    lo, hi = cfg.char_ngrams
    for t in tokens:
        if len(t) < 2 or len(t) > cfg.max_word_len:
            continue
        w = f"<{t}>".encode()
        for n in range(lo, hi + 1):
            ids += [zlib.crc32(w[i : i + n]) % b for i in range(len(w) - n + 1)]
    if cfg._lexicon_set or cfg._suffixes:
        ids += _lexicon_ids(tokens, cfg)
    if cfg._phrases:
        ids += _phrase_ids(tokens if not cfg.punctuation else [t for t in tokens if t[0].isalnum() or t[0] == "_"], cfg)
    if cfg.one_word and len(tokens) == 1:
        ids.append(cfg._one_word_id)
    return ids + shape_ids


def _phrase_ids(words: list[str], cfg: HashingConfig) -> list[int]:
    """One id per occurrence of a phrase-lexicon name; a match consumes its words (longest match first)."""
    out = []
    for feature_id, first, names in cfg._phrases:
        i, n = 0, len(words)
        while i < n:
            step = 1
            for length in first.get(words[i], ()):
                if i + length <= n and (length == 1 or tuple(words[i : i + length]) in names):
                    out.append(feature_id)
                    step = length
                    break
            i += step
    return out


def _lexicon_ids(tokens: list[str], cfg: HashingConfig) -> list[int]:
    """One "lexicon" id per word in the lexicon, one "suffix" id per other word with a lexicon suffix."""
    hit, suffix_hit = cfg._lexicon_id, cfg._suffix_id
    out = []
    for t in tokens:
        if t in cfg._lexicon_set:
            out.append(hit)
        elif (
            cfg._suffixes
            and t.isalpha()
            and t.endswith(cfg._suffixes)  # cheap C-level test first: most words end in no suffix
            and any(t.endswith(s) and len(t) - len(s) >= _LEXICON_MIN_STEM for s in cfg._suffixes)
        ):
            out.append(suffix_hit)
    return out


def static_features(text: str, tokenizer, table: np.ndarray, max_chars: int) -> np.ndarray:
    """L2-normalised mean of the reduced embedding rows of the prompt prefix's subword tokens."""
    ids = tokenizer.encode(unicodedata.normalize("NFKC", text[:max_chars]), add_special_tokens=False).ids
    if not ids:
        return np.zeros(table.shape[1], dtype=np.float32)
    v = table[ids].mean(axis=0)
    return v / (float(np.linalg.norm(v)) + 1e-8)


@dataclass
class TinyAdaConfig:
    """Model and artifact settings."""

    domains: list[str]  # output order; comes from the data
    dim: int = 32  # embedding width
    hashing: HashingConfig = field(default_factory=HashingConfig)
    thresholds: dict[str, float] = field(default_factory=dict)  # per domain, calibrated on validation
    # "mean": bag mean, as fastText; "l2": n-gram counts over their L2 norm (the linear model: a long
    # prompt's many n-grams then do not drown the few that name its domain)
    pooling: str = "mean"
    # Static token embeddings (model2vec-style): a prompt's subword tokens, mean-pooled over a
    # PCA-reduced copy of a small LM's input-embedding table, L2-normalised, feed a second linear
    # block next to the n-grams. 0 = off (older artifacts). The table and tokenizer ship in the artifact.
    static_dim: int = 0
    static_vocab: int = 0


class TinyAda(nn.Module):
    """Mean of hashed n-gram embeddings -> linear -> one independent sigmoid per domain."""

    def __init__(self, config: TinyAdaConfig) -> None:
        super().__init__()
        if not config.domains:
            raise ValueError("a router needs at least one domain")
        if config.pooling not in ("mean", "l2"):
            raise ValueError(f"pooling must be 'mean' or 'l2', got {config.pooling!r}")
        self.config = config
        self.embed = nn.EmbeddingBag(config.hashing.buckets, config.dim, mode="mean")
        self.head = nn.Linear(config.dim, len(config.domains))
        nn.init.uniform_(self.embed.weight, -1.0 / config.dim, 1.0 / config.dim)
        self._np: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.tokenizer = None  # tokenizers.Tokenizer when static_dim > 0
        if config.static_dim:
            # (vocab, k) reduced embedding rows and (n_domains, k) weights on their normalised mean
            self.register_buffer("static_table", torch.zeros(config.static_vocab, config.static_dim))
            self.register_buffer("static_weight", torch.zeros(len(config.domains), config.static_dim))
            self._static_np: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def domains(self) -> list[str]:
        return self.config.domains

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.config.pooling != "mean":
            raise NotImplementedError("forward trains the mean-pooled model; score() serves every pooling")
        return self.head(self.embed(ids, offsets))  # (B, n_domains) logits

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [featurize(t, self.config.hashing) or [0] for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        return torch.tensor([i for f in feats for i in f]), offsets

    def score(self, text: str) -> dict[str, float]:
        """Per-domain probability for one prompt; numpy on the hot path (no autograd, no dispatch)."""
        if not isinstance(text, str):
            raise RouterInputError(f"prompt must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RouterInputError("prompt is empty or whitespace only")
        if self._np is None or self.training:
            self.refresh()
        emb, w, b = self._np  # type: ignore[misc]
        ids = featurize(text, self.config.hashing)
        if not ids:  # only punctuation or symbols (with punctuation=False): score the empty bag, do not fail
            ids = [0]
        if self.config.pooling == "l2":
            _, counts = np.unique(ids, return_counts=True)
            h = emb[ids].sum(axis=0) / np.sqrt(float((counts * counts).sum()))  # (D,)
        else:
            h = emb[ids].mean(axis=0)  # (D,)
        logits = w @ h + b  # (n_domains,)
        if self.config.static_dim:
            table, sw = self._static_np  # type: ignore[misc]
            logits = logits + sw @ static_features(text, self.tokenizer, table, self.config.hashing.max_chars)
        probs = 1.0 / (1.0 + np.exp(-logits))
        return {d: float(p) for d, p in zip(self.domains, probs, strict=True)}

    def score_batch(self, texts: list[str]) -> list[dict[str, float]]:
        return [self.score(t) for t in texts]

    def refresh(self) -> None:
        """Copy weights to numpy for scoring (call after training)."""
        self._np = (
            self.embed.weight.detach().float().numpy(),
            self.head.weight.detach().float().numpy(),
            self.head.bias.detach().float().numpy(),
        )
        if self.config.static_dim:
            self._static_np = (self.static_table.float().numpy(), self.static_weight.float().numpy())

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        # fp16 halves the artifact; scores move by ~1e-4, far below any threshold's resolution.
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, out / WEIGHTS_FILE)
        meta = asdict(self.config)
        meta["format"] = "consilium-tiny-ada/1"
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        if self.config.static_dim:
            # mtime=0: the same tokenizer gives the same bytes
            (out / TOKENIZER_FILE).write_bytes(gzip.compress(self.tokenizer.to_str().encode(), mtime=0))
        return out

    @classmethod
    def load(cls, path: str | Path) -> TinyAda:
        path = Path(path)
        meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{path} is not a router artifact (needs {META_FILE} and {WEIGHTS_FILE})")
        meta = json.loads(meta_path.read_text())
        meta.pop("format", None)
        h = meta.pop("hashing")
        h["char_ngrams"] = tuple(h["char_ngrams"])
        model = cls(TinyAdaConfig(hashing=HashingConfig(**h), **meta))
        model.load_state_dict({k: v.float() for k, v in load_file(weights_path).items()})
        if model.config.static_dim:
            tok_path = path / TOKENIZER_FILE
            if not tok_path.is_file():
                raise FileNotFoundError(f"{path} uses static embeddings but has no {TOKENIZER_FILE}")
            from tokenizers import Tokenizer

            model.tokenizer = Tokenizer.from_str(gzip.decompress(tok_path.read_bytes()).decode())
        model.eval()
        model.refresh()
        return model


def shipped_router_path() -> Path:
    """The router trained on router/data/ that ships with the package."""
    return Path(__file__).parent / "artifacts" / "default"
