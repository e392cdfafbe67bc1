"""Vision prompts: chat messages with images through the model's own processor (AutoProcessor).

The processor renders the chat template (`{"type": "image"}` parts), expands each image's
placeholder into its feature tokens, and turns the images into pixel tensors; this module
finds each image's token span and hashes its bytes for the prefix cache. The engine encodes the
images later, at prefill (engine/multimodal/encoder.py).
"""

from __future__ import annotations

import hashlib
import inspect
import io
from collections.abc import Sequence
from typing import Any

from hearth.engine.text.tokenizer import render_chat
from hearth.engine.types import ImageInput, InvalidRequestError, MultiModalInputs

__all__ = ["VisionProcessor", "load_processor"]


def load_processor(path: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's processor, with the PIL image processor (torchvision is not needed).

    A processor that also has a video processor (Qwen2-VL's) needs torchvision for it; without
    torchvision the same processor class is built for images only (`_images_only`)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, TypeError, ValueError):
        processor = _images_only(path, trust_remote_code)
        if processor is None:
            raise
        return processor


def _images_only(path: str, trust_remote_code: bool) -> Any:
    """The model type's processor class without a video processor, or None if it has none."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(config.model_type) or "", None)
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None

    class ImagesOnly(cls):  # the attribute check looks the video class up (torchvision)
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    images = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return ImagesOnly(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


class VisionProcessor:
    """Renders and processes one vision prompt; thread-safe (called from worker threads)."""

    def __init__(self, processor: Any, image_token_id: int, merge_size: int = 1) -> None:
        self.processor = processor
        self.image_token_id = image_token_id
        self.merge_size = merge_size  # Qwen2-VL: patches merged per side into one token

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
        images: Sequence[ImageInput],
    ) -> tuple[list[int], MultiModalInputs]:
        """Prompt ids (placeholders expanded) and the processed images, in message order."""
        text = render_chat(self.processor, messages, tools, template_kwargs)
        pictures = [_open(image, i) for i, image in enumerate(images)]
        out = self.processor(
            text=[text],
            images=pictures or None,
            return_tensors="pt",
            add_special_tokens=False,  # templates include their own special tokens
        )
        ids: list[int] = out["input_ids"][0].tolist()
        data = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        data["input_ids"] = out["input_ids"]  # [1, L]: M-RoPE positions are computed from it
        spans = self._spans(ids, data, len(images))
        hashes = [_digest(image) for image in images]
        return ids, MultiModalInputs(data, spans, hashes)

    def _spans(self, ids: list[int], data: dict[str, Any], count: int) -> list[tuple[int, int]]:
        """(first position, token count) of each image's placeholder tokens."""
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if count == 0:
            if where:
                raise InvalidRequestError("the prompt has image tokens but no images", "messages")
            return []
        grid = data.get("image_grid_thw")  # [N, 3]: Qwen2-VL's patches per image
        if grid is not None:
            sizes = (grid.prod(-1) // self.merge_size**2).tolist()
        else:
            sizes = [len(where) // count] * count
        if sum(sizes) != len(where) or len(sizes) != count:
            raise InvalidRequestError(
                f"{count} images but {len(where)} image tokens in the rendered prompt "
                "(does the chat template render every image part?)",
                "messages",
            )
        spans, at = [], 0
        for size in sizes:
            spans.append((where[at], size))
            at += size
        return spans


def _open(image: ImageInput, index: int) -> Any:
    from PIL import Image

    try:
        picture = Image.open(io.BytesIO(image.data))
        return picture.convert("RGB")
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated files
        raise InvalidRequestError(f"image {index} cannot be decoded: {exc}", "messages") from None


def _digest(image: ImageInput) -> str:
    return hashlib.sha256(image.data).hexdigest()
