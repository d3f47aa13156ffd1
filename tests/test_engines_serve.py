"""Engines under load on real Ray Serve and the zoo: batching, overlap, disconnect, 503, stalled streams."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import local_serve
from tests.test_serve import tiny_args

pytestmark = pytest.mark.serve

MAX_ONGOING, MAX_QUEUED = 4, 2


def fan_out_to(second: str) -> dict:
    """Router settings that send every auto prompt to general and `second` (pinning picks one)."""
    return {
        "top_k": 2,
        "fallback": "general",
        "domain_to_specialist": {"medical": "general", "code": second, "general": "general"},
        "thresholds": {"medical": 0.0, "code": 0.0, "general": 1.0},
    }


def load_args(zoo: Path) -> dict:
    """general (HF, small queue bounds) and a 'staller' that streams two tokens, then goes silent."""
    args = tiny_args(zoo)
    general = next(s for s in args["specialists"] if s["name"] == "general")
    general.update(group=None, adapters={}, ttft_timeout_s=20, stall_timeout_s=5, timeout_s=30)
    general["deployment"] = {
        "num_cpus": 0.1,
        "max_ongoing_requests": MAX_ONGOING,
        "max_queued_requests": MAX_QUEUED,
        "retry_after_s": 2,
    }
    staller = {
        **general,
        "name": "staller",
        "ttft_timeout_s": 2,
        "stall_timeout_s": 1,
        "timeout_s": 10,
        "deployment": {"num_cpus": 0.1},
    }
    args["specialists"] = [general, staller]
    args["router"] = fan_out_to("staller")  # an auto prompt gets a merged stream
    return args


@pytest.fixture(scope="module")
def url(zoo: Path) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    with local_serve(num_cpus=4) as base:
        graph = build_graph(
            parse_graph_config(load_args(zoo)),
            engine_overrides={"staller": "deployments.engines.faults:StallingEngine"},
        )
        serve.run(graph, name="load", route_prefix="/")
        yield base


def stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("specialist-general", app_name="load").engine_stats.remote().result()


def body(max_tokens: int, stream: bool = False, model: str = "general", **kw) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "tell me about fevers"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **kw,
    }


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def test_stream_and_generate_share_the_batch(url: str) -> None:
    """A short request sent while a long stream runs finishes first: no head-of-line blocking."""
    before = stats()
    marks: dict[str, float] = {}
    first_chunk = threading.Event()

    def long_stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(300, stream=True), timeout=120) as r:
            for ev in sse_events(r.iter_lines()):
                first_chunk.set()
                if ev == "[DONE]":
                    break
        marks["stream_done"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    assert first_chunk.wait(60)
    r = httpx.post(f"{url}/v1/chat/completions", json=body(4), timeout=60)
    marks["short_done"] = time.monotonic()
    t.join(120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert marks["short_done"] < marks["stream_done"]  # it did not wait behind the 300-token stream
    after = stats()
    assert after["max_batch"] >= 2  # both rows really decoded in the same steps
    assert after["prefilled_rows"] - before["prefilled_rows"] == 2


def test_disconnect_frees_the_slot_within_a_step(url: str) -> None:
    before = stats()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(500, stream=True), timeout=60) as r:
        for n, _ in enumerate(sse_events(r.iter_lines())):
            if n == 3:
                break  # the client goes away mid-answer
    deadline = time.monotonic() + 15
    while (s := stats())["aborted"] == before["aborted"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s["aborted"] == before["aborted"] + 1
    assert s["running"] == 0 and s["max_steps_after_cancel"] <= 1
    assert s["tokens"] - before["tokens"] < 500  # it stopped long before its max_tokens


def test_past_the_queue_bound_is_503_at_once(url: str) -> None:
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{url}/v1/chat/completions", json=body(200))
                    for _ in range(3 * (MAX_ONGOING + MAX_QUEUED))
                )
            )

    out = asyncio.run(flood())
    codes = [r.status_code for r in out]
    assert codes.count(200) >= MAX_ONGOING and codes.count(503) >= MAX_ONGOING + MAX_QUEUED
    refused = next(r for r in out if r.status_code == 503)
    assert refused.headers["retry-after"] == "2"
    err = refused.json()["error"]
    assert err["type"] == "service_unavailable" and err["code"] == "overloaded"
    assert "general" in refused.json()["routing"]["failed"]


def test_stalled_single_stream_ends_cleanly(url: str) -> None:
    t0 = time.monotonic()
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body(50, stream=True, model="staller"), timeout=60
    ) as r:
        events = list(sse_events(r.iter_lines()))
    assert r.status_code == 200 and time.monotonic() - t0 < 30
    assert events[-1] == "[DONE]"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and "stalled" in errors[0]["error"]["message"]
    final = events[-2]
    assert final["choices"][0]["finish_reason"] == "length"  # a valid OpenAI finish reason, never "error"
    assert "staller" in final["routing"]["failed"]
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and "choices" in e
    )
    assert text == " tok0 tok1"


def test_stalled_specialist_is_dropped_from_a_merged_stream(url: str) -> None:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(8, stream=True, model="auto"), timeout=60) as r:
        events = list(sse_events(r.iter_lines()))
    final = events[-2]
    routing = final["routing"]
    assert sorted(routing["specialists"]) == ["general", "staller"]
    assert routing["used"] == ["general"] and "stalled" in routing["failed"]["staller"]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any(isinstance(e, dict) and "error" in e for e in events)


def test_logprobs_over_http(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=body(5, logprobs=True, top_logprobs=2), timeout=60).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert httpx.post(f"{url}/v1/chat/completions", json=body(3), timeout=60).json()["choices"][0]["logprobs"] is None


INGRESS_BOUND = 3


def adm_args(zoo: Path) -> dict:
    """general alone (every prompt goes there); the ingress admits 3 completions at once."""
    args = load_args(zoo)
    general = args["specialists"][0]
    general["deployment"] = {"num_cpus": 0.1, "max_ongoing_requests": 16, "max_queued_requests": 16}
    args["specialists"] = [general]
    args["router"] = {"top_k": 1, "fallback": "general", "domain_to_specialist": {d: "general" for d in DOMAINS}}
    args["server"]["max_inflight_requests"] = INGRESS_BOUND
    args["server"]["deployment"] = {"num_cpus": 0.1, "max_ongoing_requests": 16, "retry_after_s": 3}
    return args


@pytest.fixture(scope="module")
def adm_url(url: str, zoo: Path) -> str:
    """A second app on the same cluster, under a route prefix: adm_args."""
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    serve.run(build_graph(parse_graph_config(adm_args(zoo))), name="adm", route_prefix="/adm")
    return f"{url}/adm"


DOMAINS = ("medical", "code", "general")


async def adm_stats(deployment: str = "router") -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="adm")
    return await (handle.admission_stats if deployment == "router" else handle.engine_stats).remote()


async def hold_streams(client: httpx.AsyncClient, url: str, n: int) -> list[tuple[Any, Any]]:
    """n 400-token streams that have started answering: (open stream, its line iterator) pairs."""
    held = []
    for _ in range(n):
        cm = client.stream("POST", url, json=body(400, stream=True))
        lines = (await cm.__aenter__()).aiter_lines()
        async for line in lines:
            if line.startswith("data: {"):
                break
        held.append((cm, lines))
    return held


async def release_streams(held: list[tuple[Any, Any]]) -> None:
    """Every client but the last hangs up mid-stream; the last reads its stream to the end."""
    for cm, _ in held[:-1]:
        await cm.__aexit__(None, None, None)
    cm, lines = held[-1]
    async for _ in lines:
        pass
    await cm.__aexit__(None, None, None)


def test_ingress_admission_refuses_before_routing_and_gives_every_slot_back(adm_url: str) -> None:
    chat = f"{adm_url}/v1/chat/completions"

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # Hold the bound with three streams that have started answering.
            held = await hold_streams(client, chat, INGRESS_BOUND)
            assert (await adm_stats())["inflight"] == INGRESS_BOUND
            engine_before = await adm_stats("specialist-general")
            refused = await client.post(chat, json=body(4))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
            assert refused.headers.get("x-request-id")  # refusals are traceable like any answer
            err = refused.json()["error"]
            assert err["type"] == "service_unavailable" and err["code"] == "overloaded"
            # Refused before routing: the specialist never saw it.
            assert (await adm_stats("specialist-general"))["prefilled_rows"] == engine_before["prefilled_rows"]
            assert (await client.get(f"{adm_url}/health")).status_code == 200  # not counted, not refused
            # Two clients hang up mid-stream; the third reads its stream to the end.
            await release_streams(held)
            # Errors pass through the counter too: a bad body (400) and an unknown model (404).
            assert (await client.post(chat, content=b"{not json")).status_code == 400
            assert (await client.post(chat, json=body(4, model="nobody"))).status_code == 404
            deadline = time.monotonic() + 15
            while (s := await adm_stats())["inflight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert s["inflight"] == 0 and s["refused"] == 1
            assert (await client.post(chat, json=body(4))).status_code == 200  # capacity is back

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy (`make test` installs it as root)")
def test_haproxy_front_refuses_past_the_bound_before_serve(adm_url: str, zoo: Path, tmp_path: Path) -> None:
    """`consilium front` for the adm app: the 4th completion is refused by HAProxy, never reaching Serve, with the
    ingress's own answer; everything else passes through, streams included, and hang-ups free Serve's slots."""
    from bench.common import free_port, haproxy_running
    from deployments.config import parse_graph_config
    from deployments.front import Address, plan_front, write_front

    serve_proxy = Address("127.0.0.1", httpx.URL(adm_url).port)
    listen, metrics = Address("127.0.0.1", free_port()), Address("127.0.0.1", free_port())
    plan = plan_front(
        parse_graph_config(adm_args(zoo)), listen=listen, backends=(serve_proxy,), route_prefix="/adm", metrics=metrics
    )
    assert plan.max_inflight == INGRESS_BOUND  # derived from the config, as the CLI does
    front = f"http://{listen}/adm"

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # The reference: greedy answers straight from Serve, before the front is involved.
            direct = (await client.post(f"{adm_url}/v1/chat/completions", json=body(12))).json()
            chat = f"{front}/v1/chat/completions"
            held = await hold_streams(client, chat, INGRESS_BOUND)
            before = await adm_stats()
            assert before["inflight"] == INGRESS_BOUND
            refused = await client.post(chat, json=body(4))
            assert refused.status_code == 503 and refused.headers["x-refused-by"] == "front"
            assert refused.headers["retry-after"] == "3" and refused.headers.get("x-request-id")
            # The same request sent past the front: the ingress's refusal, word for word.
            at_ingress = await client.post(f"{adm_url}/v1/chat/completions", json=body(4))
            assert at_ingress.status_code == 503 and at_ingress.headers["x-refused-by"] == "ingress"
            assert refused.json() == at_ingress.json()
            after = await adm_stats()  # the front's refusal never reached Serve: only the direct one counted
            assert (after["admitted"], after["refused"]) == (before["admitted"], before["refused"] + 1)
            assert (await client.get(f"{front}/health")).status_code == 200  # other routes pass, never counted
            # Its Prometheus exporter: one refusal, the three held streams in flight.
            scraped = (await client.get(f"http://{metrics}/metrics")).text
            assert 'haproxy_frontend_intercepted_requests_total{proxy="consilium"} 1' in scraped
            assert 'haproxy_backend_current_sessions{proxy="completions"} 3' in scraped
            # Two clients hang up mid-stream at the front; the third reads to the end.
            await release_streams(held)
            deadline = time.monotonic() + 15
            while (s := await adm_stats())["inflight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert s["inflight"] == 0  # the hang-ups reached Serve through the front and freed the slots
            # Through the front: the same greedy answer, whole and streamed.
            whole = (await client.post(chat, json=body(12))).json()
            assert whole["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
            streamed = []
            async with client.stream("POST", chat, json=body(12, stream=True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        streamed.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
            assert "".join(streamed) == direct["choices"][0]["message"]["content"]

    with haproxy_running(write_front(plan, tmp_path / "front"), listen.host, listen.port):
        asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy (`make test` installs it as root)")
def test_consilium_serve_front_runs_haproxy_before_serve_and_stops_with_it(zoo: Path, tmp_path: Path) -> None:
    """`consilium serve CONFIG --front`, as a user runs it: HAProxy on the config's address, `serve run` (its own
    local Ray) behind it on the next port. Answers pass, completions past the bound are refused by the front,
    and when the service stops the front stops with it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import yaml

    from bench.common import free_port

    port = free_port()
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "consilium",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": adm_args(zoo),
            },
        ],
    }
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "out.log").open("wb")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a cluster of its own, as on a fresh machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "serve", str(path), "--front", "--serve-port", str(port + 1)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    front, direct = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            try:
                if httpx.get(f"{front}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.5)
        assert "front (HAProxy) on 127.0.0.1:" in (tmp_path / "out.log").read_text()

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                chat = "/v1/chat/completions"
                through = (await client.post(front + chat, json=body(12))).json()
                straight = (await client.post(direct + chat, json=body(12))).json()
                assert through["choices"][0]["message"] == straight["choices"][0]["message"]
                held = await hold_streams(client, front + chat, INGRESS_BOUND)
                refused = await client.post(front + chat, json=body(4))
                assert refused.status_code == 503 and refused.headers["x-refused-by"] == "front"
                assert refused.json()["error"]["type"] and refused.headers["retry-after"] == "3"
                await release_streams(held)

        asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as in a terminal
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # HAProxy was told to go when its parent (the process that became `serve run`) went.
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "the front still listens after the service stopped"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def spa_url(url: str, zoo: Path) -> str:
    """A third app: general (HF) and 'hanger' (a wedged engine; its share: 2 ongoing + 1 queued = 3 slots)."""
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    args = load_args(zoo)
    general = {**args["specialists"][0], "deployment": {"num_cpus": 0.1}}
    hanger = {
        **general,
        "name": "hanger",
        "timeout_s": 6,
        "ttft_timeout_s": 2,
        "deployment": {
            "num_cpus": 0.1,
            "max_ongoing_requests": 2,
            "max_queued_requests": 1,
            "retry_after_s": 2,
            # Serve's shutdown would wait its default 20 s for the wedged requests: this replica has nothing to finish.
            "graceful_shutdown_timeout_s": 1,
        },
    }
    args["specialists"] = [general, hanger]
    args["router"] = fan_out_to("hanger")
    args["server"]["max_inflight_requests"] = 12  # the ingress total never binds here
    args["server"]["deployment"] = {"num_cpus": 0.1, "max_ongoing_requests": 16}
    hang = {"hanger": "deployments.engines.faults:HangingEngine"}
    graph = build_graph(parse_graph_config(args), engine_overrides=hang)
    serve.run(graph, name="spa", route_prefix="/spa")
    return f"{url}/spa"


async def spa_stats(deployment: str = "router") -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="spa")
    return await (handle.admission_stats if deployment == "router" else handle.engine_stats).remote()


