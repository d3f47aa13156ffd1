"""deployments.memory: the glibc heap trimmer gives retained free heap back; the diagnostics find a real leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from deployments import memory

REPO = Path(__file__).resolve().parents[1]

# The ingress's pattern in small: several threads (each gets its own glibc arena) allocate and free many
# malloc'd blocks while a few stay alive; those pin the arenas, so free() alone gives almost nothing back.
FRAGMENT = textwrap.dedent(
    """
    import json, sys, threading, time
    from deployments import memory

    def churn(keep, together):
        blocks = [bytes(4000) + bytes([i % 256]) for i in range(6000)]  # ~24 MB per thread, via malloc
        together.wait()  # all four hold theirs at once, however the threads get scheduled
        keep.extend(blocks[::64])  # one block in 64 stays alive

    keep = []
    together = threading.Barrier(4)
    base = memory.rss_mb()
    threads = [threading.Thread(target=churn, args=(keep, together)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"base": base, "freed": memory.rss_mb(), "malloc": memory.malloc_stats()}
    if sys.argv[1] == "trimmer":
        assert memory.start_trimmer(0.05)
        deadline = time.monotonic() + 30
        while memory.report()["trimmer"]["trims"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        time.sleep(0.5)
    out["end"] = memory.rss_mb()
    out["trimmer"] = memory.report()["trimmer"]
    print(json.dumps(out))
    """
)


def _fragment(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), memory.TRIM_ENV: "0"}
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENT, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not memory._has_malloc_trim(), reason="needs glibc's malloc_trim")
def test_trimmer_gives_retained_free_heap_back() -> None:
    without = _fragment("none")
    # The premise: ~96 MB were freed but the arenas keep nearly all of it resident (only ~1.5 MB is live).
    assert without["malloc"]["in_use_mb"] < 20
    assert without["freed"] - without["base"] > 60
    assert without["end"] - without["base"] > 60  # and nothing gives it back by itself
    assert without["trimmer"] is None

    with_trimmer = _fragment("trimmer")
    assert with_trimmer["freed"] - with_trimmer["base"] > 60
    assert with_trimmer["trimmer"]["trims"] >= 1 and with_trimmer["trimmer"]["running"]
    # After one trim the RSS is back near the start: what stays is the live blocks and partly used pages.
    assert with_trimmer["end"] - with_trimmer["base"] < 0.25 * (with_trimmer["freed"] - with_trimmer["base"])
    assert with_trimmer["trimmer"]["released_mb"] > 45


def test_trim_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory.TRIM_ENV, raising=False)
    assert memory.trim_interval_s() == memory.DEFAULT_TRIM_S
    monkeypatch.setenv(memory.TRIM_ENV, "2.5")
    assert memory.trim_interval_s() == 2.5
    monkeypatch.setenv(memory.TRIM_ENV, "0")
    assert memory.trim_interval_s() == 0
    assert memory.start_trimmer() is False  # off: no thread
    for bad in ("soon", "-1", "nan", "1e9"):
        monkeypatch.setenv(memory.TRIM_ENV, bad)
        with pytest.raises(ValueError, match=rf"{memory.TRIM_ENV}='{bad}'"):
            memory.trim_interval_s()


class _Held:
    """A per-request object something forgot to drop."""

    def __init__(self, i: int) -> None:
        self.i = i


def test_report_names_the_line_that_leaks() -> None:
    """Two reports bracket some allocations: the growth is attributed to the line that made them."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(4)
    try:
        memory.report()  # baseline
        leaked = [_Held(i) for i in range(5000)]  # the "leak": 5000 objects held past the next report
        rep = memory.report(top=5)
    finally:
        if started:
            tracemalloc.stop()
    top = rep["top_growth"][0]
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if "leaked = [" in text)
    assert top["traceback"][0] == f"{__file__}:{line}"
    assert top["blocks"] >= 5000 and top["kb"] > 5000 * 48 / 1024
    assert dict(rep["types_grown"])["_Held"] == 5000
    assert rep["gc_garbage"] == 0 and rep["tracemalloc"]
    del leaked
