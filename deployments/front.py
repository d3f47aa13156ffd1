"""An HAProxy front for the service: past the service's capacity, completions are refused in C, before Serve's proxy.

Why: every request that reaches Serve costs about 8 ms of Python CPU (Serve's HTTP proxy, then the ingress)
before the ingress can refuse it, so in a burst a refusal waits for the intake of the requests ahead of it
(docs/engines.md: a burst of 640 on 2 cores answers its 503s after 1.5-2.6 s). HAProxy counts the completions
it has in flight to Serve and answers the ones past the bound itself, in microseconds, with the same
OpenAI-shaped 503 + Retry-After the ingress sends (and `X-Refused-By: front`). Everything else passes through:
other routes are never refused, streams are forwarded chunk by chunk, a client that hangs up closes its
request to Serve (which frees its slot there), and Serve unreachable, failing or too slow becomes an
OpenAI-shaped 503/502/504 instead of HAProxy's HTML pages.

`consilium front CONFIG --out DIR` writes DIR/haproxy.cfg and the response files it names; run it with
`haproxy -f DIR/haproxy.cfg`. On one machine, `consilium serve CONFIG --front` does both: the front takes
the config's address and Serve's proxy moves behind it (`behind_front`, `start_haproxy`). Tested against the
`haproxy` binary (`haproxy -c`, and in front of a real Serve in tests/test_engines_serve.py and test_front.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deployments.config import GraphConfig
from deployments.middleware import Admission, RetryAfter, overloaded_body
from deployments.protocol import error_body

STREAM_MARGIN_S = 30  # HAProxy's client/server timeouts sit this far past server.request_timeout_s


class FrontError(ValueError):
    """A bad front setting; the message names it and its value."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def reachable(self) -> Address:
        """Where a client on this machine reaches a listener bound here: loopback for every-interface binds."""
        return Address("127.0.0.1", self.port) if self.host in ("0.0.0.0", "::", "") else self


def parse_address(value: str, what: str) -> Address:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> Address; FrontError naming `what` and the value otherwise."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FrontError(f"{what} {value!r}: expected HOST:PORT with a port in 1-65535")
    if any(c.isspace() or c in "#'\"\\" for c in host):  # it goes into the config file verbatim
        raise FrontError(f"{what} {value!r}: not a host name or address")
    return Address(host, int(port))


@dataclass(frozen=True)
class FrontPlan:
    """What the front does, in numbers; `render_haproxy` writes it as HAProxy configuration."""

    listen: Address
    backends: tuple[Address, ...]  # Serve's HTTP proxies (one per node with proxy_location: EveryNode)
    max_inflight: int  # completions in flight to Serve, over all backends
    route_prefix: str  # the application's route prefix, "/" or "/name"
    retry_after_low: int  # Retry-After drawn in whole seconds in [low, high] (the ingress's RetryAfter)
    retry_after_high: int
    timeout_s: int  # client and server inactivity timeouts: longer than any request may run
    metrics: Address | None = None  # where HAProxy's Prometheus exporter listens (None: not exported)


def serve_settings(data: dict[str, Any]) -> tuple[str, Address | None]:
    """A Serve config's first application's route prefix and its HTTP proxy address (None: a bare graph config)."""
    if "applications" not in data:
        return "/", None
    app = (data.get("applications") or [{}])[0]
    prefix = app.get("route_prefix") or "/"
    if not isinstance(prefix, str) or not prefix.startswith("/") or any(c.isspace() for c in prefix):
        raise FrontError(f"applications[0].route_prefix {prefix!r}: expected a path starting with '/'")
    return prefix, _http_address(data).reachable()


def _http_address(data: dict[str, Any]) -> Address:
    """Where a Serve config's HTTP proxy listens, as written (Serve's defaults: 127.0.0.1:8000)."""
    http = data.get("http_options") or {}
    host, port = str(http.get("host", "127.0.0.1")), http.get("port", 8000)
    return parse_address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "http_options (host:port)")


def service_capacity(config: GraphConfig) -> int:
    """Completions the whole service admits at once: the ingress bound x its replicas (max_replicas with
    autoscaling, for the reason `GraphConfig.specialist_capacity` gives)."""
    return config.ingress_bound() * config.server.deployment.replica_ceiling()


