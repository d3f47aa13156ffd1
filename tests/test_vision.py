"""Image inputs without Ray: validation limits, config, routing by modality, the tiny VLM and the HF engine's
mixed image/text batches. The served paths (HTTP, streaming, hostile images, http URLs) are in test_serve.py
and test_hostile.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from deployments.config import ConfigError, EngineConfig, ImageConfig, parse_graph_config
from deployments.engines.base import EngineInputError, GenerationRequest, SamplingParams
from deployments.images import ImageError, decode_image, host_allowed, inspect_image, load_images, parse_data_url
from tests.imagedata import bad_crc, bilevel, data_url, encode, huge_header_png, solid, truncated

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def image(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def vchat(text: str, *images: Image.Image, params: SamplingParams = GREEDY) -> GenerationRequest:
    parts = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
    return GenerationRequest(messages=({"role": "user", "content": parts},), params=params, images=images)


def tchat(text: str, params: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=params)


# ---- validation: every bad image is an ImageError that says what is wrong --------------------------------


@pytest.mark.parametrize(
    "data, code, words",
    [
        (b"hello, not an image", "invalid_image", "not an image"),
        (truncated(solid(RED, (200, 200))), "invalid_image", "truncated or corrupt"),
        (truncated(solid(RED, (200, 200), "JPEG")), "invalid_image", "truncated or corrupt"),
        (bad_crc(solid(RED)), "invalid_image", "truncated or corrupt"),
        (solid(RED, fmt="GIF"), "unsupported_image_format", "GIF is not supported"),
        (solid(RED, fmt="BMP"), "unsupported_image_format", "BMP is not supported"),
        (solid(RED, fmt="TIFF"), "unsupported_image_format", "TIFF is not supported"),
        (bilevel(1100, 1000), "image_too_large", "1100x1000 = 1100000 pixels; the limit is 1000000"),
        (bilevel(12_000, 12_000), "image_too_large", "nothing was decoded"),  # 144 M pixels in 17 KB
        (huge_header_png(), "image_too_large", "decompression bomb"),  # beyond Pillow's own guard
        (solid(RED, (100, 100), "JPEG") + b"\0" * 40_000, "image_too_large", "the limit is 32768"),
    ],
    ids=[
        "text",
        "truncated-png",
        "truncated-jpeg",
        "bad-crc",
        "gif",
        "bmp",
        "tiff",
        "pixels",
        "bomb",
        "header",
        "bytes",
    ],
)
def test_bad_images_are_refused_with_a_reason(data: bytes, code: str, words: str) -> None:
    config = ImageConfig(max_pixels=1_000_000, max_image_bytes=32_768)
    with pytest.raises(ImageError, match=words) as err:
        inspect_image(data, config)
    assert err.value.code == code


def test_good_images_decode_to_rgb_in_every_allowed_format() -> None:
    config = ImageConfig()
    for fmt in ("PNG", "JPEG", "WEBP"):
        info = inspect_image(solid(RED, (40, 30), fmt), config)
        assert (info.format, info.width, info.height) == (fmt, 40, 30)
    # Transparency lands on white (not black); palette and grey images come out RGB too.
    clear = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert decode_image(clear, config).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(encode(Image.new("L", (4, 4), 7)), config).getpixel((1, 1)) == (7, 7, 7)
    # The formats list really limits the decoders: WebP refused when only PNG is allowed.
    with pytest.raises(ImageError, match="WEBP is not supported"):
        inspect_image(solid(RED, fmt="WEBP"), ImageConfig(formats=["PNG"]))


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image type"),
        ("data:image/png;base64,", "no data"),
        ("data:nonsense", "must look like data:image/png;base64"),
        ("data:image/png;base64," + "A" * 20_000, "over 8192 bytes"),  # refused before decoding base64
    ],
)
def test_bad_data_urls(url: str, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        parse_data_url(url, ImageConfig(max_image_bytes=8192))


def test_remote_urls_are_off_by_default_and_allowlisted_when_on() -> None:
    png = data_url(solid(RED))
    assert len(asyncio.run(load_images([png], ImageConfig()))) == 1
    with pytest.raises(ImageError, match="disabled") as err:
        asyncio.run(load_images(["https://example.com/cat.png"], ImageConfig()))
    assert err.value.code == "image_url_not_allowed"
    with pytest.raises(ImageError, match="scheme 'file' is not supported"):
        asyncio.run(load_images(["file:///etc/passwd"], ImageConfig()))
    with pytest.raises(ImageError, match="5 images in one request; the limit is 4"):
        asyncio.run(load_images([png] * 5, ImageConfig()))
    on = ImageConfig(remote={"enabled": True, "allowed_hosts": ["img.example.com"]})
    for url, words in [
        ("https://evil.example.com/x.png", "not in this service's allowlist"),
        ("http://img.example.com/x.png", "scheme 'http' is not allowed"),
        ("https://user:pw@img.example.com/x.png", "credentials"),
    ]:
        with pytest.raises(ImageError, match=words):
            asyncio.run(load_images([url], on))


def test_host_allowlist_entries() -> None:
    allowed = ["cdn.example.com", "127.0.0.1:8080", "*.images.org", "[::1]"]
    assert host_allowed("CDN.example.com", 443, allowed)
    assert host_allowed("127.0.0.1", 8080, allowed) and not host_allowed("127.0.0.1", 8081, allowed)
    assert host_allowed("a.b.images.org", None, allowed) and not host_allowed("images.org", None, allowed)
    assert not host_allowed("evilimages.org", None, allowed)
    assert host_allowed("::1", 80, allowed)
    assert not host_allowed("example.com", 443, allowed)


def test_image_config_errors_name_the_field() -> None:
    base = {
        "specialists": [{"name": "general", "model": "m"}],
        "router": {"fallback": "general"},
        "merger": {"model": "t"},
    }
    bad = [
        ({"server": {"images": {"max_pixels": 0}}}, "server.images.max_pixels"),
        ({"server": {"images": {"max_images": 1000}}}, "server.images.max_images"),
        ({"server": {"images": {"formats": ["GIF"]}}}, "server.images.formats.0"),
        ({"server": {"images": {"remote": {"enabled": True}}}}, "allowed_hosts is empty"),
        ({"server": {"images": {"remote": {"allowed_hosts": ["*"]}}}}, "server.images.remote.allowed_hosts"),
        ({"router": {"fallback": "general", "image_domain_threshold": 1.5}}, "router.image_domain_threshold"),
        ({"specialists": [{"name": "general", "model": "m", "modalities": ["image"]}]}, "must include 'text'"),
        ({"specialists": [{"name": "general", "model": "m", "modalities": ["text", "audio"]}]}, "modalities.1"),
    ]
    for change, words in bad:
        with pytest.raises(ConfigError, match=words.replace("*", r"\*")):
            parse_graph_config({**base, **change})
    # Members of one group share one loaded model, so they must agree on what it accepts.
    group = [
        {"name": "a", "model": "m", "group": "g", "modalities": ["text", "image"]},
        {"name": "general", "model": "m", "group": "g"},
    ]
    with pytest.raises(ConfigError, match=r"differ in \['modalities'\]"):
        parse_graph_config({**base, "specialists": group})


# ---- routing by modality (the real tiny ada router) ----------------------------------------------------


def council(zoo: Path, **router):
    from deployments.council import Council

    specialists = [{"name": n, "model": str(zoo / n)} for n in ("medical", "code", "general")] + [
        {"name": "vision", "model": str(zoo / "vision"), "modalities": ["text", "image"]}
    ]
    config = parse_graph_config(
        {
            "specialists": specialists,
            "router": {"fallback": "general", "top_k": 2, **router},
            "merger": {"model": str(zoo / "t5")},
        }
    )
    return Council(config, specialists=None, merger=None)  # decide() calls neither


XRAY = "What does this chest X-ray show? Could it be pneumonia?"


def test_images_go_to_the_vision_specialist_and_a_confident_domain_joins(zoo: Path) -> None:
    from deployments.council import CouncilError

    c = council(zoo)
    assert c.decide("auto", XRAY).specialists == ["medical"]  # text alone: the router's choice
    d = c.decide("auto", XRAY, images=1)
    assert d.specialists == ["vision", "medical"] and d.modality == "image"
    assert d.scores["medical"] >= 0.8 and "'medical' (text score" in d.reason
    # The general fallback never joins, however sure the router is ("what is in this picture": general 0.9).
    assert c.decide("auto", "What is in this picture?", images=1).specialists == ["vision"]
    # Below the threshold: the vision specialist alone (the threshold just above this router's score).
    above = council(zoo, image_domain_threshold=min(1.0, d.scores["medical"] + 1e-3))
    assert above.decide("auto", XRAY, images=1).specialists == ["vision"]
    # An image with no text at all still routes.
    assert c.decide("auto", "", images=2).specialists == ["vision"]
    assert council(zoo, image_domain_threshold=None).decide("auto", XRAY, images=1).specialists == ["vision"]
    assert council(zoo, top_k=1).decide("auto", XRAY, images=1).specialists == ["vision"]
    # Pinned: the vision specialist takes images; a text-only one is a 400 that names the capable ones.
    assert c.decide("vision", XRAY, images=1).specialists == ["vision"]
    with pytest.raises(CouncilError, match=r"'medical' does not accept images.*\['vision'\]") as err:
        c.decide("medical", XRAY, images=1)
    assert err.value.status == 400 and err.value.code == "images_not_supported"
    with pytest.raises(CouncilError, match="does not exist") as err:
        c.check_images("radiology", 1)
    assert err.value.status == 404


def test_without_a_vision_specialist_images_are_a_400_naming_it(zoo: Path) -> None:
    from deployments.council import Council, CouncilError

    config = parse_graph_config(
        {
            "specialists": [{"name": n, "model": str(zoo / n)} for n in ("medical", "code", "general")],
            "router": {"fallback": "general"},
            "merger": {"model": str(zoo / "t5")},
        }
    )
    with pytest.raises(CouncilError, match=r"no vision specialist is configured.*modalities \[text, image\]") as e:
        Council(config, None, None).decide("auto", XRAY, images=1)
    assert e.value.status == 400


def test_text_only_specialists_get_the_text_and_a_note_where_the_image_was() -> None:
    from deployments.council import IMAGE_OMITTED, without_images

    payload = {
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": XRAY}]}],
        "images": [b"png bytes"],
        "image_limits": {},
    }
    out = without_images(payload)
    assert "images" not in out and "image_limits" not in out
    assert out["messages"][0]["content"] == f"{IMAGE_OMITTED} {XRAY}"


# ---- the tiny VLM and the HF engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(zoo: Path) -> Iterator:
    from deployments.engines.hf import HFEngine

    e = HFEngine(EngineConfig(model=str(zoo / "vision"), modalities=["text", "image"], max_prompt_tokens=200))
    yield e
    e.close()


def test_zoo_vlm_reloads_offline_through_the_auto_classes(zoo: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = zoo / "vision"
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.bin"))
    model = AutoModelForImageTextToText.from_pretrained(d, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(d)
    assert model.config.model_type == "llava" and model.config.vision_config.model_type == "clip_vision_model"
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<image>" in text
    out = processor(text=[text], images=[image(RED)], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 32, 32)
    assert int((out["input_ids"] == model.config.image_token_index).sum()) == 16  # 4x4 patches


def test_vlm_greedy_rows_equal_hf_generate_and_the_image_matters(vlm) -> None:
    reqs = [vchat("what is this?", image(RED)), vchat("what is this?", image(BLUE))]
    ours = vlm.generate_batch_sync(reqs)
    for req, r in zip(reqs, ours, strict=True):
        text = vlm.processor.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False)
        inputs = vlm.processor(text=[text], images=list(req.images), return_tensors="pt", add_special_tokens=False)
        ref = vlm.model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=sorted(vlm.stop_ids))
        n = inputs["input_ids"].shape[1]
        assert r.text == vlm.tokenizer.decode(ref[0, n:], skip_special_tokens=True)
        assert r.prompt_tokens == n
    assert ours[0].text != ours[1].text  # the pixels reach the model


def test_mixed_image_and_text_batch_equals_each_row_alone(vlm) -> None:
    reqs = [
        vchat("what is this?", image(RED)),
        tchat("hello there, how are you today?"),
        vchat("compare them", image(GREEN), image(BLUE, (64, 20))),  # two images in one row
        tchat("x"),
        vchat("and this?", image(RED, (20, 50)), params=SamplingParams(temperature=0.0, max_new_tokens=4)),
    ]
    batch = vlm.generate_batch_sync(reqs)
    alone = [vlm.generate_sync(r) for r in reqs]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in alone]
    assert len({r.prompt_tokens for r in batch}) == len(reqs)  # every row a different length: padding exercised


def test_image_row_joins_a_running_text_row_mid_flight(vlm) -> None:
    long_req = tchat("tell me everything", SamplingParams(temperature=0.0, max_new_tokens=30))
    joiners = [vchat("what is this?", image(GREEN)), tchat("short one")]
    alone = [vlm.generate_sync(r) for r in [long_req, *joiners]]

    async def mixed():
        stream = vlm.stream(long_req)
        first = await stream.__anext__()  # decoding already: the image row's prefill joins a running batch
        rest = asyncio.gather(*(vlm.generate(r) for r in joiners))
        return [first, *[d async for d in stream]], await rest

    deltas, together = asyncio.run(mixed())
    assert "".join(d.text for d in deltas) == alone[0].text
    assert [r.text for r in together] == [r.text for r in alone[1:]]


def test_vlm_refuses_what_it_cannot_pair(vlm, zoo: Path) -> None:
    from deployments.engines.hf import HFEngine

    with pytest.raises(EngineInputError, match="image placeholder '<image>'"):
        vlm.generate_sync(tchat("sneaky <image> token"))
    bad = GenerationRequest(messages=({"role": "user", "content": [{"type": "image"}]},), params=GREEDY)
    with pytest.raises(EngineInputError, match="1 image placeholder"):
        vlm.generate_sync(bad)
    text_only = HFEngine(EngineConfig(model=str(zoo / "code")))
    try:
        with pytest.raises(EngineInputError, match="does not accept images"):
            text_only.generate_sync(vchat("hi", image(RED)))
    finally:
        text_only.close()


def test_a_failing_prefill_fails_its_rows_only(vlm) -> None:
    """A joiner whose forward breaks (here: an image row carrying pixels of the wrong size) gets the error;
    the row already decoding finishes untouched."""
    long_req = tchat("tell me everything", SamplingParams(temperature=0.0, max_new_tokens=20))
    expected = vlm.generate_sync(long_req).text
    broken = vchat("what is this?", image(RED))
    original = vlm.prepare

    def wrong_size(request: GenerationRequest) -> GenerationRequest:
        out = original(request)
        if out.image_inputs is None:
            return out
        return dataclasses.replace(out, image_inputs={"pixel_values": torch.zeros(1, 3, 48, 48)})

    async def go():
        stream = vlm.stream(long_req)
        first = await stream.__anext__()
        vlm.prepare = wrong_size
        try:
            failed = asyncio.ensure_future(vlm.generate(broken))
            rest = [d async for d in stream]
        finally:
            vlm.prepare = original
        with pytest.raises(Exception):  # noqa: B017 - whatever the model raises reaches this row's caller
            await failed
        return "".join(d.text for d in [first, *rest])

    assert asyncio.run(go()) == expected
    vlm.check_health()  # the decoding thread survived


def test_mutated_images_give_an_image_or_an_image_error_never_anything_else() -> None:
    """Seeded byte flips and cuts of real PNG, JPEG and WebP files: validation either accepts or refuses
    with ImageError (a 400), never another exception (a 500)."""
    import random

    rng = random.Random(0)
    config = ImageConfig(max_pixels=1_000_000)
    seeds = [solid(RED, (23, 17), f) for f in ("PNG", "JPEG", "WEBP")]
    seen = {"ok": 0, "refused": 0}
    for i in range(450):
        data = bytearray(seeds[i % 3])
        for _ in range(rng.randint(1, 4)):
            if len(data) < 2:
                break
            at = rng.randrange(1, len(data))
            if rng.random() < 0.2:
                del data[at:]
            else:
                data[at] = rng.randrange(256)
        try:
            inspect_image(bytes(data), config)
            seen["ok"] += 1
        except ImageError:
            seen["refused"] += 1
    assert seen["ok"] > 0 and seen["refused"] > 0, seen
