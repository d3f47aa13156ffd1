"""Domain instruction data for the embedded adapters, rebuilt from public Git repositories at pinned commits."""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Example = dict[str, str]  # {"prompt", "response"}: what `consilium adapter train` reads


@dataclass(frozen=True)
class Source:
    """One repository at one commit; the data card (DATA.md) records the same facts."""

    repo: str  # owner/name on GitHub
    commit: str
    licence: str
    paths: tuple[str, ...]


SOURCES: dict[str, Source] = {
    # Consumer health questions answered by doctors (iCliniq, eHealth Forum, Question Doctors), MIT.
    "medical": Source(
        "LasseRegin/medical-question-answer-data",
        "685c9168058f0d68335fdbf728d221afcc71d1a6",
        "MIT",
        ("icliniqQAs.json", "ehealthforumQAs.json", "questionDoctorQAs.json"),
    ),
    # Documented algorithm implementations: the docstring becomes the request, the function the answer. MIT.
    "code": Source("TheAlgorithms/Python", "f5988cc09713315817df6a7e327e258013a94440", "MIT", ()),
    # Grade-school maths word problems with worked answers (GSM8K), MIT: the general domain's held-out text.
    "general": Source(
        "openai/grade-school-math",
        "3101c7d5072418e28b9008a6636bde82a006892c",
        "MIT",
        ("grade_school_math/data/train.jsonl",),
    ),
}


class DataSourceError(RuntimeError):
    """A source repository is missing or does not hold the pinned commit."""


def _git(repo_dir: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo_dir), *args], check=True, capture_output=True, text=True, encoding="utf-8"
        ).stdout
    except subprocess.CalledProcessError as err:
        raise DataSourceError(f"git {' '.join(args)} failed in {repo_dir}: {err.stderr.strip()}") from None


def _show(repo_dir: Path, commit: str, path: str) -> str:
    return _git(repo_dir, "show", f"{commit}:{path}")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def medical_examples(repo_dir: Path, src: Source) -> Iterator[Example]:
    for path in src.paths:
        for row in json.loads(_show(repo_dir, src.commit, path)):
            q = _clean(row.get("question_text") or row.get("question") or "")
            a = _clean(row.get("answer") or "")
            # Very short answers ("you are fine") teach nothing; very long ones cost steps.
            if 20 <= len(q) <= 400 and 150 <= len(a) <= 900:
                yield {"prompt": q, "response": a}


def _summary(doc: str) -> str:
    first = doc.strip().split("\n\n")[0]
    return _clean(first)


def code_examples(repo_dir: Path, src: Source) -> Iterator[Example]:
    files = [p for p in _git(repo_dir, "ls-tree", "-r", "--name-only", src.commit).splitlines() if p.endswith(".py")]
    for path in sorted(files):
        if "/test" in path or path.startswith(("scripts/", ".")):
            continue
        try:
            tree = ast.parse(_show(repo_dir, src.commit, path))
        except (SyntaxError, ValueError, DataSourceError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary = _summary(doc)
            if not 20 <= len(summary) <= 300 or ">>>" in summary:
                continue
            # The answer keeps a one-line docstring: the doctests are long and not what a user asked for.
            node.body[0] = ast.Expr(ast.Constant(summary))
            code = ast.unparse(node)
            if not 80 <= len(code) <= 900:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            prompt = f"Write a Python function {node.name}({args}). {summary}"
            yield {"prompt": prompt, "response": f"```python\n{code}\n```"}


def general_examples(repo_dir: Path, src: Source) -> Iterator[Example]:
    for line in _show(repo_dir, src.commit, src.paths[0]).splitlines():
        row = json.loads(line)
        work, _, final = row["answer"].partition("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip()  # calculator annotations are not prose
        yield {"prompt": _clean(row["question"]), "response": f"{work}\nThe answer is {final.strip()}."}


BUILDERS: dict[str, Callable[[Path, Source], Iterator[Example]]] = {
    "medical": medical_examples,
    "code": code_examples,
    "general": general_examples,
}


def ensure_clone(src: Source, root: Path) -> Path:
    """A clone of the source under root (cloned from GitHub when missing); the pinned commit is read from it."""
    repo_dir = root / src.repo.replace("/", "+")
    if not repo_dir.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", f"https://github.com/{src.repo}", str(repo_dir)], check=True)
    return repo_dir


def build(repos: dict[str, Path], out: Path, n_train: int, n_heldout: int, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write <domain>.train.jsonl and <domain>.heldout.jsonl per domain (disjoint, deterministic)."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain, repo_dir in repos.items():
        src = SOURCES[domain]
        _git(repo_dir, "cat-file", "-e", f"{src.commit}^{{commit}}")  # the pinned commit must be there
        rows = list(BUILDERS[domain](repo_dir, src))
        # Deduplicate on the prompt so a held-out question never reappears in training.
        rows = list({r["prompt"].lower(): r for r in rows}.values())
        random.Random(seed).shuffle(rows)
        heldout, train = rows[:n_heldout], rows[n_heldout : n_heldout + n_train]
        for split, part in (("train", train), ("heldout", heldout)):
            with (out / f"{domain}.{split}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        counts[domain] = {"available": len(rows), "train": len(train), "heldout": len(heldout)}
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path, help="output directory for the JSONL files")
    for domain in SOURCES:
        p.add_argument(f"--{domain}-repo", type=Path, help=f"git clone (or bare mirror) of {SOURCES[domain].repo}")
    p.add_argument("--sources", type=Path, help="clone every source not given above into this directory")
    p.add_argument("--train", type=int, default=64, help="training examples per domain")
    p.add_argument("--heldout", type=int, default=20, help="held-out examples per domain")
    args = p.parse_args(argv)
    repos = {d: getattr(args, f"{d}_repo") for d in SOURCES if getattr(args, f"{d}_repo") is not None}
    if args.sources is not None:
        repos.update({d: ensure_clone(src, args.sources) for d, src in SOURCES.items() if d not in repos})
    if not repos:
        p.error("give --sources DIR or at least one --<domain>-repo")
    print(json.dumps(build(repos, args.out, args.train, args.heldout), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
