"""Builds router/data/diseases.txt, the disease/symptom lexicon of the router's disease-name feature.

Names come from the Human Disease Ontology (DiseaseOntology/HumanDiseaseOntology, CC0 1.0) at a pinned
commit, read from its bare git mirror like every corpus source: the disease labels of
`DOreports/HumanDO.tsv`, the names and EXACT synonyms of the subset `.obo` files (the full `doid.obo`
is over the mirror's file-size limit; the subsets carry synonyms for about 10,000 of its terms) and the
labels and exact synonyms of the Symptom Ontology classes in `src/ontology/imports/symp_import.owl`.
Each name is lower-cased and split into words exactly as the featuriser splits a prompt.

Then a measured filter: every name is matched against the committed training prompts
(corpus/train.jsonl.gz) and dropped when it fires mostly outside medical prompts (ordinary English
words such as "cold" or "crash" as symptom names, "virus" in computing): see `keep`. The output depends
only on the pinned commit, the committed corpus and this file: the same inputs give the same bytes.

Run:  python -m router.data.build_diseases --mirrors /work/.mirror     (writes router/data/diseases.txt)
"""

from __future__ import annotations

import argparse
import csv
import io
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from router.data import DATA_DIR
from router.data.build_corpus import CorpusError, Source, git_reader
from router.model import phrase_words

REPO = "DiseaseOntology/HumanDiseaseOntology"
COMMIT = "9fbefd6651b79526165453395d06c8fd4bfe4247"
LICENCE = "CC0 1.0"  # LICENSE at the pinned commit; build() checks it
LABELS = "DOreports/HumanDO.tsv"
SYMPTOMS = "src/ontology/imports/symp_import.owl"
SUBSETS = [
    f"src/ontology/releases/subsets/{name}.obo"
    for name in (
        "DO_AGR_slim", "DO_CFDE_slim", "DO_FlyBase_slim", "DO_GXD_slim", "DO_IEDB_slim", "DO_MGI_slim",
        "DO_RAD_slim", "DO_cancer_slim", "DO_childhood_cancer_slim", "DO_infectious_disease_slim",
        "DO_rare_slim", "GOLD", "NCIthesaurus", "TopNodes_DOcancerslim",
        "gram-negative_bacterial_infectious_disease", "gram-positive_bacterial_infectious_disease",
        "sexually_transmitted_infectious_disease", "tick-borne_infectious_disease", "zoonotic_infectious_disease",
    )
]  # fmt: skip
OUT = DATA_DIR / "diseases.txt"
PLURAL_MAX_WORDS = 3  # names of up to 3 words also get their plural ("migraines", "tennis elbows"), filtered alike
MAX_WORDS = 6  # longer names ("1-chloro-2,4-dinitrobenzene allergic contact dermatitis") never occur in prompts
MIN_CHARS = 3  # one-word names shorter than this are initials ("ms", "ra") that mostly mean something else
# The filter (see keep): a name is dropped when it fires in at least MIN_OUTSIDE general or code training
# prompts and medical has less than MEDICAL_SHARE of its summed per-class firing rates; a short one-word
# name (up to SHORT_CHARS characters, or with a digit: mostly initials such as "mla", "pca", "als2") is
# kept only if it fires in at least SHORT_MEDICAL medical training prompts, since initials usually mean
# something else ("pca" in data science, "mla" citations).
MIN_OUTSIDE = 2
MEDICAL_SHARE = 0.5
SHORT_CHARS = 4
SHORT_MEDICAL = 2
FUNCTION_WORDS = frozenset(ENGLISH_STOP_WORDS)  # scikit-learn's 318 English stop words
_OWL = "{http://www.w3.org/2002/07/owl#}"
_RDFS = "{http://www.w3.org/2000/01/rdf-schema#}"
_OBO = "{http://www.geneontology.org/formats/oboInOwl#}"


def _tsv_labels(data: bytes) -> list[str]:
    rows = csv.DictReader(io.StringIO(data.decode("utf-8")), delimiter="\t")
    return [row["label"] for row in rows if row.get("label")]


