"""Labelled prompts for the default domains (train / val / heldout JSONL) and their generator."""

from pathlib import Path

DATA_DIR = Path(__file__).parent  # hand-written prompts (build_data.py)
CORPUS_DIR = DATA_DIR / "corpus"  # real prompts from public datasets (build_corpus.py, SOURCES.md)


def drug_names() -> list[str]:
    """The entries of drugs.txt (generic names and common brands), comments and blank lines left out.

    One list for both uses: the labelling rules (relabel.py) and the router's drug-name feature (train.py).
    """
    lines = (DATA_DIR / "drugs.txt").read_text().splitlines()
    return [w.strip() for w in lines if w.strip() and not w.startswith("#")]
