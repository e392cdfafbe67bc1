"""Message content parts, as OpenAI's request types have them, for chat and Responses input.

Every part shape OpenAI defines is accepted on the wire. Text and refusals become template text;
image parts go to vision models (server/images.py); media parts are refused by the route for
text-only models (and audio and files for every model), naming the part and the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Tag

from hearth.server.errors import APIError
from hearth.server.wire import WireModel

MEDIA_TYPES = ("image_url", "input_audio", "file", "input_image", "input_file")


class TextPart(WireModel):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class RefusalPart(WireModel):
    """An assistant's refusal, sent back as conversation history."""

    type: Literal["refusal"]
    refusal: str


class ImageURL(WireModel):
    """Chat's `image_url` object: an https or `data:` URL, and OpenAI's `detail`."""

    url: str = ""  # empty: refused when the image is read (server/images.py)
    detail: Literal["auto", "low", "high"] = "auto"


class MediaPart(WireModel):
    """An image, audio clip or file: images read by vision models, the rest refused.

    Chat's image part carries `image_url: {url, detail}`; Responses' `input_image` carries
    `image_url` as a string and `detail` beside it."""

    type: Literal["image_url", "input_audio", "file", "input_image", "input_file"]
    image_url: ImageURL | str | None = None
    detail: Literal["auto", "low", "high"] = "auto"

    @property
    def is_image(self) -> bool:
        return self.type in ("image_url", "input_image")


# Capitalised tags: error locations leave them out (content[0].text, not content[0].Text.text).
_PART_TAGS = {"text": "Text", "input_text": "Text", "output_text": "Text", "refusal": "Refusal"}


def _part_tag(value: Any) -> str | None:
    kind = value.get("type", "text") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return _PART_TAGS.get(kind) or ("Media" if kind in MEDIA_TYPES else None)


Part = Annotated[
    Annotated[TextPart, Tag("Text")]
    | Annotated[RefusalPart, Tag("Refusal")]
    | Annotated[MediaPart, Tag("Media")],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message="content parts must be of type text, refusal, image_url, "
        "input_audio, file (chat) or input_text, output_text, input_image, input_file (responses)",
    ),
]


def parts_text(parts: list[Part]) -> str:
    """The text a template sees: text and refusal parts, in order."""
    return "".join(
        p.text if isinstance(p, TextPart) else p.refusal if isinstance(p, RefusalPart) else ""
        for p in parts
    )


def refuse_media(contents: list[Any], model: str, param: str) -> None:
    """400 naming the first media part and the model; `contents`: each message's content."""
    for i, content in enumerate(contents):
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, MediaPart):
                raise APIError(
                    400,
                    f"Content parts of type '{part.type}' are not supported by model "
                    f"'{model}': it reads text only.",
                    param=f"{param}[{i}].content[{j}]",
                    code="unsupported_content_part",
                )
