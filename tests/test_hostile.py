"""Hostile-input corpus: >200 malformed or unusual requests against one real Serve instance; never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.imagedata import bad_crc, bilevel, data_url, huge_header_png, image_part, solid, truncated
from tests.serving import local_serve

pytestmark = pytest.mark.serve

KEY = "hostile-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}
BODY_LIMIT = 65_536
PROMPT_CHARS = 4_000
MAX_MESSAGES = 16
TOKEN_LIMIT = 8
MAX_IMAGES = 2
IMAGE_BYTES = 24_576
IMAGE_PIXELS = 1_000_000


def corpus_args(zoo: Path, key_file: Path) -> dict[str, Any]:
    """The zoo graph with small limits, so that "at and past every limit" stays cheap."""

    def spec(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": str(zoo / name),
            "backend": "hf",
            "generation": {"temperature": 0.0, "max_new_tokens": 2, "max_new_tokens_limit": TOKEN_LIMIT},
            "max_prompt_tokens": 768,
            "timeout_s": 60,
            "deployment": {"num_cpus": 0.1, "max_batch_size": 8, "batch_wait_timeout_s": 0.005},
        }

    vision = {**spec("vision"), "modalities": ["text", "image"]}
    return {
        "specialists": [spec("medical"), spec("code"), spec("general"), vision],
        "router": {"top_k": 2, "fallback": "general"},
        "merger": {"model": str(zoo / "t5"), "max_new_tokens": 2, "deployment": {"num_cpus": 0.1}},
        "server": {
            "api_key_file": str(key_file),
            "max_body_bytes": BODY_LIMIT,
            "max_prompt_chars": PROMPT_CHARS,
            "max_messages": MAX_MESSAGES,
            "images": {"max_images": MAX_IMAGES, "max_image_bytes": IMAGE_BYTES, "max_pixels": IMAGE_PIXELS},
            "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 256},
        },
    }


@pytest.fixture(scope="module")
def url(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY)
    with local_serve(num_cpus=4) as base:
        serve.run(build_graph(parse_graph_config(corpus_args(zoo, key_file))), name="hostile", route_prefix="/")
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


# ---- the corpus ---------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    method: str = "POST"
    path: str = "/v1/chat/completions"
    body: Any = None  # dict/list -> JSON; bytes as is; a list of bytes -> sent chunked; None -> no body
    headers: dict[str, str] = field(default_factory=lambda: {**AUTH, **JSON})
    expect: int | str = "4xx"  # a status, "4xx", or "any" (a valid 200 or a well-formed 4xx)
    param: str | None = None  # the error must name this parameter
    words: str | None = None  # the error message must contain this


TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."
CHAT = {"model": "medical", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
COMP = {"model": "code", "prompt": "def f():", "max_tokens": 2, "temperature": 0}


def chat(**change: Any) -> dict[str, Any]:
    body = {**CHAT, **change}
    return {k: v for k, v in body.items() if v is not DROP}


def comp(**change: Any) -> dict[str, Any]:
    body = {**COMP, **change}
    return {k: v for k, v in body.items() if v is not DROP}


def user(content: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": content}])


DROP = object()


def nested(depth: int) -> Any:
    x: Any = 1
    for _ in range(depth):
        x = [x]
    return x


def padded_to(size: int) -> bytes:
    """A chat body of exactly `size` bytes (the padding is message text)."""
    base = json.dumps(user(""), separators=(",", ":")).encode()
    pad = size - len(base)
    return json.dumps(user("a" * pad), separators=(",", ":")).encode()


def chunks(raw: bytes, n: int = 4096) -> list[bytes]:
    return [raw[i : i + n] for i in range(0, len(raw), n)]


def build_corpus() -> list[Case]:
    c: list[Case] = []
    add = c.append

    # JSON syntax edge cases
    for i, raw in enumerate(
        [
            b"",
            b"null",
            b"[]",
            b"1",
            b'"str"',
            b"true",
            b"{",
            b"{}}",
            b"{'model': 'auto'}",
            b'{"a":1,}',
            b'{/*c*/"a":1}',
            b'{"a" 1}',
            b"\xff\xfe{}",
            b'{"model":"auto"\x00}',
            b"[" * 100,
            b"{" * 100,
            b'{"messages": [' + b"{" * 10,
            b'{"a": "unterminated',
            b'{"a": 01}',
            b'{"a": .5}',
            b'{"a": +1}',
            b'{"a": 0x10}',
            b"\xef\xbb\xbf" + json.dumps(CHAT).encode(),
        ]
    ):
        add(Case(f"json-syntax-{i}", body=raw, expect="any" if raw.startswith(b"\xef\xbb\xbf") else 400))
    add(
        Case("duplicate-keys", body=b'{"stream": true, "stream": false, ' + json.dumps(CHAT).encode()[1:], expect="any")
    )
    add(Case("utf16-body", body=json.dumps(CHAT).encode("utf-16"), expect="any"))
    add(Case("invalid-utf8-in-string", body=json.dumps(user("X")).encode().replace(b"X", b"\xc3\x28"), expect=400))
    add(Case("raw-newline-in-string", body=json.dumps(user("X")).encode().replace(b"X", b"a\nb"), expect=400))
    add(Case("raw-tab-in-string", body=json.dumps(user("X")).encode().replace(b"X", b"a\tb"), expect=400))
    for lit in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" + b"0" * 5000):
        add(Case(f"number-{lit[:12].decode()}", body=b'{"temperature": ' + lit + b", " + json.dumps(CHAT).encode()[1:]))

    # wrong types and out-of-range numbers, field by field
    bad_values = {
        "temperature": [-0.1, 2.0001, "0.5", [], {}, True, 1e308],
        "top_p": [0, -1, 1.01, "1", False],
        "max_tokens": [0, -1, 1.5, "2", True, 10**30, 2**63, TOKEN_LIMIT + 1],
        "max_completion_tokens": [0, "2", TOKEN_LIMIT + 1, 2.0],
        "seed": [2**70, -(2**70), 2**63, 1.0, "1", True, [1]],
        "stream": ["yes", 1, "true", 0, None, []],
        "n": [0, -1, 9, "2", 1.0, 10**9],
        "stop": ["", ["a"] * 5, [1], "x" * 257, [""], {"a": 1}, [["a"]]],
        "model": ["", "x" * 129, 123, None, [], "MEDICAL", "медик", "auto\u0000"],
        "user": [1, "u" * 513, ["u"]],
        "metadata": [{"a": 1}, "x", [1]],
        "stream_options": [{"include_usage": True}, {"include_usage": "yes"}, {"other": 1}, "yes"],
        "store": [True, "no"],
    }
    for name, values in bad_values.items():
        for i, v in enumerate(values):
            expect: int | str = 404 if name == "model" and isinstance(v, str) and 0 < len(v) <= 128 else 400
            add(Case(f"{name}-bad-{i}", body=chat(**{name: v}), expect=expect, param=None if expect == 404 else name))

    # OpenAI fields we do not do: refused by name, never silently ignored
    refused = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "functions": [{"name": "f"}],
        "function_call": "auto",
        "logit_bias": {"1": 5},
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "top_logprobs": 2,  # without logprobs: true it would be silently meaningless
        "audio": {"voice": "x"},
        "modalities": ["text", "audio"],
        "prediction": {"type": "content", "content": "x"},
        "web_search_options": {},
        "reasoning_effort": "high",
    }
    for name, v in refused.items():
        add(Case(f"refused-{name}", body=chat(**{name: v}), expect=400, param=name))
    # Supported by both engines: answered for real (the served tests check the content).
    add(Case("logprobs-top-2", body=chat(logprobs=True, top_logprobs=2), expect=200))
    add(Case("response_format-json_object", body=chat(response_format={"type": "json_object"}), expect=200))
    add(
        Case(
            "response_format-json_schema",
            body=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            expect=200,
        )
    )
    add(
        Case(
            "response_format-bad-schema",
            body=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
            expect="any",  # whatever xgrammar makes of it: a 400 naming the schema or a valid answer, never a 5xx
        )
    )
    add(Case("response_format-xml", body=chat(response_format={"type": "xml"}), param="response_format"))
    add(Case("response_format-no-schema", body=chat(response_format={"type": "json_schema"}), param="response_format"))
    add(Case("n2-stream", body=chat(n=2, stream=True), param="n"))
    for name, v in {
        "tools": [],
        "tool_choice": "none",
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "store": False,
        "user": "user-1",
        "metadata": {"k": "v"},
        "max_completion_tokens": TOKEN_LIMIT,
        "max_tokens": TOKEN_LIMIT,
        "seed": 2**63 - 1,
        "temperature": 2,
        "top_p": 1,
        "stop": ["\n", "zz"],
    }.items():
        add(
            Case(
                f"accepted-{name}",
                body=chat(**{name: v}, max_tokens=2) if name != "max_tokens" else chat(max_tokens=v),
                expect=200,
            )
        )
    add(Case("n-2", body=chat(n=2, seed=1, temperature=1.0), expect=200))
    add(Case("seed-negative", body=chat(seed=-1, temperature=1.0), expect=200))
    add(Case("temperature-denormal", body=chat(temperature=1e-320), expect=200))
    add(Case("temperature-negative-zero", body=chat(temperature=-0.0), expect=200))

    # unknown fields and deep nesting
    add(Case("unknown-field", body=chat(foo=1), param="foo"))
    add(Case("unknown-nested-5000", body=b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b", " + json.dumps(CHAT).encode()[1:]))
    add(Case("unknown-object-5000", body=b'{"x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"))
    add(Case("nested-60-unknown", body=chat(x=nested(60)), param="x"))
    add(Case("nested-in-content", body=b'{"messages":[{"role":"user","content":' + b"[" * 3000 + b"]" * 3000 + b"}]}"))
    add(Case("nested-in-stop", body=chat(stop=nested(70))))
    add(Case("brackets-inside-strings", body=user("[" * 250 + "{" * 250), expect=200))

    # messages
    for i, m in enumerate(
        [
            DROP,
            None,
            {},
            [],
            "hello",
            [1],
            [{}],
            [{"role": "user"}],
            [{"role": "user", "content": None}],
            [{"role": "user", "content": 123}],
            [{"role": "user", "content": []}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
            [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            [{"role": "wizard", "content": "x"}],
            [{"role": 1, "content": "x"}],
            [{"role": "system", "content": "x"}],
            [{"role": "assistant", "content": "x"}],
            [{"role": "user", "content": "x", "extra": 1}],
            [{"role": "user", "content": "   \n\t "}],
            [{"role": "USER", "content": "x"}],
            [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1),
        ]
    ):
        add(Case(f"messages-bad-{i}", body=chat(messages=m), param=None))
    for i, m in enumerate(
        [
            [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            [{"role": "user", "content": "hi", "name": "bob"}],
            [{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
            [{"role": "user", "content": "x"}] * MAX_MESSAGES,
        ]
    ):
        add(Case(f"messages-ok-{i}", body=chat(messages=m), expect=200))

    # images (the vision specialist answers; every bad image is a 400 naming what is wrong)
    png = solid((200, 30, 30))
    for case_id, parts, expect, words in [
        ("image-ok-png", [image_part(data_url(png))], 200, None),
        ("image-ok-jpeg", [image_part(data_url(solid((9, 9, 9), fmt="JPEG"), "image/jpeg"), "low")], 200, None),
        ("image-ok-webp", [image_part(data_url(solid((9, 9, 9), fmt="WEBP"), "image/webp"), "high")], 200, None),
        ("image-ok-two", [image_part(data_url(png))] * MAX_IMAGES, 200, None),
        ("image-not-an-image", [image_part(data_url(b"definitely not pixels"))], 400, "not an image"),
        ("image-truncated-png", [image_part(data_url(truncated(solid((1, 2, 3), (300, 300)))))], 400, "truncated"),
        (
            "image-truncated-jpeg",
            [image_part(data_url(truncated(solid((1, 2, 3), (300, 300), "JPEG")), "image/jpeg"))],
            400,
            "truncated",
        ),
        ("image-bad-crc", [image_part(data_url(bad_crc(png)))], 400, "corrupt"),
        ("image-too-many-pixels", [image_part(data_url(bilevel(1100, 1000)))], 400, "1100000 pixels; the limit"),
        ("image-bomb", [image_part(data_url(bilevel(12_000, 12_000)))], 400, "144000000 pixels"),
        ("image-huge-header", [image_part(data_url(huge_header_png()))], 400, "decompression bomb"),
        ("image-too-many", [image_part(data_url(png))] * (MAX_IMAGES + 1), 400, "3 images in one request"),
        ("image-gif", [image_part(data_url(solid((1, 2, 3), fmt="GIF"), "image/gif"))], 400, "GIF is not supported"),
        ("image-bmp", [image_part(data_url(solid((1, 2, 3), fmt="BMP")))], 400, "BMP is not supported"),
        ("image-bad-base64", [image_part("data:image/png;base64,!!not*base64!!")], 400, "not valid base64"),
        ("image-not-base64", [image_part("data:image/png,rawbytes")], 400, "must be base64"),
        ("image-text-mime", [image_part("data:text/html;base64,PGI+aGk8L2I+")], 400, "not an image type"),
        ("image-too-many-bytes", [image_part(data_url(png + b"\0" * IMAGE_BYTES))], 400, "over 24576 bytes"),
        ("image-http-disabled", [image_part("http://127.0.0.1:1/x.png")], 400, "disabled"),
        ("image-file-url", [image_part("file:///etc/passwd")], 400, "'file' is not supported"),
        ("image-empty-url", [{"type": "image_url", "image_url": {"url": ""}}], 400, "url"),
        ("image-no-url", [{"type": "image_url", "image_url": {}}], 400, "url: Field required"),
        ("image-bad-detail", [image_part(data_url(png), "ultra")], 400, "detail"),
        ("image-extra-key", [{"type": "image_url", "image_url": {"url": data_url(png), "x": 1}}], 400, "x:"),
        ("image-url-not-object", [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}], 400, "image_url"),
        ("image-unknown-part", [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], 400, "tag"),
    ]:
        body = chat(model="vision", messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}])
        add(Case(case_id, body=body, expect=expect, param="messages" if expect == 400 else None, words=words))
    image_msg = [{"role": "user", "content": [image_part(data_url(png)), {"type": "text", "text": "what?"}]}]
    add(Case("image-auto", body=chat(model="auto", messages=image_msg), expect=200))
    only = [{"role": "user", "content": [image_part(data_url(png))]}]  # an image and no text at all
    add(Case("image-only", body=chat(model="auto", messages=only), expect=200))
    add(Case("image-stream", body=chat(model="auto", messages=image_msg, stream=True), expect=200))
    add(Case("image-pinned-text-only", body=chat(model="code", messages=image_msg), expect=400, words="code"))
    add(Case("image-unknown-model", body=chat(model="radiology", messages=image_msg), expect=404))
    add(Case("image-in-system", body=chat(messages=[{**image_msg[0], "role": "system"}]), expect=400, words="user"))
    add(Case("image-route", path="/v1/route", body={"messages": image_msg}, expect=200))
    add(Case("image-completions", path="/v1/completions", body=comp(prompt=image_msg), expect=400, param="prompt"))

    # Unicode
    for i, s in enumerate(
        [
            "\u0000",
            "a\u0000b",
            "\u202eevil\u202c",
            "مرحبا بالعالم",
            "e\u0301" * 50,
            "Z\u0351\u0352\u0353" * 20,
            "😀👩‍👩‍👧‍👦",
            "\ufeffhi",
            "\uffff\ufffe",
            "\U0010ffff",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
            "中文 日本語 한국어",
            "\u200b\u200c\u200d",
            "\r\n\x1b[31m",
            "a\u2028b\u2029",
            "ｆｕｌｌｗｉｄｔｈ",
        ]
    ):
        add(Case(f"unicode-ok-{i}", body=user(s), expect=200))
    for i, esc in enumerate([b"\\ud800", b"\\udfff", b"a\\udc00b", b"\\ud83d", b"\\ude00\\ud83d"]):
        add(Case(f"surrogate-content-{i}", body=json.dumps(user("X")).encode().replace(b"X", esc), expect=400))
    add(Case("surrogate-pair-ok", body=json.dumps(user("X")).encode().replace(b"X", b"\\ud83d\\ude00"), expect=200))
    add(Case("surrogate-in-key", body=b'{"\\ud800": 1, ' + json.dumps(CHAT).encode()[1:], expect=400))
    add(Case("surrogate-in-model", body=json.dumps(chat(model="X")).encode().replace(b'"X"', b'"\\udbff"'), expect=400))
    add(Case("surrogate-in-stop", body=json.dumps(chat(stop="X")).encode().replace(b'"X"', b'"\\ud800"'), expect=400))
    add(Case("surrogate-in-unknown-deep", body=b'{"z": [[["\\ud800"]]], ' + json.dumps(CHAT).encode()[1:], expect=400))

    # sizes at and past the limits
    add(Case("body-at-limit", body=padded_to(BODY_LIMIT), expect="4xx"))  # over the prompt limits: 400, not 413
    add(Case("body-past-limit", body=padded_to(BODY_LIMIT + 1), expect=413))
    add(Case("body-far-past-limit", body=padded_to(4 * BODY_LIMIT), expect=413))
    add(Case("chunked-ok", body=chunks(json.dumps(CHAT).encode(), 7), expect=200))
    add(Case("chunked-past-limit", body=chunks(padded_to(BODY_LIMIT + 1)), expect=413))
    add(Case("chunked-far-past-limit", body=chunks(padded_to(8 * BODY_LIMIT), 65536), expect=413))
    add(Case("chunked-bad-json", body=chunks(b'{"messages": [', 3), expect=400))
    add(Case("chunked-empty", body=[b""], expect=400))
    add(
        Case(
            "prompt-chars-at-limit", body=user("fever " * (PROMPT_CHARS // 6) + "x" * (PROMPT_CHARS % 6)), expect="any"
        )
    )
    add(Case("prompt-chars-past-limit", body=user("x" * (PROMPT_CHARS + 1)), expect=400, param="messages"))
    add(Case("too-many-tokens-for-model", body=user("".join(chr(0x4E00 + i) for i in range(1300))), expect=400))

    # content types
    for i, ct in enumerate(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            ";;;",
            "application/xml",
            "image/png",
        ]
    ):
        add(Case(f"content-type-bad-{i}", body=CHAT, headers={**AUTH, "content-type": ct}, expect=415))
    for i, ct in enumerate(["application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json", None]):
        headers = {**AUTH} if ct is None else {**AUTH, "content-type": ct}
        add(Case(f"content-type-ok-{i}", body=CHAT, headers=headers, expect=200))

    # auth header variants
    for i, h in enumerate(
        [
            None,
            "Bearer",
            "Bearer .",
            f"Basic {KEY}",
            f"Token {KEY}",
            f"Bearer {KEY[:-1]}",
            f"Bearer {KEY}x",
            f"{KEY}",
            f"Bearer\t{KEY}x",
            "Bearer " + "k" * 6000,
            f"Bearer {KEY.upper()}",
        ]
    ):
        headers = {**JSON} if h is None else {**JSON, "Authorization": h}
        add(Case(f"auth-bad-{i}", body=CHAT, headers=headers, expect=401))
    for i, h in enumerate([f"bearer {KEY}", f"BEARER {KEY}", f"Bearer   {KEY}", f"Bearer  {KEY}"]):
        add(Case(f"auth-ok-{i}", body=CHAT, headers={**JSON, "Authorization": h}, expect=200))
    add(Case("auth-nonascii", body=CHAT, headers={**JSON, "Authorization": "Bearer clé-secrète".encode()}, expect=401))
    for path in ("/v1/models", "/openapi.json", "/docs"):
        add(Case(f"auth-get{path}", method="GET", path=path, body=None, headers={}, expect=401))
        add(Case(f"auth-get-ok{path}", method="GET", path=path, body=None, headers=AUTH, expect=200))
    add(Case("route-no-auth", path="/v1/route", body={"prompt": "x"}, headers=JSON, expect=401))
    add(Case("completions-no-auth", path="/v1/completions", body=COMP, headers=JSON, expect=401))

    # /v1/completions
    for i, (body, expect, param) in enumerate(
        [
            (comp(prompt=DROP), 400, "prompt"),
            (comp(prompt=["a", "b"]), 400, "prompt"),
            (comp(prompt=1), 400, "prompt"),
            (comp(prompt=""), 400, "prompt"),
            (comp(prompt="   "), 400, "prompt"),
            (comp(logprobs=2), 200, None),
            (comp(logprobs=0), 200, None),
            (comp(logprobs=6), 400, "logprobs"),
            (comp(logprobs=True), 400, "logprobs"),
            (comp(suffix="x"), 400, "suffix"),
            (comp(echo=True), 400, "echo"),
            (comp(best_of=2), 400, "best_of"),
            (comp(messages=CHAT["messages"]), 400, "messages"),
            (comp(stream="yes"), 400, "stream"),
            (comp(seed=2**70), 400, "seed"),
            (comp(max_tokens=TOKEN_LIMIT + 1), 400, None),
            (comp(), 200, None),
            (comp(stream=True), 200, None),
            (comp(echo=False, best_of=1), 200, None),
            (comp(prompt="\u202e\u0000😀"), 200, None),
            (comp(n=2), 200, None),
            (comp(model="auto"), 200, None),
        ]
    ):
        add(Case(f"completions-{i}", path="/v1/completions", body=body, expect=expect, param=param))

    # /v1/route
    for i, (body, expect) in enumerate(
        [
            ({}, 400),
            ({"prompt": 1}, 400),
            ({"prompt": "x", "foo": 1}, 400),
            ({"model": "nope", "prompt": "x"}, 404),
            ({"prompt": "fever and cough"}, 200),
            ({"messages": [{"role": "user", "content": "code in rust"}]}, 200),
            ({"messages": []}, 400),
            ({"prompt": "\ud83d\ude00 emoji"}, 200),
            ({"model": "code", "prompt": "x"}, 200),
            ({"prompt": "x" * 100_000}, "any"),
        ]
    ):
        add(Case(f"route-{i}", path="/v1/route", body=body, expect=expect))

    # streaming
    add(Case("stream-chat", body=chat(stream=True), expect=200))
    add(Case("stream-usage", body=chat(stream=True, stream_options={"include_usage": True}), expect=200))
    add(
        Case(
            "stream-auto-merge",
            body=chat(
                model="auto",
                stream=True,
                messages=[
                    {
                        "role": "user",
                        "content": TWO_DOMAIN,
                    }
                ],
            ),
            expect=200,
        )
    )
    add(Case("stream-bad-seed", body=chat(stream=True, seed=2**64), expect=400, param="seed"))

    # methods and paths
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/route"):
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            add(Case(f"method-{method}{path}", method=method, path=path, body=None, expect=405))
    for path in ("/v1/models", "/health"):
        for method in ("POST", "PUT", "DELETE"):
            add(Case(f"method-{method}{path}", method=method, path=path, body=None, expect=405))
    for path in (
        "/v1/nope",
        "/v1/chat/completions/",
        "/v1/models/",
        "/v2/chat/completions",
        "/%00",
        "/" + "a" * 2000,
        "/v1/models/medical/extra",
    ):
        add(Case(f"path{path[:40]}", method="GET", path=path, body=None, expect=404))
    add(Case("path-encoded-slash", method="GET", path="/v1/chat%2Fcompletions", body=None))
    add(Case("models-query", method="GET", path="/v1/models?x=1&x=2", body=None, headers=AUTH, expect=200))
    add(Case("health", method="GET", path="/health", body=None, headers={}, expect=200))
    add(Case("head-health", method="HEAD", path="/health", body=None, headers={}, expect="any"))
    add(Case("options-chat", method="OPTIONS", path="/v1/chat/completions", body=None, expect=405))
    return c


CORPUS = build_corpus()


def test_corpus_is_big_and_named_uniquely() -> None:
    ids = [c.id for c in CORPUS]
    assert len(ids) >= 200 and len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]


def send(http: httpx.Client, case: Case) -> httpx.Response:
    if case.body is None:
        content: Any = None
    elif isinstance(case.body, bytes):
        content = case.body
    elif isinstance(case.body, list) and case.body and all(isinstance(b, bytes) for b in case.body):
        parts = case.body
        content = iter(parts)  # an iterator: httpx sends Transfer-Encoding: chunked, no Content-Length
    else:
        content = json.dumps(case.body).encode()
    return http.request(case.method, case.path, content=content, headers=case.headers)


def check_error(r: httpx.Response, case: Case) -> None:
    if case.method == "HEAD":
        return  # no body by definition
    body = r.json()
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), body
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if case.param is not None:
        assert err["param"] == case.param, err
    if case.words is not None:
        assert case.words in err["message"], err


def check_ok(r: httpx.Response, case: Case) -> None:
    if case.path.startswith(("/v1/chat/completions", "/v1/completions")):
        if r.headers["content-type"].startswith("text/event-stream"):
            check_sse(r.text, chat=case.path.startswith("/v1/chat"))
            return
        body = r.json()
        assert body["object"] in ("chat.completion", "text_completion")
        n = case.body.get("n", 1) if isinstance(case.body, dict) else 1
        assert [c["index"] for c in body["choices"]] == list(range(n))
        for choice in body["choices"]:
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert isinstance(text, str)
            assert choice["finish_reason"] in ("stop", "length")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    elif case.path.startswith("/v1/models"):
        assert r.json()["object"] == "list"
    elif case.path == "/openapi.json":
        assert "/v1/chat/completions" in r.json()["paths"]
    elif case.path == "/docs":
        assert "swagger" in r.text.lower()
    elif case.path == "/v1/route":
        assert r.json()["routing"]["specialists"]
    if isinstance(case.body, dict) and "image" in json.dumps(case.body.get("messages", ""))[:4000]:
        last = r.text.rsplit("data: {", 1)[-1] if r.text.startswith("data:") else r.text
        assert '"modality": "image"' in last or '"modality":"image"' in last, r.text[-500:]


def check_sse(text: str, chat: bool) -> None:
    frames = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert frames[-1] == "[DONE]"
    finishes = []
    for f in frames[:-1]:
        obj = json.loads(f)
        assert "error" not in obj, obj
        for choice in obj["choices"]:
            finishes.append(choice["finish_reason"])
    assert [f for f in finishes if f is not None] and all(f in (None, "stop", "length") for f in finishes)


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_hostile_request(http: httpx.Client, case: Case) -> None:
    r = send(http, case)
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if isinstance(case.expect, int):
        assert r.status_code == case.expect, (r.status_code, r.text[:500])
    elif case.expect == "4xx":
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    else:
        assert r.status_code == 200 or 400 <= r.status_code < 500, r.status_code
    if r.status_code >= 400:
        check_error(r, case)
    else:
        check_ok(r, case)


def test_schemathesis_fuzzing_finds_no_server_error(url: str) -> None:
    from bench.fuzz_bench import fuzz

    report = fuzz(url, AUTH, examples=12, seed=0)  # bounded and seeded for CI; bench/fuzz_bench.py runs longer
    print("schemathesis:", report["requests"], "requests", report["statuses"])
    assert report["requests"] >= 60, report
    assert report["server_errors"] == [], report["server_errors"]
    assert report["statuses"].get("2xx", 0) > 0 and report["statuses"].get("4xx", 0) > 0, report


def test_service_still_answers_after_the_corpus(http: httpx.Client) -> None:
    import openai

    client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key=KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model="medical",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    # ...and the vision specialist still sees images after every hostile one above.
    png = data_url(solid((10, 120, 10)))
    msg = [{"role": "user", "content": [image_part(png), {"type": "text", "text": "what is it?"}]}]
    r = client.chat.completions.create(model="auto", messages=msg, max_tokens=2)
    assert r.model_extra["routing"]["used"] == ["vision"] and r.choices[0].finish_reason in ("stop", "length")
