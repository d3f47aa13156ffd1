"""The playground: one self-contained HTML page (no build step, no CDN) that the ingress serves at `/`."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def playground_html() -> str:
    return (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")
