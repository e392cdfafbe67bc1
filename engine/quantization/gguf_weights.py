"""quantization: gguf: a GGUF source's own weight blocks, repacked for kernels/gguf_kernels.py.

The model itself is loaded as today (the cached float32 conversion, loading/gguf_cache.py); this
reads the GGUF file's Q4_1 / Q8_0 blocks of every linear layer (lm_head: `output`, else the tied
`token_embd`) and hangs them on the nn.Linear modules as `_hearth_blocks` (gguf_linear.py
routes small batches through them). transformers reverse-permutes Llama's q/k rows when it
converts (its LlamaTensorProcessor, undoing llama.cpp's convert_hf_to_gguf permute): the block
rows are permuted the same way, and every weight's first rows are checked bit-for-bit against
the float32 model (dequantized like ggml's dequantize_row_q4_1 / _q8_0) before it is used.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch
from torch import nn

from hearth.engine.kernels import gguf_kernels
from hearth.engine.kernels.gguf_kernels import BlockWeight
from hearth.engine.loading.gguf_file import GGUFFile, TensorInfo, read_gguf
from hearth.engine.quantization import gguf_block_cache

log = logging.getLogger("hearth.loader")

KINDS = {3: "q4_1", 8: "q8_0"}  # ggml type id -> the kernel's block kind
_BYTES = {"q4_1": (4, 16), "q8_0": (2, 32)}  # (scale bytes, quant bytes) per block of 32
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_NAMES = {  # Hugging Face projection -> GGUF tensor (gguf-py's TensorNameMap, Llama family)
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
# Rows of each weight compared with the float32 model at load: with the q/k permutation wrong,
# row 1 already differs (it swaps rows i and head_dim/2 + i within each head).
_CHECK_ROWS = 8


class GGUFQuantError(ValueError):
    """quantization gguf cannot be used for this model; the message is one line."""


def refusal(requested: str, source_kind: str, device: str, dtype: torch.dtype) -> str | None:
    """Why an explicit `gguf` cannot apply, known before loading (None: it may)."""
    if requested != "gguf":
        return None
    if source_kind != "gguf":
        return "needs a .gguf source (this one is a checkpoint directory or hub id)"
    if not device.startswith("cpu"):
        return f"runs on the CPU only (device {device})"
    if dtype != torch.float32:
        return f"computes in float32 (dtype {str(dtype).removeprefix('torch.')})"
    return gguf_kernels.problem()


def tensor_name(module_name: str, tensors: dict[str, TensorInfo]) -> str | None:
    """The GGUF tensor holding a linear module's weight, or None."""
    if module_name == "lm_head":
        return "output.weight" if "output.weight" in tensors else "token_embd.weight"
    match = _LAYER.match(module_name)
    if match is None or match[3] not in _NAMES:
        return None
    return f"blk.{match[1]}.{_NAMES[match[3]]}.weight"


def repack(raw: np.ndarray, kind: str, k: int) -> BlockWeight:
    """GGUF rows [N, K/32 * block bytes] (uint8) -> a BlockWeight (scales and quants apart)."""
    scale_bytes, quant_bytes = _BYTES[kind]
    n, nb = raw.shape[0], k // 32
    blocks = raw.reshape(n, nb, scale_bytes + quant_bytes)
    scales = np.ascontiguousarray(blocks[:, :, :scale_bytes]).view(np.int16).reshape(n, -1)
    qs = np.ascontiguousarray(blocks[:, :, scale_bytes:]).reshape(n, nb * quant_bytes)
    return BlockWeight(kind, torch.from_numpy(qs), torch.from_numpy(scales), n, k)


def dequantize(weight: BlockWeight, rows: slice = slice(None)) -> torch.Tensor:
    """The float32 weights [n, k] (or those rows), as ggml dequantizes them: d * q (+ m)."""
    qs = weight.qs[rows]
    n, nb = qs.shape[0], weight.k // 32
    scales = weight.scales[rows].view(torch.float16).float().view(n, nb, -1)  # [n, nb, 1 or 2]
    if weight.kind == "q4_1":
        packed = qs.view(n, nb, 16)
        q = torch.cat([packed & 15, packed >> 4], dim=-1).float()  # [n, nb, 32]
        return (scales[..., :1] * q + scales[..., 1:]).view(n, weight.k)
    q = qs.view(torch.int8).view(n, nb, 32).float()
    return (scales * q).view(n, weight.k)


