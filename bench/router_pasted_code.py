"""Tiny ada on code pasted into prompts: documented functions of a repository training never read.

Run: python -m bench.router_pasted_code --mirrors /work/.mirror [--model DIR ...]
Every documented Python function of keon/algorithms (MIT, pinned below), as its def line(s) and
docstring: the form of a "complete this function" prompt. The corpus takes such prompts from
TheAlgorithms/Python (`algorithms-python`, eighth round); this is another project of the same kind,
so the share routed to code says whether the router learned code shapes or that one repository.
Needs the mirror (the `fetch` tool's layout); it is a check reported in docs/router-data.md, not a
held-out source of the main bench, whose seven sources stay comparable across rounds.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from bench.common import print_table, save
from router.data.build_corpus import Source, _python_function_heads, clean, git_reader
from router.evaluate import routed_top1
from router.model import TinyAda, shipped_router_path

KEON = Source(
    "keon-algorithms",
    "keon/algorithms",
    "a1bf1f39f95b59ed0bb348d6148c7e097e10481e",
    [""],
    _python_function_heads(skip=("tests/",)),
    "code",
    "MIT (LICENSE)",
    heldout=True,
)


def prompts(mirrors: Path) -> list[str]:
    """The check's prompts, cleaned as the corpus cleans them, de-duplicated, in a fixed order."""
    texts = (clean(raw) for raw in KEON.reader(git_reader(mirrors, KEON), KEON.paths))
    return sorted({t for t in texts if t})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", required=True, type=Path, help="root of the fetched mirrors (owner+name/repo)")
    parser.add_argument("--model", action="append", help="artifact(s) to measure (default: the shipped one)")
    args = parser.parse_args()
    texts = prompts(args.mirrors)
    rows = []
    for path in args.model or [str(shipped_router_path())]:
        model = TinyAda.load(path)
        routed = Counter(routed_top1(model.score(t), model.config.thresholds, "general")[0] for t in texts)
        rows.append(
            {
                "artifact": path,
                "prompts": len(texts),
                "to code": routed["code"] / len(texts),
                "to general": routed["general"] / len(texts),
                "to medical": routed["medical"] / len(texts),
            }
        )
    print_table(f"documented functions of {KEON.repo} @ {KEON.commit[:10]}: where tiny ada routes them", rows)
    save("router_pasted_code", rows, source=KEON.repo, commit=KEON.commit)


if __name__ == "__main__":
    main()