def _obo_names(data: bytes) -> list[str]:
    """name: and EXACT synonym: lines of non-obsolete [Term] stanzas."""
    out: list[str] = []
    for stanza in data.decode("utf-8").split("\n\n"):
        if not stanza.lstrip().startswith("[Term]") or "\nis_obsolete: true" in stanza:
            continue
        for line in stanza.splitlines():
            if line.startswith("name: "):
                out.append(line[6:])
            elif line.startswith("synonym: ") and '" EXACT' in line:
                out.append(line[len('synonym: "') : line.rindex('" EXACT')])
    return out


def _symptom_names(data: bytes) -> list[str]:
    """rdfs:label and hasExactSynonym of the owl:Class elements in the "symptoms" namespace."""
    out: list[str] = []
    for cls in ET.fromstring(data).iter(f"{_OWL}Class"):
        if cls.findtext(f"{_OBO}hasOBONamespace") != "symptoms":
            continue
        out += [e.text for e in cls.findall(f"{_RDFS}label") + cls.findall(f"{_OBO}hasExactSynonym") if e.text]
    return out


def plural(word: str) -> str | None:
    """The regular English plural of a name's last word, or None where it would be a guess."""
    if not word.isalpha() or len(word) < MIN_CHARS or word.endswith("s"):
        return None  # "diabetes", "herpes": already plural-looking
    if word.endswith(("x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def ontology_names(get: Callable[[str], bytes]) -> dict[tuple[str, ...], str]:
    """Every usable name as a word tuple (and its plural, for short names), with the file it first came from."""
    found: dict[tuple[str, ...], str] = {}
    groups = [(LABELS, _tsv_labels(get(LABELS)))] + [(p, _obo_names(get(p))) for p in SUBSETS]
    groups.append((SYMPTOMS, _symptom_names(get(SYMPTOMS))))
    for path, names in groups:
        for name in names:
            w = phrase_words(name)
            if not w or len(w) > MAX_WORDS or all(t.isdigit() for t in w):
                continue
            if len(w) == 1 and len(w[0]) < MIN_CHARS:
                continue
            found.setdefault(w, path)
    for w, path in list(found.items()):
        p = plural(w[-1]) if len(w) <= PLURAL_MAX_WORDS else None
        if p:
            found.setdefault((*w[:-1], p), f"{path} (plural)")
    # English function words name no disease: the plural of the initials "THI" is "this", which fired in
    # 4 % of all training prompts (tenth round)
    return {w: path for w, path in found.items() if not all(t in FUNCTION_WORDS for t in w)}


def firing_counts(names: Iterable[tuple[str, ...]], rows: list[tuple[str, list[str]]]) -> dict[tuple, Counter]:
    """Per name, in how many single-label training prompts of each label it occurs as a whole word run."""
    by_first: dict[str, list[tuple[str, ...]]] = {}
    for name in names:
        by_first.setdefault(name[0], []).append(name)
    counts: dict[tuple, Counter] = {}
    for text, labels in rows:
        if len(labels) != 1:
            continue
        toks = phrase_words(text)
        hit = set()
        for i, t in enumerate(toks):
            for name in by_first.get(t, ()):
                if toks[i : i + len(name)] == name:
                    hit.add(name)
        for name in hit:
            counts.setdefault(name, Counter())[labels[0]] += 1
    return counts


def keep(name: tuple[str, ...], count: Counter, class_sizes: Counter, domain: str = "medical") -> bool:
    """False for a name that fires mostly outside `domain`'s prompts (rates per class, not raw counts)
    or for initials without evidence in that domain."""
    initials = len(name) == 1 and (len(name[0]) <= SHORT_CHARS or any(c.isdigit() for c in name[0]))
    if initials and count[domain] < SHORT_MEDICAL:
        return False
    outside = sum(count[label] for label in class_sizes if label != domain)
    if outside < MIN_OUTSIDE:
        return True
    rate = {label: count[label] / class_sizes[label] for label in class_sizes}
    return rate[domain] >= MEDICAL_SHARE * sum(rate.values())


def build(mirrors: Path, corpus_rows: list[tuple[str, list[str]]]) -> tuple[list[str], dict]:
    """(sorted lexicon lines, stats) from the pinned ontology files and the training prompts."""
    get = git_reader(mirrors, Source("do", REPO, COMMIT, [], lambda g, p: iter(()), "medical", LICENCE))
    license_text = get("LICENSE").decode("utf-8", "replace")
    if "CC0 1.0" not in license_text:
        raise CorpusError(f"{REPO}@{COMMIT[:10]}: LICENSE is not CC0 1.0 any more; check the terms")
    found = ontology_names(get)
    counts = firing_counts(found, corpus_rows)
    counts = {n: counts.get(n, Counter()) for n in found}
    sizes = Counter(labels[0] for _, labels in corpus_rows if len(labels) == 1)
    dropped = sorted((n for n in found if not keep(n, counts[n], sizes)), key=lambda n: (-sum(counts[n].values()), n))
    drop_set = set(dropped)
    kept = sorted(" ".join(n) for n in found if n not in drop_set)
    stats = {
        "names": len(found),
        "per_file": Counter(found.values()),
        "dropped": [(" ".join(n), dict(counts[n])) for n in dropped],
        "kept": len(kept),
        "kept_multiword": sum(" " in k for k in kept),
        "firing_kept": {
            label: sum(1 for n, c in counts.items() if n not in drop_set and c[label]) for label in sorted(sizes)
        },
    }
    return kept, stats


def _header() -> str:
    return f"""\
# Disease, condition and symptom names for the router's disease-name feature (router/model.py, HashingConfig.lexicons).
# Written by `python -m router.data.build_diseases --mirrors DIR`; do not edit by hand.
# Source: {REPO} @ {COMMIT} ({LICENCE}, its LICENSE file): disease labels of {LABELS},
# names and EXACT synonyms of src/ontology/releases/subsets/*.obo, symptom labels and exact synonyms of {SYMPTOMS}.
# Names of up to {PLURAL_MAX_WORDS} words also get the regular plural of their last word ("migraines"), filtered alike.
# Filters: lower case, words as the featuriser splits them (\\w+), at most {MAX_WORDS} words, one-word names of
# {MIN_CHARS}+ characters; a name that fires in {MIN_OUTSIDE}+ general/code training prompts (corpus/train.jsonl.gz) and
# has under {MEDICAL_SHARE:.0%} of its summed per-class firing rates in medical prompts is dropped; a one-word
# name of up to {SHORT_CHARS} characters or with a digit (initials) is kept only if it fires in {SHORT_MEDICAL}+ medical
# training prompts; a name made of English function words only (scikit-learn's stop words: "this", the plural of
# the initials "thi") is dropped before the filter.
"""


def write(kept: list[str], dropped: list[tuple[str, dict]], out: Path = OUT) -> Path:
    """The lexicon, one name a line, after a header; the dropped names are listed in the header too."""
    fired = [name for name, count in dropped if count]  # initials that never fire are only counted
    body = (
        _header()
        + f"# Dropped by the filter: {len(dropped)}, of which fired in training prompts: {', '.join(fired)}.\n"
    )
    body += "".join(k + "\n" for k in kept)
    out.write_text(body, encoding="utf-8")
    return out


def main(argv: Iterable[str] | None = None) -> int:
    from router.data import CORPUS_DIR
    from router.train import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", required=True, type=Path, help="root of the fetched mirrors (owner+name/repo)")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR / "train.jsonl.gz", help="training prompts")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(list(argv) if argv is not None else None)
    rows = [(ex.text, ex.labels) for ex in read_jsonl(args.corpus)]
    try:
        kept, stats = build(args.mirrors, rows)
    except CorpusError as err:
        raise SystemExit(f"build_diseases: error: {err}") from None
    print("wrote", write(kept, stats["dropped"], args.out))
    print(f"names {stats['names']}, kept {stats['kept']} ({stats['kept_multiword']} multi-word)")
    for path, n in sorted(stats["per_file"].items()):
        print(f"  {n:6d} first from {path}")
    print("kept names firing in training prompts, per label:", stats["firing_kept"])
    print(f"dropped {len(stats['dropped'])}:")
    for name, c in stats["dropped"]:
        print(f"  {name!r}: {c}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
