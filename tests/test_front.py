"""The HAProxy front: its plan from a config, the files it writes, `haproxy -c` on them, the CLI, and its own errors.

The front in front of a real Serve (refusal past the bound, pass-through, streams, hang-ups) is tested in
tests/test_engines_serve.py, on that module's cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from bench.common import free_port, haproxy_running
from deployments.cli import main
from deployments.config import load_graph_config, parse_graph_config
from deployments.front import (
    Address,
    FrontError,
    parse_address,
    plan_front,
    refused_body,
    render_haproxy,
    serve_settings,
    service_capacity,
    write_front,
)
from deployments.protocol import error_body

REPO = Path(__file__).resolve().parents[1]
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="needs Debian's haproxy (`make test` installs it when run as root)"
)
LOCAL = Address("127.0.0.1", 8000)


def graph(**server) -> dict:
    args = yaml.safe_load((REPO / "configs" / "zoo.yaml").read_text())["applications"][0]["args"]
    args["server"].update(server)
    return args


def test_capacity_is_the_ingress_bound_times_its_replicas() -> None:
    assert service_capacity(parse_graph_config(graph())) == 512  # zoo.yaml: max_inflight_requests 512, 1 replica
    three = graph(deployment={"num_cpus": 0.25, "max_ongoing_requests": 1024, "num_replicas": 3})
    assert service_capacity(parse_graph_config(three)) == 3 * 512
    auto = graph(deployment={"max_ongoing_requests": 1024, "autoscaling": {"min_replicas": 1, "max_replicas": 4}})
    assert service_capacity(parse_graph_config(auto)) == 4 * 512  # the autoscaler's ceiling, not today's count
    # serve_config.yaml derives its ingress bound (no max_inflight_requests) and autoscales to 4 ingress replicas.
    cfg = load_graph_config(REPO / "serve_config.yaml")
    assert service_capacity(cfg) == cfg.ingress_bound() * 4


def test_plan_follows_the_config_and_the_refusal_is_the_ingress_s_own() -> None:
    cfg = parse_graph_config(graph(request_timeout_s=100, retry_after_spread=1.0))
    plan = plan_front(cfg, listen=Address("0.0.0.0", 8080), backends=(LOCAL,), route_prefix="/api/")
    assert plan.max_inflight == 512 and plan.route_prefix == "/api"
    assert plan.timeout_s == 130  # past the service's own deadline, so the service answers first
    r = cfg.server.deployment.retry_after_s
    assert (plan.retry_after_low, plan.retry_after_high) == (max(1, int(-(-r // 1))), int(-(-(r * 2) // 1)))
    # Word for word what deployments.middleware.AdmissionMiddleware sends at the same bound.
    assert json.loads(refused_body(plan)) == error_body(
        "the service is at capacity (512 requests in flight); retry later", "service_unavailable", "overloaded"
    )
    text = render_haproxy(plan, Path("/srv/front"))
    assert "acl completion path /api/v1/chat/completions /api/v1/completions" in text
    assert "acl full be_conn(completions) ge 512" in text
    assert f'hdr Retry-After "%[rand({plan.retry_after_high - plan.retry_after_low + 1}),add(' in text
    assert "timeout server 130s" in text and "bind 0.0.0.0:8080" in text
    assert "prometheus-exporter" not in text  # metrics only when asked for
    assert plan_front(cfg, listen=LOCAL, backends=(LOCAL,), max_inflight=7).max_inflight == 7
    with pytest.raises(FrontError, match="backend"):
        plan_front(cfg, listen=LOCAL, backends=())


def test_serve_settings_and_addresses() -> None:
    data = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert serve_settings(data) == ("/", Address("127.0.0.1", 8000))  # 0.0.0.0 is reached on loopback
    assert serve_settings({"specialists": []}) == ("/", None)  # a bare graph config has no proxy address
    with pytest.raises(FrontError, match="route_prefix 'api'"):
        serve_settings({"applications": [{"route_prefix": "api"}]})
    with pytest.raises(FrontError, match="http_options"):
        serve_settings({"applications": [{}], "http_options": {"port": "eighty"}})
    assert parse_address("[::1]:9000", "--listen") == Address("::1", 9000)
    assert str(Address("::1", 9000)) == "[::1]:9000"
    for bad in ("8080", "host:", "host:0", "host:70000", ":80", "ho st:80", "h#x:80"):
        with pytest.raises(FrontError, match=f"--backend {bad!r}"):
            parse_address(bad, "--backend")


@needs_haproxy
def test_haproxy_accepts_what_the_cli_writes_for_every_shipped_config(tmp_path: Path, capsys) -> None:
    for config in ("serve_config.yaml", "configs/zoo.yaml", "configs/embedded.yaml"):
        out = tmp_path / Path(config).stem
        argv = ["front", str(REPO / config), "--out", str(out), "--backend", "10.0.0.2:8000"]
        assert main([*argv, "--metrics-listen", "127.0.0.1:8405"]) == 0
        said = capsys.readouterr().out
        assert "metrics at http://127.0.0.1:8405/metrics" in said
        assert f"wrote {out / 'haproxy.cfg'}" in said and "not checked" not in said  # the CLI ran `haproxy -c`
        check = subprocess.run([HAPROXY, "-c", "-f", str(out / "haproxy.cfg")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "server serve0 10.0.0.2:8000" in (out / "haproxy.cfg").read_text()


def test_cli_names_the_bad_value(tmp_path: Path, capsys) -> None:
    cases = [
        (["--listen", "localhost"], "--listen 'localhost': expected HOST:PORT"),
        (["--backend", "10.0.0.2:99999"], "--backend '10.0.0.2:99999': expected HOST:PORT"),
        (["--out", str(tmp_path / "with space")], "a directory path without spaces"),
        (["--metrics-listen", "8405"], "--metrics-listen '8405': expected HOST:PORT"),
    ]
    for extra, message in cases:
        argv = ["front", str(REPO / "configs" / "zoo.yaml"), "--out", str(tmp_path / "f"), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"args": {**graph(), "server": {"max_inflight_requests": 0}}}]}))
    assert main(["front", str(bad), "--out", str(tmp_path / "g")]) == 2
    assert "server.max_inflight_requests" in capsys.readouterr().err  # the config error names the field
    with pytest.raises(SystemExit):
        main(["front", str(REPO / "configs" / "zoo.yaml"), "--out", str(tmp_path / "h"), "--max-inflight", "0"])
    assert "--max-inflight: expected a positive integer, got '0'" in capsys.readouterr().err


def test_serve_front_moves_serve_behind_it_and_names_bad_settings(tmp_path: Path, capsys) -> None:
    from deployments.front import behind_front

    data = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    moved, listen, inner = behind_front(data)
    assert (listen, inner) == (Address("0.0.0.0", 8000), Address("127.0.0.1", 8001))  # the front takes the address
    assert moved["http_options"] == {**data["http_options"], "host": "127.0.0.1", "port": 8001}
    assert moved["applications"] == data["applications"] and data["http_options"]["port"] == 8000  # a copy
    assert behind_front({**data, "http_options": {"host": "::", "port": 80}}, 9000)[1:] == (
        Address("::", 80),
        Address("127.0.0.1", 9000),
    )
    with pytest.raises(FrontError, match="--serve-port 8000: the front listens there"):
        behind_front(data, 8000)
    with pytest.raises(FrontError, match="needs a Serve config"):
        behind_front(graph())
    zoo = str(REPO / "configs" / "zoo.yaml")
    assert main(["serve", zoo, "--serve-port", "9000"]) == 2
    assert "--serve-port only applies with --front" in capsys.readouterr().err
    assert main(["serve", zoo, "--front", "--serve-port", "8000"]) == 2  # zoo.yaml's own port
    assert "--serve-port 8000: the front listens there" in capsys.readouterr().err
    bare = tmp_path / "graph.yaml"
    bare.write_text(yaml.safe_dump(graph()))
    assert main(["serve", str(bare), "--front"]) == 2
    assert "--front needs a Serve config" in capsys.readouterr().err


@needs_haproxy
def test_front_will_not_start_on_a_taken_port(tmp_path: Path) -> None:
    """Someone else listens there: a clear error, not a front that seems up because the port answers."""
    import socket

    from deployments.front import start_haproxy

    listen = Address("127.0.0.1", free_port())
    cfg = write_front(plan_front(parse_graph_config(graph()), listen=listen, backends=(listen,)), tmp_path / "f")
    with socket.socket() as other:
        other.bind((listen.host, listen.port))
        other.listen()
        with pytest.raises(FrontError, match=f"cannot listen on {listen}"):
            start_haproxy(cfg, listen)


@needs_haproxy
def test_serve_unreachable_is_an_openai_shaped_503(tmp_path: Path) -> None:
    """Nothing listens behind the front: HAProxy's own 503 page is replaced by an OpenAI-shaped body."""
    listen, dead = Address("127.0.0.1", free_port()), Address("127.0.0.1", free_port())
    plan = plan_front(parse_graph_config(graph()), listen=listen, backends=(dead,))
    cfg = write_front(plan, tmp_path / "front")
    with haproxy_running(cfg, listen.host, listen.port):
        for path in ("/v1/chat/completions", "/health"):
            r = httpx.post(f"http://{listen}{path}", json={"model": "auto", "messages": []}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == str(plan.retry_after_low)
            err = r.json()["error"]
            assert err["type"] == "service_unavailable" and err["code"] == "down" and "unreachable" in err["message"]
