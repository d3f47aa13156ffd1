"""Fault drills against a real Serve graph: SIGKILL and SIGSTOP a specialist replica under mixed load; count losses.

    python -m bench.faults_bench --requests 200 --rate 20

Prints a table (sent, succeeded, degraded, retried, interrupted, failed, lost) per drill and writes
bench/results/faults.json. "lost" is a request that got no answer, an answer without an end (no
finish_reason, no in-band error), or a 5xx: the goal is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import free_port

TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."
MEDICAL = "What are the early symptoms of hypertension?"


# The SIGKILL drill pins "code" (a long timeout leaves room for Serve to restart it); the SIGSTOP drill
# freezes "medical", whose short timeout is what lets the council degrade instead of waiting.
KILLED, FROZEN = "code", "medical"


def graph_args(zoo: Path, frozen_timeout_s: float = 4.0, max_tokens: int = 16) -> dict[str, Any]:
    """The zoo graph, one replica per specialist, token limits that keep streams open a while."""

    def spec(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": str(zoo / name),
            "backend": "hf",
            "generation": {"temperature": 0.0, "max_new_tokens": max_tokens, "max_new_tokens_limit": 64},
            "max_prompt_tokens": 768,
            "timeout_s": frozen_timeout_s if name == FROZEN else 60.0,
            "deployment": {"num_cpus": 0.1, "max_batch_size": 8, "batch_wait_timeout_s": 0.005},
        }

    return {
        "specialists": [spec("medical"), spec("code"), spec("general")],
        "router": {"top_k": 2, "fallback": "general"},
        "merger": {"model": str(zoo / "t5"), "max_new_tokens": 4, "deployment": {"num_cpus": 0.1}},
        "server": {"deployment": {"num_cpus": 0.1, "max_ongoing_requests": 512}},
    }


def start(zoo: Path, app: str, graph: dict[str, Any] | None = None, **kw: Any) -> str:
    """ray.init (a local cluster of our own) + Serve on a free port; returns the base URL.

    graph: the graph config to serve; default graph_args(zoo, **kw).
    """
    import ray
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_graph(parse_graph_config(graph or graph_args(zoo, **kw))), name=app, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def replica_pids(app: str, deployment: str) -> list[int]:
    """PIDs of a deployment's replica processes (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    import psutil

    tag = f"ServeReplica:{app}:{deployment}"
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and tag in cmd.split()[0]:
            pids.append(p.pid)
    return pids


def wait_for_replica(app: str, deployment: str, not_pids: set[int], timeout_s: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [p for p in replica_pids(app, deployment) if p not in not_pids]
        if pids:
            return pids
        time.sleep(0.2)
    raise TimeoutError(f"no {deployment} replica came up within {timeout_s}s")


@dataclass
class Outcome:
    stream: bool
    status: int = 0
    ok: bool = False  # a complete answer with a valid finish_reason
    degraded: bool = False  # answered, but some specialist failed or the merger was skipped
    retried: bool = False  # a replica died under it and the request went again
    interrupted: bool = False  # a started stream that ended with an in-band error event
    failed: bool = False  # a clean 4xx/503 error body (the client was told)
    lost: bool = False  # no answer, an answer without an end, or a 5xx other than 503
    seconds: float = 0.0
    detail: str = ""


def _judge_routing(out: Outcome, routing: dict[str, Any] | None) -> None:
    if routing:
        out.retried = bool(routing.get("retried"))
        out.degraded = bool(routing.get("failed"))


def one_request(
    url: str, body: dict[str, Any], timeout_s: float = 120.0, on_text: threading.Event | None = None
) -> Outcome:
    """One request; on_text is set when a stream's first text arrives (the drills kill only then)."""
    out = Outcome(stream=bool(body.get("stream")))
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=timeout_s) as http:
            if not out.stream:
                r = http.post(f"{url}/v1/chat/completions", json=body)
                out.status = r.status_code
                data = r.json()
                if r.status_code == 200:
                    out.ok = data["choices"][0]["finish_reason"] in ("stop", "length")
                    out.lost = not out.ok
                    _judge_routing(out, data.get("routing"))
                else:
                    out.failed = "error" in data and r.status_code in (400, 404, 429, 503)
                    out.lost = not out.failed
                    out.detail = data.get("error", {}).get("message", "")[:200]
            else:
                with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    out.status = r.status_code
                    if r.status_code != 200:
                        data = json.loads(r.read())
                        out.failed = "error" in data and r.status_code in (400, 404, 429, 503)
                        out.lost = not out.failed
                        out.detail = data.get("error", {}).get("message", "")[:200]
                    else:
                        done = finished = False
                        for line in r.iter_lines():
                            if not line.startswith("data: "):
                                continue
                            payload = line.removeprefix("data: ")
                            if payload == "[DONE]":
                                done = True
                                break
                            obj = json.loads(payload)
                            if "error" in obj:
                                out.interrupted = True
                                out.detail = obj["error"]["message"][:200]
                                _judge_routing(out, obj.get("routing"))
                                continue
                            for choice in obj.get("choices", []):
                                if on_text is not None and (choice.get("delta") or {}).get("content"):
                                    on_text.set()
                                if choice.get("finish_reason") in ("stop", "length"):
                                    finished = True
                                    _judge_routing(out, obj.get("routing"))
                        # After an error event the final chunk closes an incomplete answer: not a success.
                        out.ok = done and finished and not out.interrupted
                        out.lost = not (done and (finished or out.interrupted))
    except Exception as err:  # a hang past the timeout, a reset connection: the request is lost
        out.lost = True
        out.detail = f"{type(err).__name__}: {err}"[:200]
    out.seconds = round(time.monotonic() - t0, 3)
    return out


