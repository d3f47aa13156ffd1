"""The ingress's admission bound as plain ASGI: refusal shape, and the slot given back on every path."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from deployments.config import parse_graph_config
from deployments.middleware import Admission, AdmissionMiddleware, RetryAfter, SpecialistAdmission
from tests.test_serve import tiny_args


class Gate:
    """An inner app whose requests wait until released (or fail, when told to)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, scope: dict, receive, send) -> None:
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the handler failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def scope(path: str = "/v1/chat/completions", root: str = "") -> dict:
    return {"type": "http", "method": "POST", "path": root + path, "root_path": root, "headers": []}


async def call(app, s: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(s, receive, send)
    return sent


def test_past_the_bound_is_503_with_retry_after_and_openai_body() -> None:
    async def run() -> None:
        gate, adm = Gate(), Admission()
        adm.configure(2, retry_after_s=1.5)
        app = AdmissionMiddleware(gate, adm)
        held = [asyncio.create_task(call(app, scope())) for _ in range(2)]
        await asyncio.sleep(0)
        assert adm.inflight == 2
        refused = await call(app, scope("/v1/completions"))
        start, body = refused
        assert start["status"] == 503
        headers = dict(start["headers"])
        assert headers[b"retry-after"] == b"2"  # 1.5 s rounded up to whole seconds
        assert headers[b"x-refused-by"] == b"ingress"  # which bound refused, for clients and the bench
        err = json.loads(body["body"])["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "overloaded" and "2 requests" in err["message"]
        # Other routes are never refused: health and model listing stay answerable under load.
        other = asyncio.create_task(call(app, scope("/health")))
        await asyncio.sleep(0)
        gate.release.set()
        assert [m["status"] for m, _ in await asyncio.gather(*held, other)] == [200, 200, 200]
        assert adm.stats() == {"inflight": 0, "bound": 2, "admitted": 2, "refused": 1}

    asyncio.run(run())


def test_the_slot_comes_back_after_errors_and_cancellation() -> None:
    async def run() -> None:
        gate, adm = Gate(), Admission()
        adm.configure(4, retry_after_s=1)
        app = AdmissionMiddleware(gate, adm)
        cancelled = asyncio.create_task(call(app, scope(root="/adm")))  # under a route prefix: still counted
        failing = asyncio.create_task(call(app, scope()))
        await asyncio.sleep(0)
        assert adm.inflight == 2
        cancelled.cancel()  # what Serve does when the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert adm.inflight == 1
        gate.fail = True
        gate.release.set()
        with pytest.raises(RuntimeError):
            await failing
        assert adm.inflight == 0 and adm.admitted == 2

    asyncio.run(run())


def test_derived_bound(tmp_path) -> None:
    args = tiny_args(tmp_path)  # paths are not opened here
    args["server"].pop("max_inflight_requests", None)  # configs/zoo.yaml sets one; derive it here
    for s in args["specialists"]:
        s["deployment"] = {"max_ongoing_requests": 10, "max_queued_requests": 5}
    args["server"]["deployment"] = {"max_ongoing_requests": 1024}
    config = parse_graph_config(args)
    groups = len(config.groups())
    assert config.ingress_bound() == groups * 15  # what the specialists can hold
    args["server"]["deployment"] = {"max_ongoing_requests": 16}
    assert parse_graph_config(args).ingress_bound() == 14  # below the proxy's own bound, room for /health
    args["server"]["max_inflight_requests"] = 16
    with pytest.raises(ValueError, match=r"max_inflight_requests=16 must be below deployment\.max_ongoing_requests=16"):
        parse_graph_config(args)


def test_retry_after_spread_stays_in_its_bounds_and_covers_them() -> None:
    assert {RetryAfter(0.0, seed=1).seconds(1.0) for _ in range(50)} == {1}  # no spread: exactly r
    assert RetryAfter(0.0).seconds(1.5) == 2 and RetryAfter(0.0).seconds(0) == 1  # rounded up, never 0
    ra = RetryAfter(1.0, seed=7)
    draws = [ra.seconds(2.0) for _ in range(400)]
    assert set(draws) == {2, 3, 4}  # whole seconds in [r, 2r], every value drawn
    assert max(Counter(draws).values()) < 200  # spread, not stuck on one value
    again = RetryAfter(1.0, seed=7)
    assert [again.seconds(2.0) for _ in range(400)] == draws  # seeded: reproducible


def test_specialist_capacity_from_config_and_errors_name_the_field() -> None:
    args = tiny_args(Path(".zoo"))
    for s in args["specialists"]:
        s["deployment"] = {"num_cpus": 0.1, "max_ongoing_requests": 4, "max_queued_requests": 2}
    args["specialists"][0]["deployment"] = {
        "num_cpus": 0.1,
        "max_ongoing_requests": 4,
        "max_queued_requests": 2,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
    }
    args["server"].pop("max_inflight_requests", None)
    args["server"]["deployment"] = {"num_cpus": 0.1, "max_ongoing_requests": 1024, "num_replicas": 2}
    config = parse_graph_config(args)
    cap = config.specialist_capacity()
    first = args["specialists"][0].get("group") or args["specialists"][0]["name"]
    assert cap[first] == 9  # (4 + 2) x max_replicas 3, over 2 ingress replicas
    assert all(v == 3 for g, v in cap.items() if g != first)  # (4 + 2) x 1 over 2
    assert config.ingress_bound() == sum(cap.values())
    args["server"]["retry_after_spread"] = -1
    with pytest.raises(ValueError, match=r"server\.retry_after_spread"):
        parse_graph_config(args)


def test_specialist_admission_counts_and_refuses() -> None:
    adm = SpecialistAdmission({"a": 2}, {"a": 1.0})
    assert adm.acquire("a") and adm.acquire("a") and not adm.acquire("a")
    assert adm.acquire("unbounded")  # a deployment not named is never refused
    adm.release("a")
    assert adm.acquire("a")
    adm.queue_refusal("a", 7)
    assert adm.stats()["a"] == {"inflight": 2, "capacity": 2, "admitted": 3, "refused": 1, "queue_refused": 1}
    assert adm.queue_refusals == [(2, 7)]
