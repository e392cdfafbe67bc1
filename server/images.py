"""Image content parts for vision models: URLs to bytes, limits checked, template parts built.

`data:` base64 URLs are always read; https URLs only with `--allow-image-urls`, fetched with a
time limit and a size limit (the body is streamed and cut off). Each image is checked against
the server's limits (images per request, bytes, pixels read from the file's header) and a
failure is a 400 naming the part (`messages[0].content[1].image_url`). `detail` is accepted and
passed on; the model's processor decides the resolution, whatever it says.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from typing import Any

import httpx

from hearth.engine.types import ImageInput
from hearth.server.content import MediaPart, RefusalPart, TextPart
from hearth.server.errors import APIError
from hearth.server.settings import ServerSettings

__all__ = ["has_images", "read_images"]


def has_images(contents: list[Any]) -> bool:
    """Whether any message content (a list of parts) has an image part."""
    return any(
        isinstance(p, MediaPart) and p.is_image for c in contents if isinstance(c, list) for p in c
    )


def _bad(message: str, param: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param=param, code=code)


async def read_images(
    contents: list[Any], model: str, param: str, settings: ServerSettings
) -> tuple[list[list[dict[str, Any]] | None], list[ImageInput]]:
    """Each message's template content (parts with `{"type": "image"}` in place of each image;
    None for a message without images) and the images, in order. `contents`: each message's
    content; `param`: the field they came from (`messages`, `input`)."""
    rendered: list[list[dict[str, Any]] | None] = []
    images: list[ImageInput] = []
    for i, content in enumerate(contents):
        if not isinstance(content, list) or not has_images([content]):
            rendered.append(None)
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"{param}[{i}].content[{j}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, RefusalPart):
                parts.append({"type": "text", "text": part.refusal})
            elif part.is_image:
                if len(images) >= settings.max_images_per_request:
                    raise _bad(
                        f"at most {settings.max_images_per_request} images per request",
                        where,
                        "too_many_images",
                    )
                images.append(await _image(part, f"{where}.image_url", settings))
                parts.append({"type": "image"})
            else:
                raise APIError(
                    400,
                    f"Content parts of type '{part.type}' are not supported by model "
                    f"'{model}': it reads text and images.",
                    param=where,
                    code="unsupported_content_part",
                )
        rendered.append(parts)
    return rendered, images


async def _image(part: MediaPart, param: str, settings: ServerSettings) -> ImageInput:
    """The part's image bytes, checked against the limits."""
    ref = part.image_url
    url, detail = (ref.url, ref.detail) if not isinstance(ref, str | None) else (ref, part.detail)
    if not url:
        raise _bad("an image part needs an image_url", param)
    if url.startswith("data:"):
        data = _data_url(url, param, settings.max_image_bytes)
    elif url.startswith("https://"):
        if not settings.allow_image_urls:
            raise _bad(
                "image URLs are not fetched by this server (start it with --allow-image-urls); "
                "send the image as a data: URL",
                param,
            )
        data = await _fetch(url, param, settings)
    else:
        raise _bad("image_url must be an https:// or data: URL", param)
    if len(data) > settings.max_image_bytes:
        raise _bad(f"the image is larger than {settings.max_image_bytes} bytes", param)
    _check_pixels(data, param, settings.max_image_pixels)
    return ImageInput(data, detail)


def _data_url(url: str, param: str, limit: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _bad("a data: image URL must be base64 (data:image/png;base64,...)", param)
    if len(payload) * 3 // 4 > limit + 3:
        raise _bad(f"the image is larger than {limit} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data: URL is not valid base64", param) from None


async def _addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the event loop's resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def _check_public(url: str, param: str) -> None:
    """Refuse a URL whose host is, or resolves to, anything but public addresses (loopback,
    private, link-local, reserved): the server must not become a way into its own network."""
    parsed = httpx.URL(url)
    try:
        addresses = await _addresses(parsed.host, parsed.port or 443)
    except OSError:
        raise _bad("the image URL's host could not be resolved", param) from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        raise _bad("the image URL's host is not a public address", param)


async def _fetch(url: str, param: str, settings: ServerSettings) -> bytes:
    """The image at an https URL: public hosts only, no redirects, no proxy from the
    environment, at most `max_image_bytes`, all within `image_url_timeout_s` in total."""
    limit, chunks, size = settings.max_image_bytes, [], 0
    await _check_public(url, param)
    try:
        async with (
            asyncio.timeout(settings.image_url_timeout_s),
            httpx.AsyncClient(timeout=settings.image_url_timeout_s, trust_env=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise _bad("fetching the image did not return it (HTTP status not 200)", param)
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise _bad(f"the image is larger than {limit} bytes", param)
                chunks.append(chunk)
    except (httpx.HTTPError, TimeoutError):
        raise _bad("the image could not be fetched", param) from None
    return b"".join(chunks)


def _check_pixels(data: bytes, param: str, limit: int) -> None:
    """The image's size from its header (nothing is decoded); 400 when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # more than twice Pillow's own limit
        raise _bad(f"the image has more than {limit} pixels", param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise _bad("the image cannot be read (PNG, JPEG, WebP, GIF, ...)", param) from None
    if width * height > limit:
        raise _bad(f"the image has {width}x{height} pixels; at most {limit} are allowed", param)