def plan_front(
    config: GraphConfig,
    *,
    listen: Address,
    backends: tuple[Address, ...],
    route_prefix: str = "/",
    max_inflight: int | None = None,
    metrics: Address | None = None,
) -> FrontPlan:
    if not backends:
        raise FrontError("backend: at least one Serve HTTP proxy address is needed")
    if max_inflight is not None and max_inflight < 1:
        raise FrontError(f"max_inflight {max_inflight!r}: expected a positive integer")
    # The range the ingress draws its own refusals' Retry-After in.
    low, high = RetryAfter(config.server.retry_after_spread).range(config.server.deployment.retry_after_s)
    return FrontPlan(
        listen=listen,
        backends=backends,
        max_inflight=max_inflight or service_capacity(config),
        route_prefix="/" + route_prefix.strip("/") if route_prefix.strip("/") else "/",
        retry_after_low=low,
        retry_after_high=high,
        timeout_s=math.ceil(config.server.request_timeout_s) + STREAM_MARGIN_S,
        metrics=metrics,
    )


def refused_body(plan: FrontPlan) -> bytes:
    """The 503 body for a completion past the bound: the ingress's own refusal, word for word."""
    return json.dumps(overloaded_body(plan.max_inflight)).encode()


# HAProxy's own errors (no Serve proxy reachable, a bad answer, a timeout) as raw HTTP responses.
ERROR_PAGES = {
    503: ("Service Unavailable", "the service is unreachable (no Serve HTTP proxy answers); retry later", "down"),
    502: ("Bad Gateway", "the service sent an invalid response", "bad_gateway"),
    504: ("Gateway Timeout", "the service did not answer in time", "timeout"),
}


def error_page(status: int, retry_after: int) -> bytes:
    reason, message, code = ERROR_PAGES[status]
    body = json.dumps(error_body(message, "service_unavailable" if status == 503 else "api_error", code)).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-cache",
        "Connection: close",
    ]
    if status == 503:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def render_haproxy(plan: FrontPlan, files: Path) -> str:
    """HAProxy 2.6+ configuration for `plan`; `files` is where `write_front` puts the response files."""
    prefix = "" if plan.route_prefix == "/" else plan.route_prefix
    routes = " ".join(prefix + path for path in sorted(Admission.PATHS))  # what the ingress's bound counts
    spread = plan.retry_after_high - plan.retry_after_low
    retry = str(plan.retry_after_low) if spread == 0 else f"%[rand({spread + 1}),add({plan.retry_after_low})]"
    servers = "\n".join(
        f"    server serve{i} {b} maxconn {plan.max_inflight} check" for i, b in enumerate(plan.backends)
    )
    plain = "\n".join(f"    server serve{i} {b} check" for i, b in enumerate(plan.backends))
    errorfiles = "\n".join(f"    errorfile {s} {files / f'{s}.http'}" for s in sorted(ERROR_PAGES))
    metrics = (
        ""
        if plan.metrics is None
        else f"""
# Prometheus: the front's refusals are haproxy_frontend_intercepted_requests_total{{proxy="consilium"}} (the
# refusal is that frontend's only intercepting rule; they never reach Serve, so Serve's metrics do not see
# them) and the completions in flight haproxy_backend_current_sessions{{proxy="completions"}}.
frontend metrics
    bind {plan.metrics}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    http-request return status 404 content-type text/plain string "/metrics only"
"""
    )
    return f"""\
# Written by `consilium front`: completions past {plan.max_inflight} in flight are refused here (503 +
# Retry-After, OpenAI-shaped, X-Refused-By: front) before they reach Serve. Run: haproxy -f THIS_FILE
global
    # One thread: the in-flight count the refusal reads is then exact (with N threads, up to N - 1 more could
    # slip through at once; the ingress's own bound still stands behind). One thread forwards far more
    # requests per second than the Python service behind it can take.
    nbthread 1
    maxconn {max(4096, 4 * plan.max_inflight)}

defaults
    mode http
    option forwardfor
    # Streams: each chunk goes out when it comes in.
    option http-no-delay
    timeout connect 5s
    # Longer than server.request_timeout_s: the service ends a request first, with its own error.
    timeout client {plan.timeout_s}s
    timeout server {plan.timeout_s}s
    # A client that takes longer than this to send its headers is cut off (slowloris).
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout queue 5s
{errorfiles}

frontend consilium
    bind {plan.listen}
    acl completion path {routes}
    acl full be_conn(completions) ge {plan.max_inflight}
    http-request return status 503 content-type application/json file {files / "refused.json"} \
hdr Retry-After "{retry}" hdr X-Refused-By front hdr X-Request-ID "%[uuid]" if completion full
    use_backend completions if completion
    default_backend other

# Completions: be_conn counts the ones in flight (queued here or sent to Serve).
backend completions
    option httpchk GET /-/healthz
{servers}

# Health, model listing, routing, the playground: never counted, never refused here.
backend other
    option httpchk GET /-/healthz
{plain}
{metrics}"""


