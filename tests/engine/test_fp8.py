"""fp8 weights on CPU: the quantization math, Fp8Linear's two paths (weight-only, and the
_scaled_mm path torch also runs on CPU), quantize_model + fusion + the engine, and the two
pre-quantized checkpoint formats read from tiny saved models."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import LoadError, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.quantization import fp8
from hearth.engine.quantization.fp8 import Fp8Linear, dequantize, quantize_model, quantize_weight
from tests.fixtures.server import ROOT

CPU = torch.device("cpu")


def rows_of_many_sizes(n: int = 48, k: int = 160) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-4, 2, n)[:, None]  # [N, K]
    w[3] = 0.0  # an all-zero row
    return w


def test_quantize_dequantize_round_trip_within_e4m3_rounding() -> None:
    w = rows_of_many_sizes()
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    back = dequantize(q, scale)
    assert back.dtype == torch.float32 and torch.equal(back[3], torch.zeros(w.shape[1]))
    # round to nearest with 3 mantissa bits: 2^-4 relative; subnormals: half of 2^-9 * scale
    bound = w.abs() * 2**-4 + scale[:, None] * 2**-10 + 1e-30
    assert ((back - w).abs() <= bound).all()
    nonzero = torch.arange(w.shape[0]) != 3
    assert torch.equal(q.float().abs().amax(1)[nonzero], torch.full((47,), 448.0))  # range used
    assert dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16
    again_q, again_scale = quantize_weight(back)  # fp8 values re-quantize to themselves
    assert torch.equal(dequantize(again_q, again_scale), back)


def test_block_scales_dequantize_block_by_block() -> None:
    gen = torch.Generator().manual_seed(1)
    n, k, bn, bk = 70, 100, 32, 48  # partial blocks on both edges
    q = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // bn), -(-k // bk), generator=gen) + 0.1  # [3, 3]
    got = dequantize(q, scale, block_size=(bn, bk))
    for i in range(n):
        for j in range(0, k, 7):
            assert got[i, j] == q[i, j].float() * scale[i // bn, j // bk]
    layer = Fp8Linear(q, scale, block_size=(bn, bk))
    x = torch.randn(5, k, generator=gen)
    assert torch.allclose(layer(x), F.linear(x, got), atol=1e-4)
    layer.per_channel()  # re-quantized per channel (what the fp8 matmul path needs)
    assert layer.block_size is None and layer.weight_scale.shape == (n,)
    assert ((layer.dequantized() - got).abs() <= got.abs() * 2**-4 + 1e-3).all()


def test_fp8_linear_weight_only_equals_linear_on_dequantized_weights() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(160, 48, bias=True)
    layer = Fp8Linear.from_linear(linear)
    assert not fp8.fast_path(CPU)
    x = torch.randn(2, 7, 160)  # [..., K]
    want = F.linear(x, layer.dequantized(), layer.bias)
    assert torch.equal(layer(x), want)
    xb = x.to(torch.bfloat16)
    got = layer(xb)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 7, 48)
    assert torch.allclose(got.float(), want, atol=0.1, rtol=0.02)
    assert layer.bytes() == 48 * 160 + 48 * 4
    before = layer.dequantized()
    layer.to(torch.bfloat16)  # a model-wide dtype cast leaves the fp8 weight and scales alone
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.dequantized(), before)


def test_scaled_mm_path_math_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp8-unit path (per-token activations, row-wise scales, column-major weight) is the
    one torch._scaled_mm also runs on CPU: its result is the product of the two
    dequantized operands, rounded to bf16."""
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(128, 64, bias=True))
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    x_q, x_scale = fp8.quantize_activation(x.reshape(-1, 128))
    assert x_scale.shape == (15, 1)
    want = F.linear(dequantize(x_q, x_scale[:, 0]), layer.dequantized()) + layer.bias
    monkeypatch.setitem(fp8._PATHS, CPU, fp8.quantize_activation)
    layer._probed = False
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 64)
    assert torch.allclose(got.float(), want.reshape(3, 5, 64), atol=0.05, rtol=0.01)
    weight_only = F.linear(x.float(), layer.dequantized(), layer.bias)
    rel = (got.float() - weight_only).abs().max() / weight_only.abs().max()
    assert rel < 0.1  # what fast_path's probe accepts


