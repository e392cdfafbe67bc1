"""A tiny random Llama written as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does:
Q4_1 linear layers (q/k rows permuted for its rotary layout), a Q8_0 tied token_embd, F32
norms, SmolLM2's tokenizer. Deterministic bytes, so hearth's conversion cache keys it once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPE = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of q or k)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tokenizer_fields(writer, tokenizer_dir: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if template:
        writer.add_chat_template(template)


def write_tiny_gguf(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, quants
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPE, tie_word_embeddings=True)
    state = LlamaForCausalLM(config).state_dict()
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(SHAPE["num_hidden_layers"])
    writer.add_context_length(SHAPE["max_position_embeddings"])
    writer.add_embedding_length(SHAPE["hidden_size"])
    writer.add_feed_forward_length(SHAPE["intermediate_size"])
    writer.add_head_count(SHAPE["num_attention_heads"])
    writer.add_head_count_kv(SHAPE["num_key_value_heads"])
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(SHAPE["vocab_size"])
    writer.add_rope_dimension_count(SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    _tokenizer_fields(writer, tokenizer_dir)

    def add(name: str, tensor: torch.Tensor, kind: GGMLQuantizationType) -> None:
        array = tensor.detach().float().numpy()
        if kind != GGMLQuantizationType.F32:
            array = quants.quantize(array, kind)
        writer.add_tensor(name, array, raw_dtype=kind)

    add("token_embd.weight", state["model.embed_tokens.weight"], GGMLQuantizationType.Q8_0)
    add("output_norm.weight", state["model.norm.weight"], GGMLQuantizationType.F32)
    for layer in range(SHAPE["num_hidden_layers"]):
        for hf, name in _NAMES.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if weight.dim() == 1:
                add(f"blk.{layer}.{name}.weight", weight, GGMLQuantizationType.F32)
                continue
            if name == "attn_q":
                weight = torch.from_numpy(_permute(weight.numpy(), SHAPE["num_attention_heads"]))
            elif name == "attn_k":
                weight = torch.from_numpy(_permute(weight.numpy(), SHAPE["num_key_value_heads"]))
            add(f"blk.{layer}.{name}.weight", weight, GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
