"""Vision models (issue 18): tiny random LLaVA- and Qwen2-VL-style checkpoints built here.

Greedy tokens equal transformers' own `generate` on the processor's inputs (engine and live
server through the openai SDK), several images per message, prefix-cache blocks keyed by the
image's hash, limits and text-only refusals as 400s naming the field.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pytest

from hearth.engine.types import ImageInput
from tests.fixtures.server import running_server, tiny_config
from tests.fixtures.vision import build_tiny_llava, build_tiny_qwen2_vl, data_url, png_bytes

MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image"},
            {"type": "text", "text": "with"},
            {"type": "image"},
        ],
    }
]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), smollm_tokenizer_dir)


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def qwen2_vl_dir(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    smollm_tokenizer_dir: Path,
) -> Path:
    out = tmp_path_factory.mktemp(f"tiny-qwen{request.param}-vl")
    return build_tiny_qwen2_vl(out, smollm_tokenizer_dir, request.param)


def reference(checkpoint: Path, messages: list[dict], images: list[bytes], n: int) -> list[int]:
    """transformers' greedy tokens for the chat through the checkpoint's own processor
    (AutoProcessor; Qwen2-VL's built for images only: no torchvision for its video part)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from hearth.engine.multimodal.processor import load_processor

    processor = load_processor(str(checkpoint))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    inputs = processor(
        text=[text], images=pictures or None, return_tensors="pt", add_special_tokens=False
    )
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def start_engine(checkpoint: Path):
    from hearth.engine.builder import build_engine
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import load_model
    from hearth.engine.loading.sources import resolve_source

    # 24-token steps: the prefill of an image prompt is split inside an image's 16 tokens
    settings = {"kv_cache_memory": "16MiB", "autotune": "off", "max_num_batched_tokens": 24}
    config = ModelConfig(id="v", source=str(checkpoint), device="cpu", engine=settings)
    return build_engine(load_model(config, resolve_source(config.source)))


@pytest.fixture(scope="module")
def engine(llava_dir: Path):
    built = start_engine(llava_dir)
    yield built
    built.shutdown()


@pytest.fixture(scope="module")
def qwen_engine(qwen2_vl_dir: Path):
    built = start_engine(qwen2_vl_dir)
    yield built
    built.shutdown()


def run(engine, messages: list[dict], images: list[bytes], n: int = 6) -> list[int]:
    [tokens] = run_together(engine, [(messages, images)], n)
    return tokens


def run_together(engine, prompts: list[tuple[list[dict], list[bytes]]], n: int) -> list[list[int]]:
    """Greedy tokens of each (messages, images), the requests batched together."""
    from hearth.engine.types import GenerationRequest, SamplingParams

    requests = []
    for i, (messages, images) in enumerate(prompts):
        if images:
            pictures = [ImageInput(b) for b in images]
            ids, mm = engine.encode_chat_mm(messages, None, None, pictures)
        else:  # what the server sends without images: the text path
            ids, mm = engine.encode_chat(messages), None
        requests.append(GenerationRequest(f"r{i}", ids, SamplingParams(n, temperature=0), mm))

    async def collect(request) -> list[int]:
        tokens: list[int] = []
        async for output in engine.generate(request):
            tokens += output.token_ids
        return tokens

    async def all_of() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(r) for r in requests)))

    return asyncio.run(all_of())


def test_two_images_match_transformers_generate(engine, llava_dir: Path) -> None:
    images = [png_bytes(40, 30, 1), png_bytes(50, 60, 2)]
    assert engine.info.vision
    assert run(engine, MESSAGES, images) == reference(llava_dir, MESSAGES, images, 6)


def test_qwen2_vl_mrope_matches_transformers_generate(qwen_engine, qwen2_vl_dir: Path) -> None:
    """3-D M-RoPE positions in chunked prefill, the rope offset in decode; 16 + 12 tokens."""
    images = [png_bytes(112, 112, 4), png_bytes(84, 112, 5)]
    assert qwen_engine.core.runner.vision.mrope
    _, mm = qwen_engine.encode_chat_mm(MESSAGES, None, None, [ImageInput(b) for b in images])
    assert [n for _, n in mm.spans] == [16, 12]
    expected = reference(qwen2_vl_dir, MESSAGES, images, 8)
    assert run(qwen_engine, MESSAGES, images, 8) == expected
    text_only = [{"role": "user", "content": "plain text on a vision model"}]
    assert run(qwen_engine, text_only, [], 4) == reference(qwen2_vl_dir, text_only, [], 4)
    # batched together: image rows with 3-D positions next to text rows and decodes
    together = run_together(qwen_engine, [(text_only, []), (MESSAGES, images)], 8)
    assert together == [reference(qwen2_vl_dir, text_only, [], 8), expected]


def test_prefix_cache_keys_blocks_by_image(engine, llava_dir: Path) -> None:
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}]
    first, second = png_bytes(32, 32, 7), png_bytes(32, 32, 8)
    hits = lambda: engine.stats().prefix_cache_hits  # noqa: E731
    encoder = engine.core.runner.vision
    before, encoded = hits(), encoder.num_encoded
    assert run(engine, one, [first]) == reference(llava_dir, one, [first], 6)
    assert hits() == before  # nothing cached yet
    assert encoder.num_encoded == encoded + 1
    assert run(engine, one, [first]) == reference(llava_dir, one, [first], 6)
    reused = hits() - before
    assert reused >= 16  # the image's blocks came from the cache
    assert encoder.num_encoded == encoded + 1  # and it was not encoded again
    assert run(engine, one, [second]) == reference(llava_dir, one, [second], 6)
    assert hits() - before == reused  # another image with the same placeholder ids: no hit
    assert encoder.num_encoded == encoded + 2