def tiny_llama(vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every Fp8Linear back to an nn.Linear of its dequantized weight."""
    import copy

    plain = copy.deepcopy(model)
    for name, layer in list(plain.named_modules()):
        if isinstance(layer, Fp8Linear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data = layer.dequantized()
            if layer.bias is not None:
                linear.bias.data = layer.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, linear)
    return plain


@torch.no_grad()
def test_quantize_model_on_a_layer_and_a_model_then_fusion() -> None:
    from hearth.engine.kernels.fusion import fuse_projections

    model = tiny_llama()
    ids = torch.randint(0, 512, (1, 12))
    before = model(ids).logits
    layer_bytes = quantize_model(model.model.layers[0])  # one decoder layer, as `dummy` does
    linears = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128  # q, o; k, v; gate, up, down
    assert layer_bytes == linears + 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert quantize_model(model) == 2 * layer_bytes
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[1].mlp.down_proj, Fp8Linear)
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    quantized = model(ids).logits
    reference = dequantized_copy(model)(ids).logits
    assert torch.allclose(quantized, reference, atol=1e-5)
    assert (quantized - before).abs().max() < 0.05  # e4m3 weights on a random model
    assert fuse_projections(model) == 4  # q/k/v and gate/up of both layers
    group = model.model.layers[0].self_attn.q_proj._hearth_group
    assert isinstance(group.project, Fp8Linear) and group.project.out_features == 128
    assert model.model.layers[0].self_attn.k_proj.weight.data_ptr() > group.weight.data_ptr()
    assert torch.allclose(model(ids).logits, quantized, atol=1e-5)


def write_tiny(out: Path, tiny_llama_dir: Path) -> Path:
    """A copy of the tiny checkpoint dir (tokenizer, config) without its weights."""
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


def save_prequantized(out: Path, tiny_llama_dir: Path, method: str) -> dict[str, Fp8Linear]:
    """The tiny Llama as a pre-quantized checkpoint: compressed-tensors FP8-dynamic (per-channel
    bf16 weight_scale [N, 1]) or transformers' fine-grained fp8 (block [32, 32],
    weight_scale_inv fp32). Returns the layers written, by module name."""
    from safetensors.torch import load_file, save_file

    write_tiny(out, tiny_llama_dir)
    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    layers = {}
    for name in [n for n in state if ".layers." in n and n.endswith("_proj.weight")]:
        module = name.removesuffix(".weight")
        w = state.pop(name).float()
        if method == "fp8":
            block = 32
            n, k = w.shape
            scale = torch.empty(-(-n // block), -(-k // block))
            q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
            for i in range(0, n, block):
                for j in range(0, k, block):
                    tile = w[i : i + block, j : j + block]
                    tile_q, tile_scale = quantize_weight(tile.reshape(1, -1))  # one scale a block
                    q[i : i + block, j : j + block] = tile_q.reshape(tile.shape)
                    scale[i // block, j // block] = tile_scale
            state[f"{module}.weight_scale_inv"] = scale
            layers[module] = Fp8Linear(q, scale, block_size=(block, block))
        else:
            q, scale = quantize_weight(w)
            state[f"{module}.weight_scale"] = scale.to(torch.bfloat16)[:, None]  # [N, 1]
            layers[module] = Fp8Linear(q, scale.to(torch.bfloat16).float())
        state[name] = q
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    if method == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [32, 32],
        }
    else:
        scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**scheme, "strategy": "channel"},
                    "input_activations": {**scheme, "strategy": "token", "dynamic": True},
                }
            },
            "ignore": ["lm_head"],
        }
    (out / "config.json").write_text(json.dumps(config))
    return layers


def load(path: Path, **fields):
    config = ModelConfig(id="t", source=str(path), device="cpu", **fields)
    return load_model(config, resolve_source(str(path)))


@pytest.mark.parametrize("method", ["compressed-tensors", "fp8"])
def test_prequantized_checkpoints_load_into_fp8_layers(
    tmp_path: Path, tiny_llama_dir: Path, method: str
) -> None:
    written = save_prequantized(tmp_path / method, tiny_llama_dir, method)
    loaded = load(tmp_path / method)
    model = loaded.model
    for name, want in written.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Fp8Linear), name
        assert torch.equal(layer.weight.view(torch.uint8), want.weight.view(torch.uint8))
        assert torch.equal(layer.weight_scale, want.weight_scale), name
        assert layer.block_size == want.block_size
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as saved
    assert model.lm_head.weight.dtype == torch.float32
    rotary = model.model.rotary_emb.inv_freq
    assert rotary.device.type == "cpu" and rotary.abs().sum() > 0
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for name, want in written.items():
        reference.get_submodule(name).weight.data = want.dequantized()
    ids = torch.randint(0, 49152, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    assert loaded.model.generation_config.eos_token_id == 2


def test_quantization_fp8_serves_a_plain_checkpoint_end_to_end(tiny_llama_dir: Path) -> None:
    """quantization: fp8 on CPU: weight-only fp8, the engine's greedy tokens equal generate()
    on the dequantized model (fusion and the engine's paged attention included)."""
    from hearth.engine.builder import build_engine
    from hearth.engine.types import GenerationRequest, SamplingParams

    loaded = load(tiny_llama_dir, quantization="fp8", engine={"kv_cache_memory": "16MiB"})
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert type(loaded.model.lm_head) is nn.Linear
    reference = dequantized_copy(loaded.model)
    engine = build_engine(loaded)
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300] * 4]

    async def run(prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(str(len(prompt)), prompt, params)):
            tokens += out.token_ids
        return tokens

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(run(p) for p in prompts))

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    for prompt, tokens in zip(prompts, got, strict=True):
        ref = reference.generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False
        )[0, len(prompt) :].tolist()
        assert tokens == ref


