"""Image inputs: data: URLs and allowlisted http(s) URLs to validated bytes, and bytes to bounded RGB images."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from deployments.config import MAX_IMAGE_PIXELS_CEILING, ImageConfig

logger = logging.getLogger(__name__)

# Pillow's own guard against decompression bombs, lowered from its ~89 M pixel default to the largest value
# a config may allow; each decode also checks the configured max_pixels from the header before loading.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS_CEILING
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error, never half an image padded with grey

# Magic bytes of formats we do not decode, only to name them in the error (their decoders never run).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),  # the allowed ones too, for configs that leave one out
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"qoif", "QOI"),
)
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_MIME = re.compile(r"^image/[a-z0-9.+-]+$")
_HOST_ENTRY = re.compile(r"^(?P<name>\[[^\]]+\]|[^:]+)(?::(?P<port>\d+))?$")  # host, host:port, [v6]:port


class ImageError(ValueError):
    """A client's image that cannot be used; `code` is a bounded label, the message says what is wrong."""

    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass(frozen=True)
class ImageInfo:
    """What validation found out about one image (logged: never its bytes)."""

    format: str
    width: int
    height: int
    nbytes: int


def _max_b64_chars(max_bytes: int) -> int:
    return 4 * ((max_bytes + 2) // 3)


def parse_data_url(url: str, config: ImageConfig) -> bytes:
    """The bytes of a `data:image/...;base64,` URL, bounded before anything is decoded."""
    m = _DATA_URL.match(url[:256])
    if m is None:
        raise ImageError("a data URL must look like data:image/png;base64,<data>", "invalid_image_url")
    mime = m["mime"].strip().lower()
    if not _MIME.match(mime):
        raise ImageError(f"data URL media type {mime[:40]!r} is not an image type (image/png, image/jpeg, image/webp)")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise ImageError("image data URLs must be base64-encoded (data:image/png;base64,...)", "invalid_image_url")
    b64 = url[m.end() :]
    if len(b64) > _max_b64_chars(config.max_image_bytes):
        raise ImageError(
            f"image is over {config.max_image_bytes} bytes ({len(b64)} base64 characters)", "image_too_large"
        )
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None
    if not data:
        raise ImageError("image data URL holds no data")
    return data


def host_allowed(host: str, port: int | None, allowed: Sequence[str]) -> bool:
    """Whether host[:port] matches an allowlist entry: 'host', 'host:port' or '*.domain' (subdomains)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        m = _HOST_ENTRY.match(entry)
        if m is None:
            continue
        if m["port"] is not None and int(m["port"]) != port:
            continue
        name = m["name"].strip("[]")
        if host == name or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


def check_remote_url(url: str, config: ImageConfig) -> None:
    """Refuse a remote URL the config does not allow (before any connection is made)."""
    remote = config.remote
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImageError("image URL is not a valid URL", "invalid_image_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(
            f"image URL scheme {scheme[:20]!r} is not supported: send a data: URL (or http(s) where enabled)",
            "invalid_image_url",
        )
    if not remote.enabled:
        raise ImageError(
            "image URLs over http(s) are disabled on this service: send the image inline as a "
            "data:image/...;base64 URL",
            "image_url_not_allowed",
        )
    if scheme not in remote.schemes:
        raise ImageError(
            f"image URL scheme {scheme!r} is not allowed (allowed: {remote.schemes})", "image_url_not_allowed"
        )
    if parts.username is not None or parts.password is not None:
        raise ImageError("image URLs with credentials (user:password@) are not allowed", "image_url_not_allowed")
    host = parts.hostname or ""
    if not host or not host_allowed(host, port, remote.allowed_hosts):
        raise ImageError(f"image host {host[:100]!r} is not in this service's allowlist", "image_url_not_allowed")


async def fetch_url(url: str, config: ImageConfig) -> bytes:
    """GET an allowlisted image URL: no redirects, no proxies from the environment, bounded bytes and time."""
    import httpx

    check_remote_url(url, config)
    limit, timeout = config.max_image_bytes, config.remote.timeout_s
    host = urlsplit(url).hostname

    async def get() -> bytes:
        # trust_env=False: no proxy or .netrc credentials from the replica's environment ride along.
        async with (
            httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client,
            client.stream("GET", url, headers={"Accept": "image/png, image/jpeg, image/webp"}) as r,
        ):
            if r.is_redirect:
                raise ImageError(f"image URL answered a redirect ({r.status_code}): redirects are not followed")
            if r.status_code != 200:
                raise ImageError(f"fetching the image failed: HTTP {r.status_code}", "image_fetch_failed")
            declared = r.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ImageError(f"image is {declared} bytes; the limit is {limit}", "image_too_large")
            buf = bytearray()
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) > limit:  # stop reading at the limit, whatever the headers said
                    raise ImageError(f"image is over {limit} bytes; the limit is {limit}", "image_too_large")
            return bytes(buf)

    try:
        # httpx's timeout is per read; a server dripping one byte a second would pass it: bound the whole fetch.
        return await asyncio.wait_for(get(), timeout)
    except asyncio.TimeoutError:
        raise ImageError(f"fetching the image from {host!r} took over {timeout:g}s", "image_fetch_failed") from None
    except httpx.HTTPError as err:
        raise ImageError(
            f"fetching the image from {host!r} failed: {type(err).__name__}", "image_fetch_failed"
        ) from None


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # when a config leaves WebP out
        return "WEBP"
    head = data[:16].lstrip()
    return next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)


def _open(data: bytes, config: ImageConfig) -> Image.Image:
    """Open (header only) with the allowed decoders alone, and check the pixel count before any decoding."""
    if len(data) > config.max_image_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {config.max_image_bytes}", "image_too_large")
    try:
        img = Image.open(io.BytesIO(data), formats=list(config.formats))
    except UnidentifiedImageError:
        other = _sniff(data)
        allowed = ", ".join(config.formats)
        if other is not None:
            raise ImageError(
                f"image format {other} is not supported (allowed: {allowed})", "unsupported_image_format"
            ) from None
        raise ImageError(f"the data is not an image in an allowed format ({allowed})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"image rejected as a decompression bomb: {err}", "image_too_large") from None
    except Exception as err:  # a header Pillow cannot parse (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"the image header is corrupt: {str(err)[:120] or type(err).__name__}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > config.max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h} pixels; the limit is {config.max_pixels} (nothing was decoded)",
            "image_too_large",
        )
    return img


def inspect_image(data: bytes, config: ImageConfig) -> ImageInfo:
    """Fully validate an encoded image (format, size, integrity, every pixel decodes); ImageError otherwise."""
    img = _open(data, config)
    fmt, (w, h) = img.format or "?", img.size
    try:
        img.verify()  # container integrity (PNG chunk CRCs) without decoding pixels
    except Exception as err:  # Pillow raises many types here (SyntaxError, struct.error, OSError)
        raise ImageError(f"the {fmt} image is truncated or corrupt: {str(err)[:120] or type(err).__name__}") from None
    decode_image(data, config)  # verify() leaves the image unusable; decode again to catch truncated data
    return ImageInfo(fmt, w, h, len(data))


def decode_image(data: bytes, config: ImageConfig) -> Image.Image:
    """Encoded bytes -> an RGB image (EXIF orientation applied, transparency over white), within the limits."""
    img = _open(data, config)
    fmt = img.format or "?"
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise ImageError(f"image rejected as a decompression bomb: {err}", "image_too_large") from None
    except Exception as err:  # truncated or corrupt pixel data
        raise ImageError(f"the {fmt} image is truncated or corrupt: {str(err)[:120] or type(err).__name__}") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


async def load_images(urls: Sequence[str], config: ImageConfig) -> list[tuple[bytes, ImageInfo]]:
    """Every image URL of a request to validated bytes, in order; the first bad one raises ImageError
    whose message starts with its index."""
    if len(urls) > config.max_images:
        raise ImageError(f"{len(urls)} images in one request; the limit is {config.max_images}", "too_many_images")

    async def one(i: int, url: str) -> tuple[bytes, ImageInfo]:
        try:
            is_data = url[:5].lower() == "data:"
            data = parse_data_url(url, config) if is_data else await fetch_url(url, config)
            # Decoding takes milliseconds to a second: off the ingress's event loop.
            return data, await asyncio.to_thread(inspect_image, data, config)
        except ImageError as err:
            raise ImageError(f"image {i}: {err.message}", err.code) from None

    return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(urls))))


def limits_payload(config: ImageConfig) -> dict[str, Any]:
    """The decoding limits as plain data, sent with the image bytes to the specialist (which decodes again)."""
    return config.model_dump(include={"max_image_bytes", "max_pixels", "formats"})


def decode_payload_images(images: Sequence[bytes], limits: dict[str, Any] | None) -> tuple[Image.Image, ...]:
    """Specialist side: bytes the ingress validated -> RGB images, under the same limits (defence in depth)."""
    config = ImageConfig.model_validate(limits or {})
    return tuple(decode_image(bytes(b), config) for b in images)
