"""Tiny random vision-language checkpoints (LLaVA-style, Qwen2-VL-style) with their processors.

Built from SmolLM2's tokenizer with the image tokens added; no download. The processors use the
PIL (slow) image processors: torchvision is not a dependency.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

# A chat template that renders {"type": "image"} parts as the processor's image token.
LLAVA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_TEMPLATE = LLAVA_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")

_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)


def _tokenizer(tokenizer_dir: Path, tokens: list[str]) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


def build_tiny_llava(out: Path, tokenizer_dir: Path) -> Path:
    """LLaVA: a 2-layer CLIP vision tower (32x32 images, 8x8 patches: 16 image tokens per
    image) and a 2-layer Llama, saved with a LlavaProcessor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(tokenizer_dir, ["<image>"])
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(vocab_size=len(tokenizer), **_TEXT)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return out


def build_tiny_qwen2_vl(out: Path, tokenizer_dir: Path, version: str = "2") -> Path:
    """Qwen2-VL (`version` "2.5": Qwen2.5-VL, windowed vision attention): a 2-layer vision
    encoder (14-pixel patches merged 2x2) and a 2-layer Qwen2 with M-RoPE; images resized to
    28..112 pixels a side (1 to 16 tokens). The tokenizer (with the chat template) and the image
    processor are saved: without torchvision there is no video processor, so hearth builds the
    processor for images (engine.multimodal)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    tokenizer = _tokenizer(
        tokenizer_dir, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
    ids = tokenizer.convert_tokens_to_ids
    text = dict(_TEXT, vocab_size=len(tokenizer))
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "rope_theta": 10000.0,
    }
    vision = dict(
        depth=2,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if version == "2.5":
        vision.update(
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=112 * 112).save_pretrained(out)
    return out


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A random RGB PNG of this size."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            for _ in range(width * height)
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()
