"""Labelled prompts for the default domains (train / val / heldout JSONL) and their generator."""

from pathlib import Path

DATA_DIR = Path(__file__).parent  # hand-written prompts (build_data.py)
CORPUS_DIR = DATA_DIR / "corpus"  # real prompts from public datasets (build_corpus.py, SOURCES.md)


def drug_names() -> list[str]:
    """The entries of drugs.txt (generic names and common brands), comments and blank lines left out.

    One list for both uses: the labelling rules (relabel.py) and the router's drug-name feature (train.py).
    """
    return read_entries(DATA_DIR / "drugs.txt")


def disease_names() -> list[str]:
    """The entries of diseases.txt (disease, condition and symptom names; build_diseases.py writes it)."""
    return read_entries(DATA_DIR / "diseases.txt")


def read_entries(path: Path) -> list[str]:
    """Non-blank, non-comment lines of a lexicon file, stripped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [w.strip() for w in lines if w.strip() and not w.startswith("#")]
