"""hearth's own forward for the Llama family: Llama (SmolLM2), Mistral, Qwen2, Qwen3.

It reads the weights of the loaded transformers model in place (nothing is copied): the fused
q/k/v and gate/up groups of kernels/fusion.py, with whatever projection kernels/patching.py
installed on them (the packed CPU matmul, GGUF blocks, fp8), and the paged attention of
kernels/attention.py called directly. What it saves over transformers' generic forward plus
hearth's patches is host time: no module calls, hooks, masks, kwargs plumbing, per-layer
transposes or rotary tables per step; about 15 torch ops per layer instead of ~140.

Numerics follow transformers' modeling_llama.py op for op (RMSNorm in float32 then the weight,
rotary as q*cos + rotate_half(q)*sin with the sign folded into the sin table, which is exact),
so float32 logits agree to the last bits of the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hearth.engine.kernels.attention import PagedBatch, attend

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # tables that do not depend on the length


def problem(model: nn.Module, tp_size: int = 1) -> str | None:
    """Why `model` cannot run on the own forward (then transformers' runs it), or None."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"architecture {kind!r} is not one of {', '.join(FAMILIES)}"
    if tp_size > 1:
        return "tensor parallelism (sharded weights)"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "an unexpected module layout"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "weights placed by device_map"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "an MLP other than SiLU-gated without bias"
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        return "no shared rotary module"
    rope = getattr(rotary, "rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r}"
    if type(inner.embed_tokens) is not nn.Embedding:
        return "a non-standard embedding"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn.q_proj, "_hearth_group", None) is None:
            return "q/k/v projections that are not fused"
        if getattr(mlp.gate_proj, "_hearth_group", None) is None:
            return "gate/up projections that are not fused"
    return None


class _Layer:
    """One decoder layer's weights and projections (references into the transformers model)."""

    def __init__(self, layer: nn.Module, heads: int, kv_heads: int, dim: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.index = attn.layer_idx
        self.scaling = attn.scaling
        self.in_norm = layer.input_layernorm.weight  # [hidden]
        self.in_eps = layer.input_layernorm.variance_epsilon
        self.post_norm = layer.post_attention_layernorm.weight  # [hidden]
        self.post_eps = layer.post_attention_layernorm.variance_epsilon
        self.qkv = attn.q_proj._hearth_group  # .project: x [T, hidden] -> [T, (H + 2Hkv) D]
        self.o_proj = attn.o_proj  # .forward: [T, H D] -> [T, hidden]
        self.gate_up = mlp.gate_proj._hearth_group  # .project: [T, hidden] -> [T, 2 I]
        self.down_proj = mlp.down_proj  # .forward: [T, I] -> [T, hidden]
        self.inter = mlp.gate_proj.out_features
        self.qk_norm: torch.Tensor | None = None  # Qwen3: [H + Hkv, D] per-head norm weights
        self.qk_eps = 0.0
        if hasattr(attn, "q_norm"):
            q_w, k_w = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()  # [D] each
            self.qk_norm = torch.cat([q_w.expand(heads, dim), k_w.expand(kv_heads, dim)])
            self.qk_eps = attn.q_norm.variance_epsilon


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: x [.., D] normalised in float32, cast back, times weight [D]
    (or [.., D] broadcastable). float32: torch's fused op, one dispatch instead of six (the
    same values: tests/engine/test_own_forward.py)."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == dtype and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()  # no copy in float32
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [.., D]
    return weight * h.to(dtype)


class LlamaForward:
    """The decoder stack of a Llama-family model over the paged KV cache, one packed row of
    tokens per step. `__call__(ids [T], positions [T], batch, keep [n]) -> logits [n, V]`."""

    def __init__(self, model: nn.Module, max_positions: int) -> None:
        """`model`: a loaded *ForCausalLM of FAMILIES for which `problem` is None, after
        kernels/patching.py's prepare_model (fused groups). `max_positions`: the rotary table's
        length (positions the engine may use)."""
        inner = model.model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.embed = inner.embed_tokens.weight  # [V, hidden]
        self.norm = inner.norm.weight  # [hidden]
        self.norm_eps = inner.norm.variance_epsilon
        self.lm_head = model.lm_head  # .forward: [n, hidden] -> [n, V]
        self.layers = [_Layer(layer, self.heads, self.kv_heads, self.dim) for layer in inner.layers]
        self.q_size, self.kv_size = self.heads * self.dim, self.kv_heads * self.dim
        self.cos, self.sin = self._rotary_tables(inner.rotary_emb, max_positions)

    @torch.no_grad()
    def _rotary_tables(self, rotary: nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [L, 1, D] and sin [L, 1, D] with rotate_half's sign folded in (first half
        negated), from the model's own rotary module: the same values it computes per step."""
        device = self.embed.device
        positions = torch.arange(length, device=device)[None]  # [1, L]
        probe = torch.zeros(1, device=device, dtype=self.embed.dtype)
        cos, sin = rotary(probe, positions)  # [1, L, D] each
        sin = sin[0].clone()  # [L, D]
        sin[:, : self.dim // 2].neg_()
        return cos[0][:, None].contiguous(), sin[:, None].contiguous()

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,  # [T] token ids
        positions: torch.Tensor,  # [T]
        batch: PagedBatch,
        keep: torch.Tensor,  # [n] rows whose logits are returned
    ) -> torch.Tensor:
        count = ids.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.dim
        half, qk_heads = dim // 2, heads + kv_heads
        cos, sin = self.cos[positions], self.sin[positions]  # [T, 1, D] each
        residual = F.embedding(ids, self.embed)  # [T, hidden]
        x = rms_norm(residual, self.layers[0].in_norm, self.layers[0].in_eps)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv.project(x)  # [T, (H + 2Hkv) D]
            qk = qkv[:, : self.q_size + self.kv_size].view(count, qk_heads, dim)  # [T, H+Hkv, D]
            if layer.qk_norm is not None:  # Qwen3: RMSNorm of each head before the rotary
                qk = rms_norm(qk, layer.qk_norm, layer.qk_eps)  # [T, H+Hkv, D] (new tensor)
            rotated = torch.cat((qk[..., half:], qk[..., :half]), -1).mul_(sin)  # [T, H+Hkv, D]
            qk.mul_(cos).add_(rotated)  # rotary in place
            q = qk[:, :heads]  # [T, H, D]
            k = qk[:, heads:]  # [T, Hkv, D]
            v = qkv[:, self.q_size + self.kv_size :].view(count, kv_heads, dim)  # [T, Hkv, D]
            out = attend(layer.index, q, k, v, batch, layer.scaling)  # [T, H, D]
            h = layer.o_proj.forward(out.reshape(count, self.q_size))  # [T, hidden]
            residual.add_(h)  # [T, hidden]
            x = rms_norm(residual, layer.post_norm, layer.post_eps)
            gate, up = layer.gate_up.project(x).split(layer.inter, -1)  # [T, I] each
            h = layer.down_proj.forward(F.silu(gate) * up)  # [T, hidden]
            residual.add_(h)
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1]
                x = rms_norm(residual, nxt.in_norm, nxt.in_eps)
        last = rms_norm(residual[keep], self.norm, self.norm_eps)  # [n, hidden]
        return self.lm_head.forward(last)  # [n, V]
