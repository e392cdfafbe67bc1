"""load_format dummy: random weights from a config dir, built layer by layer (fp8 per layer)."""

from __future__ import annotations

import asyncio
import sys
import types
from pathlib import Path

import pytest
import torch

from bench.shapes import write_checkpoint
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import LoadError, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    """config.json of bench's tiny Llama shape (tied embeddings) and SmolLM2's tokenizer."""
    return write_checkpoint("tiny", tmp_path_factory.mktemp("dummy") / "tiny", smollm_tokenizer_dir)


def load(path: Path, **values: object):
    config = ModelConfig(id="tiny", source=str(path), load_format="dummy", device="cpu", **values)
    return load_model(config, resolve_source(config.source))


def test_no_weights_in_the_dir(tiny_dir: Path) -> None:
    assert not list(tiny_dir.glob("*.safetensors"))


def test_random_weights_on_the_device_in_the_dtype(tiny_dir: Path) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    loaded = load(tiny_dir, dtype="bfloat16")
    model = loaded.model
    assert loaded.dtype == torch.bfloat16 and loaded.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    layer_norm = model.model.layers[1].input_layernorm.weight
    assert torch.equal(layer_norm, torch.ones_like(layer_norm))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: shared, not copied
    fresh = LlamaRotaryEmbedding(LlamaConfig.from_pretrained(tiny_dir))
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, fresh.inv_freq.to(rotary.inv_freq.dtype))
    assert torch.equal(rotary.original_inv_freq, fresh.original_inv_freq)
    assert loaded.tokenizer.chat_template  # the dir's tokenizer, as served


def test_greedy_decode_through_the_engine_matches_generate(tiny_dir: Path) -> None:
    loaded = load(tiny_dir, engine={"kv_cache_memory": "64MiB"})
    assert loaded.dtype == torch.float32
    prompt = [5, 17, 300, 4000, 12]
    engine = build_engine(loaded)

    async def run() -> list[int]:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        got: list[int] = []
        async for out in engine.generate(GenerationRequest("r", prompt, params)):
            got += out.token_ids
        return got

    try:
        got = asyncio.run(run())
    finally:
        engine.shutdown()
    from hearth.engine.kernels.fusion import restore_forwards

    restore_forwards(loaded.model)
    want = loaded.model.generate(
        torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert got == want


def test_fp8_quantizes_each_decoder_layer_as_it_is_built(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine.quantization.fp8.quantize_model (a stand-in here) gets each decoder layer once, in
    order, once it has its weights and while the layers after it have none yet; never lm_head."""
    import hearth.engine.loading.dummy as dummy

    found: list[torch.nn.ModuleList] = []
    calls: list[tuple[int, bool, bool]] = []  # (layer index, built, later layers still meta)

    def decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList | None:
        found.append(real(model, num_layers))
        return found[-1]

    def quantize_model(module: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
        layers = list(found[-1])
        index = layers.index(module)
        built = not any(p.is_meta for p in module.parameters())
        later = [p.is_meta for layer in layers[index + 1 :] for p in layer.parameters()]
        calls.append((index, built, all(later)))
        return sum(p.numel() for p in module.parameters())  # "one byte per weight"

    real = dummy.decoder_layers
    monkeypatch.setattr(dummy, "decoder_layers", decoder_layers)
    stand_in = types.SimpleNamespace(quantize_model=quantize_model)
    monkeypatch.setitem(sys.modules, "hearth.engine.quantization.fp8", stand_in)
    loaded = load(tiny_dir, quantization="fp8")
    count = len(loaded.model.model.layers)
    assert calls == [(i, True, True) for i in range(count)]
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_fp8_without_the_fp8_module_is_one_line(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules, "hearth.engine.quantization.fp8", None
    )  # import hearth.engine.quantization.fp8 -> ImportError
    with pytest.raises(LoadError, match="load_format dummy: quantization fp8 is not available"):
        load(tiny_dir, quantization="fp8")


def test_dummy_refuses_a_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(LoadError, match="needs a checkpoint directory"):
        load(gguf)


def test_cli_overrides_load_format_and_gpu_memory_utilization(tiny_dir: Path) -> None:
    from hearth.cli import build_parser, select_models

    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(tiny_dir),
            "--load-format",
            "dummy",
            "--gpu-memory-utilization",
            "0.97",
        ]
    )
    [model] = select_models(args).models
    assert model.load_format == "dummy" and model.engine.gpu_memory_utilization == 0.97
