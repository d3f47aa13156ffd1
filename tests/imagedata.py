"""Images for the tests, made with Pillow on the spot: good ones, and every kind of bad one the service refuses."""

from __future__ import annotations

import base64
import functools
import io
import zlib

from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", size, color), fmt)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, detail: str | None = None) -> dict:
    part: dict = {"type": "image_url", "image_url": {"url": url}}
    if detail is not None:
        part["image_url"]["detail"] = detail
    return part


def ask(text: str, *urls: str) -> list[dict]:
    """One user message: the images, then the question (OpenAI content parts)."""
    return [{"role": "user", "content": [*(image_part(u) for u in urls), {"type": "text", "text": text}]}]


@functools.cache
def bilevel(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG: width x height pixels in a few kilobytes (a decompression bomb when large)."""
    return encode(Image.new("1", (width, height)), "PNG", optimize=True)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bad_crc(png: bytes) -> bytes:
    """A PNG whose first IDAT chunk's data was changed: the chunk CRC no longer matches (verify() fails)."""
    at = png.index(b"IDAT") + 4
    return png[:at] + bytes([png[at] ^ 0xFF]) + png[at + 1 :]


def huge_header_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid-looking PNG header that declares a huge canvas, with almost no data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
