"""Metrics, request ids, logs and the playground on one real Ray Serve instance (auth on, JSON logs).

One cluster serves every test here: starting Serve costs far more than the tests themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from bench.common import free_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"  # gitignored; screenshots land here
API_KEY = "observability-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MEDICAL = "What are the early symptoms of hypertension?"  # routes to medical alone
TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."


def small_graph_args(zoo: Path, hanging_general: bool = False) -> dict:
    """configs/zoo.yaml on the test zoo, cut to what these tests need: medical and code (real zoo models),
    the merger, and `general` either folded into medical or served by a hanging engine (timeouts)."""
    args = yaml.safe_load((REPO / "configs" / "zoo.yaml").read_text())["applications"][0]["args"]
    keep = ("medical", "code", "general") if hanging_general else ("medical", "code")
    args["specialists"] = [s for s in args["specialists"] if s["name"] in keep]
    for spec in args["specialists"]:
        spec["model"] = spec["model"].replace(".zoo", str(zoo))
        spec["adapters"] = {k: v.replace(".zoo", str(zoo)) for k, v in spec.get("adapters", {}).items()}
        spec["deployment"].update(num_cpus=0.1)
        if spec["name"] == "general":
            spec["timeout_s"] = 1
    if not hanging_general:
        args["router"].update(fallback="medical", domain_to_specialist={"general": "medical"})
    args["merger"]["model"] = str(zoo / "t5")
    args["merger"]["deployment"]["num_cpus"] = 0.1
    args["server"]["deployment"]["num_cpus"] = 0.1
    return args


@contextlib.contextmanager
def serve_graph(args: dict, engine_overrides: dict | None = None) -> Iterator[tuple[str, int, Path]]:
    """A local Ray with a fast metrics report interval; yields the HTTP URL, the Prometheus port and the
    directory of the replicas' log files."""
    import ray
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    http_port, metrics_port = free_port(), free_port()
    ray.init(
        address="local",  # a new cluster even if another `ray start` runs on this machine
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        # Workers push metrics to the node's agent every interval (default 10 s); 500 ms keeps tests short.
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        app = build_graph(parse_graph_config(args), engine_overrides=engine_overrides)
        serve.run(app, name="obs", route_prefix="/")
        # Serve writes replica logs under the session dir: <session>/logs/serve/replica_<app>_<deployment>_*.log
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
        yield f"http://127.0.0.1:{http_port}", metrics_port, logs
    finally:
        serve.shutdown()
        ray.shutdown()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text from Ray's endpoint -> sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum over every series (replicas, applications) whose labels include `labels`."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def wait_for(port: int, expected: dict[tuple, float], timeout_s: float = 30) -> dict:
    """Scrape until every expected (name, labels) total is reached; return the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        got = {key: total(samples, key[0], **dict(key[1:])) for key in expected}
        if all(got[k] >= v for k, v in expected.items()) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(zoo: Path, monkeypatch_module) -> Iterator[dict]:
    monkeypatch_module.setenv("CONSILIUM_LOG_FORMAT", "json")  # read when the graph is built
    args = small_graph_args(zoo, hanging_general=True)
    key_file = zoo / "observability-api-key.txt"  # a secret file, never a plain config value
    key_file.write_text(API_KEY + "\n")
    args["server"]["api_key_file"] = str(key_file)  # the playground must work with auth on
    faults = {"general": "deployments.engines.faults:HangingEngine"}
    with serve_graph(args, faults) as (url, metrics_port, logs):
        yield {"url": url, "metrics_port": metrics_port, "logs": logs}


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def chat(url: str, model: str, prompt: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json={**body, **kw}, headers=AUTH, timeout=60)


@pytest.mark.serve
def test_metrics_count_known_traffic(served: dict) -> None:
    url, port = served["url"], served["metrics_port"]
    for _ in range(3):
        assert chat(url, "auto", MEDICAL).status_code == 200
    for _ in range(2):
        assert chat(url, "code", MEDICAL).status_code == 200
    merged = chat(url, "auto", TWO_DOMAIN)
    assert merged.status_code == 200 and merged.json()["routing"]["merged"] is True
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": "medical", "messages": [{"role": "user", "content": MEDICAL}], "max_tokens": 6, "stream": True},
        headers=AUTH,
        timeout=60,
    ) as r:
        assert r.status_code == 200
        streamed = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text_chunks = sum(1 for c in streamed if c["choices"][0]["delta"].get("content"))
    assert chat(url, "auto", MEDICAL, temperature=9).status_code == 400
    hung = chat(url, "general", MEDICAL)  # the hanging engine: timeout, then 503 (every chosen one failed)
    assert hung.status_code == 503

    chat_ep = ("endpoint", "/v1/chat/completions")
    # the two-domain prompt counts under whichever domain the router scores highest (both near 1.0)
    from router.model import TinyAda, shipped_router_path

    scores = TinyAda.load(shipped_router_path()).score(TWO_DOMAIN)
    two_domain_top = max(scores, key=scores.__getitem__)
    assert two_domain_top in ("code", "medical"), scores
    expected = {
        ("ray_consilium_requests_total", chat_ep, ("model", "auto"), ("status", "200")): 4,
        ("ray_consilium_requests_total", chat_ep, ("model", "code"), ("status", "200")): 2,
        ("ray_consilium_requests_total", chat_ep, ("model", "medical"), ("status", "200")): 1,
        ("ray_consilium_requests_total", chat_ep, ("model", "none"), ("status", "400")): 1,
        ("ray_consilium_requests_total", chat_ep, ("model", "general"), ("status", "503")): 1,
        ("ray_consilium_routing_domain_total", ("domain", "medical")): 3 + (two_domain_top == "medical"),
        ("ray_consilium_routing_domain_total", ("domain", "code")): int(two_domain_top == "code"),
        ("ray_consilium_routing_pins_total", ("specialist", "code")): 2,
        ("ray_consilium_routing_pins_total", ("specialist", "medical")): 1,
        ("ray_consilium_routing_pins_total", ("specialist", "general")): 1,
        ("ray_consilium_routing_specialist_total", ("specialist", "code")): 3,  # 2 pinned + the two-domain one
        ("ray_consilium_routing_specialist_total", ("specialist", "medical")): 5,  # 3 routed + two-domain + stream
        ("ray_consilium_merges_total", ("status", "ok")): 1,
        ("ray_consilium_specialist_failures_total", ("specialist", "general"), ("reason", "timeout")): 1,
        ("ray_consilium_router_latency_ms_count",): 4,  # routed requests only: pins bypass the router
        ("ray_consilium_specialist_latency_ms_count", ("specialist", "code")): 3,
        ("ray_consilium_time_to_first_token_ms_count", ("model", "medical")): 1,
    }
    samples = wait_for(port, expected)
    got = {key: total(samples, key[0], **dict(key[1:])) for key in expected}
    assert got == expected
    # Tokens: what the responses reported generating, counted per specialist.
    code_tokens = 2 * chat(url, "code", MEDICAL).json()["usage"]["completion_tokens"]  # same greedy answer
    assert code_tokens > 0
    assert total(samples, "ray_consilium_inter_token_latency_ms_count", model="medical") == text_chunks - 1
    assert total(samples, "ray_consilium_generated_tokens_total", specialist="code") >= code_tokens
    assert total(samples, "ray_consilium_generated_tokens_total", specialist="merger") >= 1
    # The HF engine's gauges exist per replica and are back to idle.
    running = [
        v for lab, v in samples["ray_consilium_engine_running_requests"] if lab["deployment"].startswith("specialist-")
    ]
    assert running and all(v == 0 for v in running)
    # No label carries a request id or a prompt.
    names = [n for n in samples if n.startswith("ray_consilium_")]
    for n in names:
        for lab, _ in samples[n]:
            assert not any(MEDICAL in v or len(v) > 64 for k, v in lab.items() if k not in ("SessionName", "WorkerId"))


@pytest.mark.serve
def test_request_id_round_trip_and_logs(served: dict) -> None:
    url, logs = served["url"], served["logs"]
    rid = "obs-test-7f3a9c"
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": TWO_DOMAIN}], "max_tokens": 6},
        headers={"X-Request-Id": rid, **AUTH},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == rid
    assert r.json()["id"] == rid
    routing = r.json()["routing"]
    assert routing["merged"] and set(routing["answers"]) == {"code", "medical"}
    # A streamed response uses it as the chunk id too.
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": "code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
        headers={"X-Request-Id": rid + "-s", **AUTH},
        timeout=60,
    ) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["id"] == rid + "-s" for c in chunks)
    # Without one, the service makes one, returns it and uses it as the id.
    made = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=AUTH,
        timeout=60,
    )
    assert made.json()["id"] == made.headers["x-request-id"] and made.headers["x-request-id"]
    bad = httpx.post(f"{url}/v1/models", headers={"X-Request-Id": "bad id with spaces"})
    assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]

    # Our modules' INFO lines, as JSON (CONSILIUM_LOG_FORMAT=json), in the ingress, specialist and merger logs.
    def lines_with_id() -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for path in logs.glob("replica_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if rid in line and line.startswith("{"):
                    rec = json.loads(line)
                    if rec.get("request_id") == rid:
                        found.setdefault(path.name, []).append(rec)
        return found

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = lines_with_id()
        if {"router", "specialist-code", "specialist-medical", "merger"} <= {_deployment(n) for n in found}:
            break
        time.sleep(0.3)
    by_deployment = {_deployment(n): recs for n, recs in found.items()}
    messages = {d: [rec["message"] for rec in recs] for d, recs in by_deployment.items()}
    assert any(m.startswith("route model=auto -> ") for m in messages["router"]), messages
    assert any(m == "generate for medical" for m in messages["specialist-medical"]), messages
    assert any(m == "generate for code" for m in messages["specialist-code"]), messages
    assert any(m.startswith("merging 2 answers") for m in messages["merger"]), messages


def _deployment(log_name: str) -> str:
    # replica_<app>_<deployment>_<replica id>.log
    return log_name.removeprefix("replica_obs_").rsplit("_", 1)[0]


# ---- the playground in a real headless browser (Debian chromium + chromium-driver, selenium) ----------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them when run as root)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.serve
def test_page_is_served_at_root(served: dict) -> None:
    r = httpx.get(f"{served['url']}/")  # the page itself needs no key; the API it calls does
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and "http://" not in r.text.split("<script>")[1]  # no CDN, nothing external


@pytest.mark.serve
def test_playground_streams_and_shows_routing(served: dict, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(f"{served['url']}/")
    # Without the key the model list is refused; with it the picker fills with auto + every specialist.
    wait.until(lambda d: "API key" in d.find_element(By.ID, "status").text)
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 1)
    assert [o.text for o in Select(browser.find_element(By.ID, "model")).options] == [
        "auto",
        "medical",
        "code",
        "general",
    ]
    assert browser.execute_script("return sessionStorage.getItem('consilium.apiKey')") == API_KEY
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("24")
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")  # greedy: the zoo's answers are reproducible

    browser.find_element(By.ID, "prompt").send_keys(TWO_DOMAIN)
    browser.find_element(By.ID, "send").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant .routing")))
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    text = answer.find_element(By.CSS_SELECTOR, ".text").text
    # The page parsed several server-sent events and rendered each as it came (they concatenate to the text).
    assert int(answer.get_attribute("data-chunks")) >= 2
    assert text and "error" not in answer.get_attribute("class")
    # Scores as bars, one per domain, and the two chosen specialists merged, each answer beside the synthesis.
    domains = {e.get_attribute("data-domain") for e in answer.find_elements(By.CSS_SELECTOR, ".score")}
    assert domains == {"medical", "code", "general"}
    chips = [e.text for e in answer.find_elements(By.CSS_SELECTOR, ".chips span")]
    assert {"used: medical", "used: code", "merged"} <= set(chips)
    columns = [e.text.split("\n")[0] for e in answer.find_elements(By.CSS_SELECTOR, ".answers > div")]
    assert columns == ["medical", "code", "synthesis"] or columns == ["code", "medical", "synthesis"]
    assert "fan_out" in answer.find_element(By.CSS_SELECTOR, "table.timings").text

    # Pin a specialist: only it answers, and the panel says so.
    Select(browser.find_element(By.ID, "model")).select_by_value("code")
    browser.find_element(By.ID, "prompt").send_keys(MEDICAL)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .routing")) == 2)
    pinned = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    chips = [e.text for e in pinned.find_elements(By.CSS_SELECTOR, ".chips span")]
    assert "pinned" in chips and "used: code" in chips and "used: medical" not in chips
    assert "code" in pinned.find_element(By.CSS_SELECTOR, "table.timings").text
    assert "assistant · code" in pinned.find_element(By.CSS_SELECTOR, ".who").text

    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    for path in (tmp_path / "playground.png", ARTIFACTS / "playground.png"):
        assert browser.save_screenshot(str(path))
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


# ---- pieces that need no cluster -----------------------------------------------------------------------


def test_failure_reasons_are_bounded() -> None:
    import ray.exceptions

    from deployments import metrics

    assert metrics.failure_reason(asyncio.TimeoutError()) == "timeout"
    assert metrics.failure_reason(ray.exceptions.ActorDiedError()) == "dead_replica"
    assert metrics.failure_reason(RuntimeError("boom")) == "error"
    assert metrics.endpoint_label("/faults/v1/chat/completions") == "/v1/chat/completions"
    assert metrics.endpoint_label("/wp-admin.php") == "other"
    assert metrics.model_label("dentist", ["medical"]) == "unknown"
    assert metrics.model_label("medical", ["medical"]) == "medical"


def test_log_lines_carry_the_request_id_outside_serve(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from deployments.logging_setup import PACKAGES, configure_logging, request_id_var, set_request_id

    monkeypatch.setenv("CONSILIUM_LOG_FORMAT", "json")
    monkeypatch.setattr(logging.getLogger("ray.serve"), "handlers", [])  # as in a process Serve never configured
    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in PACKAGES for lg in [logging.getLogger(n)]}
    configure_logging()
    token = set_request_id("abc-123")
    try:
        logging.getLogger("deployments.council").info("hello %s", "there")
    finally:
        request_id_var.reset(token)
        for n, (handlers, level, propagate) in saved.items():  # other tests rely on propagation (caplog)
            lg = logging.getLogger(n)
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate
    rec = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert rec["request_id"] == "abc-123" and rec["message"] == "hello there" and rec["level"] == "INFO"


def test_dashboard_queries_only_metrics_we_define() -> None:
    import re

    defined = set(re.findall(r'"(consilium_[a-z_]+)"', (REPO / "deployments" / "metrics.py").read_text()))
    text = (REPO / "deploy" / "grafana" / "consilium.json").read_text()
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"ray_(consilium_[a-z_]+)", text)}
    assert used <= defined, used - defined
    assert defined <= used, f"metrics without a dashboard panel: {defined - used}"
    json.loads(text)


def test_plot_turns_results_into_pngs(tmp_path: Path) -> None:
    from bench.plot import plot_all

    rows = [
        {"prompt": p, "concurrency": c, "req_per_s": c / (1 + c / 8), "p50_ms": 50.0 * c, "p99_ms": 80.0 * c}
        for p in ("single-route", "two-route")
        for c in (1, 8, 32)
    ]
    (tmp_path / "serve.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    (tmp_path / "router.json").write_text(json.dumps({"meta": {"latency_ms": [0.05, 0.06, 0.07, 0.2]}, "rows": []}))
    (tmp_path / "broken.json").write_text("{not json")  # skipped, not fatal
    made = plot_all(tmp_path, tmp_path / "plots")
    names = ["router_latency_hist.png", "serve_latency.png", "serve_throughput.png"]
    assert sorted(p.name for p in made) == names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made)