def test_names_not_the_models_fall_back_to_transformers_then_quantize(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hearth.engine.quantization import fp8_checkpoint

    def renamed(*_: object, **__: object) -> None:
        raise fp8_checkpoint.NameMismatch("no tensor for model.layers.0.mlp.up_proj.weight")

    monkeypatch.setattr(fp8_checkpoint, "load_streamed", renamed)
    model = load(tiny_llama_dir, quantization="fp8").model
    assert isinstance(model.model.layers[1].mlp.up_proj, Fp8Linear)
    assert type(model.lm_head) is nn.Linear


def test_refusals_are_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = tmp_path / "ct"
    save_prequantized(path, tiny_llama_dir, "compressed-tensors")
    with pytest.raises(LoadError, match="ships fp8 weights") as err:
        load(path, quantization="none")
    assert "\n" not in str(err.value)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="strategies") as err:
        load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(LoadError, match=r"quantization gguf: needs a \.gguf source"):
        load(tiny_llama_dir, quantization="gguf")


FP8_ENGINE_CHECK = """
import asyncio, sys, torch
from hearth.engine.quantization import fp8
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams
from hearth.engine.kernels.fp8_kernels import quantize_rows
quant, why = fp8._triton_quantizer(torch.device("cpu"))  # the probe CUDA devices get
assert quant is quantize_rows, why
fp8._PATHS[torch.device("cpu")] = quant  # the _scaled_mm path + Triton kernel, as on an H200
# autotune off: Triton 3.9's interpreter computes bf16 wrongly (fp32 is exact), which the
# autotune correctness gate rightly refuses; on a GPU the kernel is checked by gpu_smoke.
limits = {"kv_cache_memory": "16MiB", "decode_kernel": "triton", "cuda_graphs": True,
          "max_num_seqs": 8, "fused_kernels": True, "autotune": "off"}
config = ModelConfig(id="t", source=sys.argv[1], device="cpu", dtype="bfloat16",
                     quantization="fp8", engine=limits)
engine = build_engine(load_model(config, resolve_source(sys.argv[1])))
mlp = engine.core.runner.model.model.layers[0].mlp
assert "forward" in vars(mlp), "the fused MLP forward over the fp8 gate/up group"
async def run(prompt):
    tokens = []
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    async for out in engine.generate(GenerationRequest(str(len(prompt)), prompt, params)):
        tokens += out.token_ids
    return tokens
async def main():
    return await asyncio.gather(*(run(p) for p in ([5, 6, 7, 8], [42] * 11)))
got = asyncio.run(main())
engine.shutdown()
assert all(len(t) == 5 for t in got), got
print("fp8 engine ok")
"""