async def wait_inflight(specialist: str, n: int, within_s: float = 15) -> dict:
    deadline = time.monotonic() + within_s
    while (s := (await spa_stats())["specialists"][specialist])["inflight"] != n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return s


def test_full_specialist_is_refused_before_its_handle_and_a_fan_out_degrades(spa_url: str) -> None:
    chat = f"{spa_url}/v1/chat/completions"

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # Three pinned requests hold hanger's share: two inside the wedged engine, one in Ray's queue.
            held = [asyncio.create_task(client.post(chat, json=body(4, model="hanger"))) for _ in range(3)]
            s = await wait_inflight("hanger", 3)
            assert s["capacity"] == 3 and s["inflight"] == 3
            # (hanger's own stats cannot be read here: Ray counts a stats call against the full replica's
            # max_ongoing_requests too, so it would wait behind the wedged requests.)
            refused = await client.post(chat, json=body(4, model="hanger"))
            assert refused.status_code == 503 and refused.headers["x-refused-by"] == "specialist"
            assert refused.headers["retry-after"] == "2" and refused.headers.get("x-request-id")
            err = refused.json()["error"]
            assert err["type"] == "service_unavailable" and err["code"] == "overloaded"
            assert refused.json()["routing"]["failed"]["hanger"].startswith("overloaded: ")
            # A fan-out to both: general answers, hanger is listed as failed (overloaded) at once.
            fan = await client.post(chat, json=body(8, model="auto"))
            assert fan.status_code == 200, fan.text
            routing = fan.json()["routing"]
            assert set(routing["specialists"]) == {"hanger", "general"}
            assert routing["used"] == ["general"] and routing["failed"]["hanger"].startswith("overloaded: ")
            after = await spa_stats()
            hs = after["specialists"]["hanger"]
            # Both refusals ours, before the handle: none from Ray's queue, and the handle's admitted count
            # is still the three holders.
            assert hs["refused"] == 2 and hs["queue_refused"] == 0 and hs["admitted"] == 3
            # Every path gives the slot back. Client cancel: the holders hang up (before their 6 s timeout).
            assert not any(t.done() for t in held)
            for t in held:
                t.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            assert (await wait_inflight("hanger", 0))["inflight"] == 0
            # Finish (general's non-stream and stream), and error (hanger's timeout, 503), stream timeout too.
            assert (await client.post(chat, json=body(4))).status_code == 200
            async with client.stream("POST", chat, json=body(8, stream=True)) as r:
                assert [e async for e in r.aiter_lines() if e == "data: [DONE]"]
            timed_out = await client.post(chat, json=body(4, model="hanger"))
            assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "specialists_unavailable"
            stalled = await client.post(chat, json=body(4, model="hanger", stream=True))
            assert stalled.status_code == 503
            final = await spa_stats()
            assert final["specialists"]["hanger"]["inflight"] == 0 and final["specialists"]["general"]["inflight"] == 0
            assert final["specialists"]["general"]["admitted"] >= 3 and final["inflight"] == 0

    asyncio.run(scenario())