def _llama_rows(raw: np.ndarray, heads: int) -> np.ndarray:
    """transformers' _reverse_permute_weights on whole rows: [N, B] -> [N, B]."""
    dim = raw.shape[0] // heads // 2
    return raw.reshape(heads, dim, 2, -1).swapaxes(1, 2).reshape(raw.shape)


def _blocks_for(
    module_name: str, weight: torch.Tensor, gguf: GGUFFile, name: str, heads: dict[str, int]
) -> BlockWeight:
    info = gguf.tensors[name]
    kind = KINDS[info.ggml_type]
    n, k = weight.shape
    raw = gguf.array(name)
    if raw.shape[0] != n or info.shape[0] != k:
        raise GGUFQuantError(f"{name} is {info.shape[::-1]}, {module_name} is {(n, k)}")
    candidates = [raw]
    for suffix, count in heads.items():
        if module_name.endswith(suffix) and n % (2 * count) == 0:
            candidates.insert(0, _llama_rows(raw, count))
    check = [*range(min(n, _CHECK_ROWS)), n - 1]  # the first rows and the last
    for candidate in candidates:
        rows = repack(np.ascontiguousarray(candidate[check]), kind, k)
        if torch.equal(dequantize(rows), weight[check]):
            return repack(np.ascontiguousarray(candidate), kind, k)
    raise GGUFQuantError(f"the blocks of {name} do not dequantize to {module_name}'s weights")


def _fits(model: nn.Module, entries: list[gguf_block_cache.Entry], linears: list[str]) -> bool:
    """Cached entries cover exactly these linear layers, and their first and last rows are
    the float32 weights."""
    modules = dict(model.named_modules())
    members = [(name, rows) for names, _ in entries for name, rows in names]
    if sorted(name for name, _ in members) != sorted(linears):
        return False
    if any(blocks.kind not in KINDS.values() for _, blocks in entries):
        return False
    for names, blocks in entries:
        start = 0
        for name, rows in names:
            weight = modules[name].weight.detach()
            for row in (start, start + rows - 1):
                one = BlockWeight(
                    blocks.kind, blocks.qs[row : row + 1], blocks.scales[row : row + 1], 1, blocks.k
                )
                if weight.shape != (rows, blocks.k) or not torch.equal(
                    dequantize(one)[0], weight[row - start]
                ):
                    return False
            start += rows
    return True


def _read_blocks(model: nn.Module, gguf_path: str, linears: list[str]) -> dict[str, BlockWeight]:
    """Every linear layer's blocks from the GGUF file; GGUFQuantError when one has none."""
    gguf = read_gguf(gguf_path)
    names = {name: tensor_name(name, gguf.tensors) for name in linears}
    for module_name, tensor in names.items():
        info = gguf.tensors.get(tensor) if tensor else None
        if info is None:
            raise GGUFQuantError(f"no GGUF tensor for {module_name}")
        if info.ggml_type not in KINDS:
            raise GGUFQuantError(f"{tensor} is {info.type_name} (kernels: Q4_1, Q8_0)")
    text = model.config.get_text_config()
    heads = {
        "q_proj": text.num_attention_heads,
        "k_proj": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
    }
    modules = dict(model.named_modules())
    return {
        name: _blocks_for(name, modules[name].weight.detach(), gguf, names[name], heads)
        for name in linears
    }


def attach(model: nn.Module, gguf_path: str, requested: str) -> str:
    """Hang each linear layer's GGUF blocks on it (from the block cache when it holds them);
    returns the quantization in effect ("gguf", or "none": auto where a layer's block type has
    no kernel). Raises GGUFQuantError when an explicit `gguf` cannot apply."""
    if requested not in ("auto", "gguf"):
        return "none"
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    try:
        if problem := gguf_kernels.problem():
            raise GGUFQuantError(problem)
        path = gguf_block_cache.cache_path(gguf_path)
        entries = gguf_block_cache.load(path)
        if entries is None or not _fits(model, entries, linears):
            entries = gguf_block_cache.group(model, _read_blocks(model, gguf_path, linears))
            gguf_block_cache.save(path, entries)
    except GGUFQuantError as exc:
        if requested == "gguf":
            raise
        log.info("quantization auto: float32 weights (%s)", exc)
        return "none"
    size = gguf_block_cache.hang(model, entries)
    model.hearth_quantization = "gguf"
    log.info("GGUF blocks of %d linear layers: %d MiB", len(linears), size >> 20)
    return "gguf"