QUANT_KERNEL_CHECK = """
import torch
from hearth.engine.quantization.fp8 import quantize_activation
from hearth.engine.kernels.fp8_kernels import quantize_rows
torch.manual_seed(0)
ties = torch.tensor([448.0, 8.5, 9.5, 2**-10, 3 * 2**-10, 17.0, -0.0, -8.5, 0.3, -448.0])
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randn(6, 3000) * torch.logspace(-3, 3, 6)[:, None]).to(dtype)
    x[2] = 0.0
    x[3, ::7] = 1e-6
    for rows in (x, ties[None].to(dtype), x[:1, :5]):
        got_q, got_scale = quantize_rows(rows)
        want_q, want_scale = quantize_activation(rows)
        assert torch.equal(got_scale, want_scale), dtype
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)), (dtype, rows.shape)
print("quant kernel ok")
"""


def test_quantize_kernel_equals_torch_bit_for_bit() -> None:
    """The Triton input quantizer (interpreter) against torch's casts: random rows, zero rows,
    subnormals, ties on e4m3's grid (round half to even) and saturation."""
    pytest.importorskip("triton")
    from tests.engine.test_triton_attention import interpret

    assert "quant kernel ok" in interpret(QUANT_KERNEL_CHECK)


def test_quantize_kernel_compiles_for_hopper() -> None:
    """The kernel through Triton's CUDA compiler for sm_90 (no GPU needed; the interpreter
    accepts code the compiler refuses): IEEE division, e4m3 conversion with round to
    nearest."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget")
    from hearth.engine.kernels.fp8_kernels import _quant_rows_kernel

    signature = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32"}
    signature |= {"BLOCK": "constexpr", "DIV_RN": "constexpr"}
    source = ASTSource(_quant_rows_kernel, signature, constexprs={"BLOCK": 2048, "DIV_RN": True})
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except (RuntimeError, FileNotFoundError) as exc:  # no ptxas beside this Triton
        if "ptxas" not in str(exc):
            raise
        pytest.skip(f"no ptxas: {exc}")
    ptx = kernel.asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2" in ptx and "div.rn.f32" in ptx and "div.full" not in ptx


def test_engine_with_triton_kernels_and_the_scaled_mm_path(tiny_llama_dir: Path) -> None:
    """fp8 + the GPU configuration (Triton decode, graph buffers, fused norm/MLP kernels) in
    Triton's interpreter, the matmuls through torch._scaled_mm on CPU with the Triton input
    quantizer, chosen by the probe CUDA devices run."""
    pytest.importorskip("triton")
    from tests.engine.test_triton_attention import interpret

    assert "fp8 engine ok" in interpret(FP8_ENGINE_CHECK, str(tiny_llama_dir))


def test_fp8_check_small_runs_on_cpu() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "bench/fp8_check.py", "--small", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "greedy agreement" in result.stdout and "max abs" in result.stdout
