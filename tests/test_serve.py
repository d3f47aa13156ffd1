"""The Serve graph end to end: a real Ray Serve instance, the zoo, the real `openai` client over HTTP."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.imagedata import ask, data_url, solid
from tests.serving import local_serve

pytestmark = pytest.mark.serve

REPO = Path(__file__).resolve().parents[1]
TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."
MEDICAL = "What are the early symptoms of hypertension?"
API_KEY = "test-key-123456"
IMAGE_LIMIT = 65_536


def tiny_args(zoo: Path, adapter: Path | None = None) -> dict:
    """configs/zoo.yaml's graph on the test zoo, one logical GPU per specialist deployment.

    With `adapter`, a "nurse" specialist joins the general group using that trained LoRA.
    """
    args = yaml.safe_load((REPO / "configs" / "zoo.yaml").read_text())["applications"][0]["args"]
    for spec in args["specialists"]:
        spec["model"] = spec["model"].replace(".zoo", str(zoo))
        spec["adapters"] = {k: v.replace(".zoo", str(zoo)) for k, v in spec.get("adapters", {}).items()}
        spec["deployment"].update(num_cpus=0.1, num_gpus=1)
        if adapter is not None and spec.get("group") == "general":
            spec["adapters"]["rest-fluids"] = str(adapter)
    if adapter is not None:
        nurse = copy.deepcopy(args["specialists"][-1])
        nurse.update(name="nurse", adapter="rest-fluids")
        args["specialists"].append(nurse)
    args["merger"]["model"] = str(zoo / "t5")
    args["merger"]["deployment"]["num_cpus"] = 0.1
    args["server"]["deployment"]["num_cpus"] = 0.1
    # Remote image URLs from the test's own HTTP server on loopback only (test_image_urls_...).
    args["server"]["images"] = {
        "max_image_bytes": IMAGE_LIMIT,
        "remote": {"enabled": True, "allowed_hosts": ["127.0.0.1"], "schemes": ["http"], "timeout_s": 1.0},
    }
    return args


def fault_args(zoo: Path) -> dict:
    """Every domain passes its threshold, so every prompt fans out to all three: one works, two fail."""
    args = tiny_args(zoo)
    args["specialists"] = [s for s in args["specialists"] if s["name"] in ("medical", "code", "general")]
    for spec in args["specialists"]:
        spec["deployment"]["num_gpus"] = 0
        if spec["name"] != "medical":  # the injected faulty ones; the real one keeps its generous timeout
            spec["timeout_s"] = 2
    args["router"].update(top_k=3, thresholds={"medical": 0.0, "code": 0.0, "general": 0.0})
    key_file = zoo / "api-key.txt"  # a secret file, as a mounted secret would be; never a plain arg
    key_file.write_text(API_KEY + "\n")
    args["server"]["api_key_file"] = str(key_file)
    return args


@pytest.fixture(scope="module")
def served(zoo: Path, trained_adapter: tuple[Path, dict]) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    with local_serve(num_cpus=4, num_gpus=4) as url:
        serve.run(build_graph(parse_graph_config(tiny_args(zoo, trained_adapter[0]))), name="main", route_prefix="/")
        faults = {
            "code": "deployments.engines.faults:HangingEngine",
            "general": "deployments.engines.faults:ExplodingEngine",
        }
        graph = build_graph(parse_graph_config(fault_args(zoo)), engine_overrides=faults)
        serve.run(graph, name="faults", route_prefix="/faults")
        yield url


@pytest.fixture(scope="module")
def client(served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)


def routing_of(obj) -> dict:
    return obj.model_extra["routing"] if hasattr(obj, "model_extra") else obj["routing"]


# ---- the OpenAI surface ---------------------------------------------------------------------------


def test_models_lists_auto_and_specialists(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["auto", "medical", "code", "vision", "general", "general-lora", "nurse"]


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": MEDICAL}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0
    assert routing_of(r)["used"] == ["medical"]
    assert routing_of(r)["merged"] is False


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kw = {
        "model": "general",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    # OpenAI's include_usage: usage is null on every chunk but an extra last one with no choices.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(model="code", prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.total_tokens > 0
    chunks = list(
        client.completions.create(model="code", prompt="def add(a, b):", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_route_endpoint(served: str) -> None:
    r = httpx.post(f"{served}/v1/route", json={"prompt": TWO_DOMAIN})
    assert r.status_code == 200
    routing = r.json()["routing"]
    assert set(routing["specialists"]) == {"code", "medical"}
    assert set(routing["scores"]) == {"code", "general", "medical"}
    assert httpx.post(f"{served}/v1/route", json={"model": "code", "prompt": "x"}).json()["routing"]["pinned"]


def test_health(served: str) -> None:
    assert httpx.get(f"{served}/health").json()["status"] == "ok"


# ---- dispatch -------------------------------------------------------------------------------------


def test_two_domain_prompt_reaches_both_and_the_merger(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": TWO_DOMAIN}], max_tokens=8, temperature=0
    )
    routing = routing_of(r)
    assert set(routing["used"]) == {"code", "medical"}
    assert routing["merged"] is True and routing["failed"] == {} and routing["synthesis"] == "fusion"


def test_merged_answer_streams(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": TWO_DOMAIN}], max_tokens=8, temperature=0, stream=True
        )
    )
    final = chunks[-1]
    assert routing_of(final)["merged"] is True and routing_of(final)["synthesis"] == "fusion"
    assert len(chunks) >= 2


def test_pinned_model_reaches_only_that_one(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="code", messages=[{"role": "user", "content": TWO_DOMAIN}], max_tokens=4)
    routing = routing_of(r)
    assert routing["used"] == ["code"] and routing["pinned"] is True and routing["merged"] is False


def test_each_specialist_replica_holds_a_different_gpu() -> None:
    from ray import serve

    ids = []
    for name in ("medical", "code", "vision", "general"):  # general, general-lora and nurse share one deployment
        handle = serve.get_deployment_handle(f"specialist-{name}", app_name="main")
        ids.append(tuple(handle.gpu_ids.remote().result()))
    assert all(len(i) == 1 for i in ids)
    assert len(set(ids)) == 4


def test_trained_adapter_serves_on_the_shared_base(client: openai.OpenAI) -> None:
    from ray import serve

    kw = {"messages": [{"role": "user", "content": "how do I treat symptom 3?"}], "max_tokens": 6, "temperature": 0}
    nurse = client.chat.completions.create(model="nurse", **kw)
    general = client.chat.completions.create(model="general", **kw)
    assert nurse.choices[0].message.content.startswith("rest")  # what the adapter was trained to say
    assert general.choices[0].message.content != nurse.choices[0].message.content
    assert "specialist-nurse" not in serve.status().applications["main"].deployments  # no extra replica


# ---- faults ---------------------------------------------------------------------------------------


def test_failing_and_hanging_specialists_degrade(served: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "user", "content": MEDICAL}], "max_tokens": 6}
    r = httpx.post(f"{served}/faults/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["used"] == ["medical"]
    assert set(routing["failed"]) == {"code", "general"}
    assert routing["failed"]["code"].startswith("timeout")
    assert "exploded" in routing["failed"]["general"]


def test_all_failed_is_503(served: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "general", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{served}/faults/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    assert "general" in r.json()["routing"]["failed"]


def test_auth_required_when_configured(served: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong-key-000"}):
        r = httpx.post(f"{served}/faults/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{served}/faults/v1/models").status_code == 401
    assert httpx.get(f"{served}/faults/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


# ---- bad input ------------------------------------------------------------------------------------

GOOD = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _bad(change: dict | None = None, drop: str | None = None) -> dict:
    body = copy.deepcopy(GOOD)
    body.update(change or {})
    if drop:
        del body[drop]
    return body


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps(_bad(drop="messages")).encode(), 400, "messages"),
        (json.dumps(_bad({"messages": "hello"})).encode(), 400, "messages"),
        (json.dumps(_bad({"messages": []})).encode(), 400, "messages"),
        (json.dumps(_bad({"messages": [{"role": "wizard", "content": "x"}]})).encode(), 400, "role"),
        (json.dumps(_bad({"messages": [{"role": "user", "content": "   "}]})).encode(), 400, "non-empty"),
        (json.dumps(_bad({"temperature": 2.5})).encode(), 400, "temperature"),
        (json.dumps(_bad({"temperature": "hot"})).encode(), 400, "temperature"),
        (json.dumps(_bad({"top_p": 0})).encode(), 400, "top_p"),
        (json.dumps(_bad({"top_p": 1.5})).encode(), 400, "top_p"),
        (json.dumps(_bad({"max_tokens": 100_000})).encode(), 400, "max_tokens"),
        (json.dumps(_bad({"max_tokens": 0})).encode(), 400, "max_tokens"),
        (json.dumps(_bad({"model": "dentist"})).encode(), 404, "dentist"),
        (json.dumps(_bad({"stop": ["a", "b", "c", "d", "e"]})).encode(), 400, "stop"),
        (json.dumps(_bad({"messages": [{"role": "user", "content": "fever " * 30_000}]})).encode(), 400, "limit"),
        (json.dumps(_bad({"messages": [{"role": "user", "content": "x" * 1_100_000}]})).encode(), 413, "limit"),
    ],
)
def test_bad_requests_get_openai_errors(served: str, content: bytes, status: int, needle: str) -> None:
    r = httpx.post(
        f"{served}/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    assert needle in err["message"]
    ok = httpx.post(f"{served}/v1/chat/completions", json=GOOD, timeout=60)
    assert ok.status_code == 200  # the service keeps serving


def test_too_long_for_the_model_is_400(served: str) -> None:
    # Under the HTTP character limit, but over the model's max_prompt_tokens (768).
    body = _bad({"model": "medical", "messages": [{"role": "user", "content": "fever " * 2000}]})
    r = httpx.post(f"{served}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{served}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert r.status_code == 400


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], temperature=9)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


# ---- the in-process pipeline ----------------------------------------------------------------------


def test_pipeline_routes_like_the_served_graph(served: str, zoo: Path) -> None:
    from deployments.pipeline import MultiSpecializedLanguageModelPipeline

    prompts = [
        TWO_DOMAIN,
        MEDICAL,
        "How do I reverse a linked list in Rust?",
        "Plan a trip to Lisbon",
        "¿Cuáles son los síntomas de la gripe?",
        "hmm",
        "SELECT * FROM users;",
    ]
    pipe = MultiSpecializedLanguageModelPipeline(tiny_args(zoo))
    try:
        for p in prompts:
            served_route = httpx.post(f"{served}/v1/route", json={"prompt": p}).json()["routing"]["specialists"]
            assert pipe.route(p) == served_route, p
        text = pipe.generate_response(TWO_DOMAIN, max_length=8, temperature=0.0)
        assert isinstance(text, str)
        assert pipe.last_answer is not None and pipe.last_answer.routing.merged
    finally:
        pipe.clear_resources()
        pipe.clear_resources()  # idempotent
    with pytest.raises(RuntimeError, match="cleared"):
        pipe.generate_response("hi")


def test_unknown_path_and_method_are_openai_errors(served: str) -> None:
    r = httpx.get(f"{served}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{served}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_streaming_from_a_dead_specialist_is_503(served: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "general", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = httpx.post(f"{served}/faults/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 503
    assert "exploded" in r.json()["error"]["message"]


# ---- images -----------------------------------------------------------------------------------------


XRAY = "What does this chest X-ray show? Could it be pneumonia?"


def test_image_request_is_routed_to_vision_answered_and_streamed(client: openai.OpenAI) -> None:
    red, blue = data_url(solid((220, 20, 20))), data_url(solid((20, 20, 220), (64, 48), "JPEG"), "image/jpeg")
    kw = {"model": "auto", "max_tokens": 10, "temperature": 0}
    r = client.chat.completions.create(messages=ask("What is in this picture?", red), **kw)
    routing = routing_of(r)
    assert routing["modality"] == "image" and routing["used"] == ["vision"] and not routing["merged"], routing
    assert "image-capable" in routing["reason"] and r.usage.completion_tokens >= 1
    text = r.choices[0].message.content
    # The pixels crossed Ray to the model: another image, another greedy answer.
    other = client.chat.completions.create(messages=ask("What is in this picture?", blue), **kw)
    assert other.choices[0].message.content != text
    chunks = list(client.chat.completions.create(messages=ask("What is in this picture?", red), stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert routing_of(chunks[-1])["modality"] == "image" and routing_of(chunks[-1])["used"] == ["vision"]


def test_image_with_a_confident_medical_question_merges_vision_and_medical(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="auto", messages=ask(XRAY, data_url(solid((90, 90, 90)))), max_tokens=8, temperature=0
    )
    routing = routing_of(r)
    assert routing["used"] == ["vision", "medical"] and routing["merged"] and routing["synthesis"] == "fusion"
    assert set(routing["answers"]) == {"vision", "medical"} and "'medical' (text score" in routing["reason"]


def test_image_to_a_text_only_specialist_is_400_and_the_service_keeps_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="'medical' does not accept images") as err:
        client.chat.completions.create(model="medical", messages=ask(XRAY, data_url(solid((1, 2, 3)))), max_tokens=4)
    assert err.value.code == "images_not_supported"
    r = client.chat.completions.create(model="vision", messages=ask("hi", data_url(solid((1, 2, 3)))), max_tokens=4)
    assert routing_of(r)["pinned"] and routing_of(r)["used"] == ["vision"]


class _Images(BaseHTTPRequestHandler):
    """A loopback image host: /ok.png, /big.png (declared size), /drip.png (no length, too many bytes),
    /slow.png (answers after the fetch timeout), /moved (a redirect), anything else 404."""

    def do_GET(self) -> None:
        png = solid((30, 160, 30))
        if self.path == "/ok.png":
            self._send(200, png)
        elif self.path == "/big.png":
            self._send(200, png + b"\0" * IMAGE_LIMIT)
        elif self.path == "/drip.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the body ends when the connection closes
            for _ in range(IMAGE_LIMIT // 8192 + 2):
                self.wfile.write(b"\0" * 8192)
        elif self.path == "/slow.png":
            time.sleep(10)
            self._send(200, png)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_image_urls_allowlist_size_and_timeout(client: openai.OpenAI, image_host: int) -> None:
    def send(url: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model="auto", messages=ask("what is this?", url), max_tokens=4)

    r = send(f"http://127.0.0.1:{image_host}/ok.png")
    assert routing_of(r)["used"] == ["vision"]
    for path_or_url, code, words in [
        (f"http://localhost:{image_host}/ok.png", "image_url_not_allowed", "'localhost' is not in"),
        ("/big.png", "image_too_large", f"the limit is {IMAGE_LIMIT}"),
        ("/drip.png", "image_too_large", f"over {IMAGE_LIMIT} bytes"),
        ("/slow.png", "image_fetch_failed", "took over 1s"),
        ("/moved", "invalid_image", "redirects are not followed"),
        ("/missing.png", "image_fetch_failed", "HTTP 404"),
        (f"https://127.0.0.1:{image_host}/ok.png", "image_url_not_allowed", "scheme 'https' is not allowed"),
    ]:
        url = path_or_url if "://" in path_or_url else f"http://127.0.0.1:{image_host}{path_or_url}"
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError, match=words) as err:
            send(url)
        assert err.value.code == code and err.value.param == "messages", err.value.body
        assert time.monotonic() - t0 < 8  # cut at the 1 s fetch timeout, not after the host's 10 s
    assert routing_of(send(f"http://127.0.0.1:{image_host}/ok.png"))["used"] == ["vision"]


# ---- memory ---------------------------------------------------------------------------------------


def test_ingress_keeps_nothing_per_request(served: str) -> None:
    """After a warm-up, the ingress at idle holds as many Python objects and asyncio tasks however many
    requests went through (pinned, merged, streamed, failed), and its heap trimmer runs (deployments.memory)."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    bodies = [
        {"model": "medical", "messages": [{"role": "user", "content": MEDICAL}], "max_tokens": 4},
        {"model": "auto", "messages": [{"role": "user", "content": TWO_DOMAIN}], "max_tokens": 4},
        {"model": "code", "messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 4, "stream": True},
        {"model": "auto", "messages": [{"role": "user", "content": TWO_DOMAIN}], "max_tokens": 4, "stream": True},
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    ]

    def one(i: int) -> int:
        with httpx.Client(timeout=60) as http:
            r = http.post(f"{served}/v1/chat/completions", json=bodies[i % len(bodies)])
            return r.status_code

    def burst(n: int) -> list[int]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(n)))

    handle = serve.get_deployment_handle("router", app_name="main")
    burst(50)  # warm-up: lazy imports, pydantic and Serve caches, the handles' replica state
    base = handle.memory_report.remote().result(timeout_s=60)
    statuses = burst(250)
    after = handle.memory_report.remote().result(timeout_s=60)
    assert statuses.count(200) == 200 and statuses.count(404) == 50
    n = len(statuses)
    grown = dict(after["types_grown"])
    # An object kept per request grows its type by n (250) at least. Measured here: +99 in all, at most
    # +46 of one type (weakrefs), which is not per request: 15k and 17k soak requests both ended at ~5,000.
    assert after["gc_objects"] - base["gc_objects"] < n, grown
    assert max(grown.values(), default=0) < n // 2, grown
    assert after["asyncio_tasks"] <= base["asyncio_tasks"] + 5
    assert after["gc_garbage"] == 0
    assert after["trimmer"]["running"] and after["trimmer"]["interval_s"] == 60.0
