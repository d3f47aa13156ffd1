"""Faults lose nothing: SIGKILL and SIGSTOP a specialist replica of a real Serve graph under mixed load."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults_bench import FROZEN, counts, kill_drill, one_request, start, stop, stop_drill

pytestmark = pytest.mark.serve

APP = f"faults{os.getpid()}"


@pytest.fixture(scope="module")
def url(zoo: Path) -> Iterator[str]:
    base = start(zoo, APP, frozen_timeout_s=3.0, max_tokens=64)
    try:
        yield base
    finally:
        stop()


def test_sigkill_under_mixed_load_loses_nothing(url: str) -> None:
    results = kill_drill(url, APP, n=24, rate=12.0, max_tokens=64)
    c = counts(results)
    assert c["lost"] == 0, [o for o in results if o.lost]
    # Nothing that had not started was failed: it went again. A started stream ended in-band.
    assert c["failed"] == 0, [o for o in results if o.failed]
    assert c["succeeded"] + c["interrupted"] == c["sent"]
    assert c["retried"] + c["interrupted"] >= 1, c  # the kill did hit requests in flight
    assert all(o.detail for o in results if o.interrupted)  # each says why


def test_sigstop_times_out_degrades_and_recovers(url: str) -> None:
    results = stop_drill(url, APP, n=6, rate=3.0, max_tokens=4, hold_s=5.0)
    c = counts(results)
    assert c["lost"] == 0 and c["failed"] == 0, results
    assert c["degraded"] >= 1, results  # the frozen one timed out; the others answered
    assert all(o.seconds < 60 for o in results)  # nothing waited on the frozen replica
    after = one_request(url, {"model": FROZEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert after.ok, after  # SIGCONT: the replica serves again
