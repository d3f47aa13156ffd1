"""Labelled prompts for the default domains (train / val / heldout JSONL) and their generator."""

from pathlib import Path

DATA_DIR = Path(__file__).parent
