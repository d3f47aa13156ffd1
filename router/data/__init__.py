"""Labelled prompts for the default domains (train / val / heldout JSONL) and their generator."""

from pathlib import Path

DATA_DIR = Path(__file__).parent  # hand-written prompts (build_data.py)
CORPUS_DIR = DATA_DIR / "corpus"  # real prompts from public datasets (build_corpus.py, SOURCES.md)