def write_front(plan: FrontPlan, out: Path) -> Path:
    """Write out/haproxy.cfg and the response files it reads; return the config's path."""
    out = out.resolve()
    if any(c.isspace() or c in "#'\"\\" for c in str(out)):  # the paths go into the config file unquoted
        raise FrontError(f"out {str(out)!r}: a directory path without spaces, quotes or '#' is needed")
    out.mkdir(parents=True, exist_ok=True)
    (out / "refused.json").write_bytes(refused_body(plan))
    for status in ERROR_PAGES:
        (out / f"{status}.http").write_bytes(error_page(status, plan.retry_after_low))
    cfg = out / "haproxy.cfg"
    cfg.write_text(render_haproxy(plan, out))
    return cfg


def behind_front(data: dict[str, Any], serve_port: int | None = None) -> tuple[dict[str, Any], Address, Address]:
    """A Serve config moved behind a front on its own address: (the config with Serve's HTTP proxy on
    127.0.0.1:serve_port, where the front listens, where Serve now listens). serve_port defaults to the
    config's port + 1. Only loopback reaches Serve then: the front is the way in (one machine; a cluster
    runs `consilium front` on its load balancer instead)."""
    if "applications" not in data:
        raise FrontError("--front needs a Serve config (applications and http_options), not a bare graph config")
    listen = _http_address(data)
    inner_port = serve_port if serve_port is not None else listen.port + 1
    inner = parse_address(f"127.0.0.1:{inner_port}", "--serve-port")
    if inner.port == listen.port:
        raise FrontError(f"--serve-port {inner.port}: the front listens there (http_options.port)")
    moved = {**(data.get("http_options") or {}), "host": inner.host, "port": inner.port}
    return {**data, "http_options": moved}, listen, inner


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent exits (Linux prctl PR_SET_PDEATHSIG), so the front
    stops with `serve run` however that ends; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def start_haproxy(
    cfg: Path, listen: Address, output: IO[bytes] | None = None, timeout_s: float = 15, die_with_parent: bool = False
) -> subprocess.Popen:
    """`haproxy -db -f cfg` (foreground), returned once `listen` accepts connections. FrontError with what
    haproxy printed if it exits first (a port in use) or does not listen in time. With die_with_parent it
    gets SIGTERM when this process exits (`consilium serve --front` execs `serve run` after it)."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise FrontError("haproxy is not installed (Debian: apt-get install haproxy)")
    # Taken first: else the readiness check below could connect to whoever holds the port while haproxy fails.
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family) as probe:
        # As HAProxy binds: connections of a front that just stopped, still in TIME_WAIT, do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listen.host, listen.port))
        except OSError as err:
            raise FrontError(f"cannot listen on {listen}: {err.strerror}") from None
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(cfg)],
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        preexec_fn=_die_with_parent if die_with_parent else None,  # the caller runs no other threads yet
    )
    reach = listen.reachable()
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            said = ""
            if output is not None:
                output.seek(0)
                said = ": " + output.read().decode(errors="replace").strip()[-2000:]
            raise FrontError(f"haproxy exited with {proc.returncode} before listening on {listen}{said}")
        try:
            socket.create_connection((reach.host, reach.port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                proc.wait(10)
                raise FrontError(f"haproxy did not listen on {listen} within {timeout_s} s") from None
            time.sleep(0.05)