@pytest.fixture(scope="module")
def llava_server(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    path = tiny_config(tmp_path_factory.mktemp("cfg") / "models.yaml", llava_dir)
    with running_server(
        "--config",
        str(path),
        "--max-images-per-request",
        "2",
        "--max-image-pixels",
        "4000",
        "--max-image-size",
        "20000",
    ) as server:
        yield server


def _client(base: str):
    import openai

    return openai.OpenAI(base_url=base, api_key="none", max_retries=0)


@pytest.mark.slow
def test_openai_sdk_base64_image_equals_generate(llava_server, llava_dir: Path) -> None:
    base, _ = llava_server
    image = png_bytes(48, 36, 3)
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_url(image), "detail": "low"}},
    ]
    reply = _client(base).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=6,
        temperature=0,
    )
    template = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}
    ]
    expected = reference(llava_dir, template, [image], 6)
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(llava_dir).decode(expected, skip_special_tokens=True)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens > 16  # the image's 16 placeholder tokens are counted
    counted = httpx.post(
        base.removesuffix("/v1") + "/tokenize",
        json={"model": "tiny", "messages": [{"role": "user", "content": content}]},
    )
    assert counted.json()["count"] == reply.usage.prompt_tokens


@pytest.mark.slow
def test_limits_and_urls_are_400s_naming_the_part(llava_server) -> None:
    import openai

    base, _ = llava_server
    client = _client(base)
    part = {"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}

    def error(content: list) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2
            )
        return caught.value

    too_many = error([part, part, {"type": "text", "text": "x"}, part])
    assert too_many.body["param"] == "messages[0].content[3]"
    remote = error([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
    assert remote.body["param"] == "messages[0].content[0].image_url"
    assert "--allow-image-urls" in remote.body["message"]
    broken = error([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    assert broken.body["param"] == "messages[0].content[0].image_url"
    large = {"type": "image_url", "image_url": {"url": data_url(png_bytes(100, 50))}}
    pixels = error([{"type": "text", "text": "x"}, large])
    assert pixels.body["param"] == "messages[0].content[1].image_url"
    assert "100x50" in pixels.body["message"]
    heavy = {"type": "image_url", "image_url": {"url": data_url(png_bytes(100, 80))}}
    size = error([heavy])  # a random 100x80 PNG: about 24 kB
    assert size.body["param"] == "messages[0].content[0].image_url"
    assert "20000 bytes" in size.body["message"]
    audio = error([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
    assert audio.body["param"] == "messages[0].content[0]"


@pytest.mark.slow
def test_text_only_model_refuses_image_parts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import openai

    path = tiny_config(tmp_path / "models.yaml", tiny_llama_dir)
    with running_server("--config", str(path)) as (base, _):
        part = {"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}
        with pytest.raises(openai.BadRequestError) as caught:
            _client(base).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": [part]}], max_tokens=2
            )
        body = caught.value.body
        assert body["param"] == "messages[0].content[0]"
        assert "'image_url'" in body["message"] and "'tiny'" in body["message"]


@pytest.mark.slow
def test_responses_input_image_equals_generate(llava_server, llava_dir: Path) -> None:
    base, _ = llava_server
    image = png_bytes(40, 40, 9)
    response = _client(base).responses.create(
        model="tiny",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Describe"},
                    {"type": "input_image", "image_url": data_url(image), "detail": "auto"},
                ],
            }
        ],
        max_output_tokens=5,
        temperature=0,
    )
    template = [
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}
    ]
    from transformers import AutoTokenizer

    expected = reference(llava_dir, template, [image], 5)
    text = AutoTokenizer.from_pretrained(llava_dir).decode(expected, skip_special_tokens=True)
    assert response.output_text == text


def test_https_images_fetched_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """--allow-image-urls: fetched (a mock transport here), cut off above the byte limit."""
    from hearth.server import images as images_module
    from hearth.server.content import MediaPart
    from hearth.server.errors import APIError
    from hearth.server.settings import ServerSettings

    picture, large = png_bytes(16, 16), png_bytes(100, 80)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=large if "large" in request.url.path else picture)

    real_client = httpx.AsyncClient

    async def resolve(host: str, port: int) -> list[str]:
        return {"example.com": ["93.184.215.14"], "inside.test": ["10.0.0.7", "93.184.215.14"]}[
            host
        ]

    monkeypatch.setattr(images_module, "_addresses", resolve)
    monkeypatch.setattr(
        images_module.httpx,
        "AsyncClient",
        lambda **kw: real_client(transport=httpx.MockTransport(answer), **kw),
    )

    def part(url: str) -> list:
        return [MediaPart(type="image_url", image_url={"url": url})]

    def read(url: str, **settings) -> list:
        config = ServerSettings(**settings)
        return asyncio.run(images_module.read_images([part(url)], "m", "messages", config))[1]

    with pytest.raises(APIError) as refused:
        read("https://example.com/a.png")
    assert "--allow-image-urls" in refused.value.message
    [image] = read("https://example.com/a.png", allow_image_urls=True)
    assert image.data == picture
    with pytest.raises(APIError) as too_big:
        read("https://example.com/large.png", allow_image_urls=True, max_image_bytes=20000)
    assert too_big.value.param == "messages[0].content[0].image_url"
    with pytest.raises(APIError) as plain:
        read("http://example.com/a.png", allow_image_urls=True)
    assert "https://" in plain.value.message
    with pytest.raises(APIError) as private:  # any private address: not fetched at all
        read("https://inside.test/a.png", allow_image_urls=True)
    assert "not a public address" in private.value.message