def mixed_load(
    url: str,
    n: int,
    rate: float,
    bodies: list[dict[str, Any]],
    workers: int = 64,
    on_text: threading.Event | None = None,
) -> list[Outcome]:
    """n requests at `rate` per second, cycling through bodies (streamed and not)."""
    results: list[Outcome] = []
    lock = threading.Lock()

    def run(body: dict[str, Any]) -> None:
        o = one_request(url, body, on_text=on_text)
        with lock:
            results.append(o)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(n):
            pool.submit(run, bodies[i % len(bodies)])
            time.sleep(1.0 / rate)
    return results


def counts(results: list[Outcome]) -> dict[str, Any]:
    return {
        "sent": len(results),
        "succeeded": sum(o.ok for o in results),
        "degraded": sum(o.ok and o.degraded for o in results),
        "retried": sum(o.retried for o in results),
        "interrupted": sum(o.interrupted for o in results),
        "failed": sum(o.failed for o in results),
        "lost": sum(o.lost for o in results),
        "why_failed": sorted({o.detail for o in results if o.failed or o.lost})[:5],
    }


def kill_drill(url: str, app: str, n: int, rate: float, max_tokens: int) -> list[Outcome]:
    """SIGKILL the pinned specialist's replica a third of the way into mixed streamed/non-streamed load."""
    msg = [{"role": "user", "content": "def parse(records):"}]
    bodies = [
        {"model": KILLED, "messages": msg, "max_tokens": max_tokens},
        {"model": KILLED, "messages": msg, "max_tokens": max_tokens, "stream": True},
    ]
    pids = replica_pids(app, f"specialist-{KILLED}")
    streaming = threading.Event()

    def kill() -> None:
        # A third of the way in, and only once a stream is mid-answer: then some requests have text
        # out (they must end in-band) and others are queued or batched on the replica (retried).
        time.sleep(n / rate / 3)
        streaming.wait(timeout=60)
        for p in pids:
            os.kill(p, signal.SIGKILL)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    results = mixed_load(url, n, rate, bodies, on_text=streaming)
    killer.join()
    wait_for_replica(app, f"specialist-{KILLED}", set(pids))
    return results


def stop_drill(url: str, app: str, n: int, rate: float, max_tokens: int, hold_s: float) -> list[Outcome]:
    """SIGSTOP the frozen specialist's replica for hold_s under merged (medical+code) load; then SIGCONT."""
    bodies = [
        {"model": "auto", "messages": [{"role": "user", "content": TWO_DOMAIN}], "max_tokens": max_tokens},
        {
            "model": "auto",
            "messages": [{"role": "user", "content": TWO_DOMAIN}],
            "max_tokens": max_tokens,
            "stream": True,
        },
    ]
    pids = replica_pids(app, f"specialist-{FROZEN}")
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    resumer = threading.Timer(hold_s, lambda: [os.kill(p, signal.SIGCONT) for p in pids])
    resumer.start()
    try:
        results = mixed_load(url, n, rate, bodies)
    finally:
        resumer.cancel()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):  # Serve replaced the frozen replica meanwhile
                os.kill(p, signal.SIGCONT)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".zoo"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hold-s", type=float, default=10.0, help="how long the SIGSTOP drill keeps the replica frozen")
    ap.add_argument("--drills", default="sigkill,sigstop", help="comma-separated subset of sigkill,sigstop")
    ap.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = ap.parse_args(argv)
    if not (args.zoo / "zoo.json").is_file():
        from deployments.models.zoo import build_zoo

        build_zoo(args.zoo)
    app = f"faults{os.getpid()}"
    url = start(args.zoo, app, max_tokens=args.max_tokens)
    rows: dict[str, dict[str, Any]] = {}
    try:
        if "sigkill" in args.drills:
            rows["sigkill"] = counts(kill_drill(url, app, args.requests, args.rate, args.max_tokens))
        if "sigstop" in args.drills:
            rows["sigstop"] = counts(stop_drill(url, app, args.requests, args.rate, args.max_tokens, args.hold_s))
            after = one_request(
                url, {"model": FROZEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            )
            rows["sigstop"]["recovered"] = int(after.ok)
    finally:
        stop()
    cols = ["sent", "succeeded", "degraded", "retried", "interrupted", "failed", "lost"]
    print(f"| drill | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | {' | '.join(str(row[c]) for c in cols)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "drills": rows}, indent=2))
    lost = sum(r["lost"] for r in rows.values())
    for name, row in rows.items():
        for why in row["why_failed"]:
            print(f"{name}: failed or lost: {why}")
    print(f"lost: {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
