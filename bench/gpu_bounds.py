"""The hardware's own bounds for a decoder's workload, printed beside each GPU figure.

Compute bound of N x P/O (prompt P, output O tokens each): every request costs
    2 x (decoder linear weights) x (P + O)        the projections, every token
  + 2 x (lm_head weights) x (1 + O)               logits: the last prompt token and each output
  + 4 x layers x heads x head_dim x sum(context)  QK^T and PV (causal: context 1 .. P + O - 1)
FLOPs; at a measured matmul rate R (FLOP/s), N requests take at least N x FLOPs / R seconds, so
output tok/s <= O x R / FLOPs. (An 8B request of 1024/128: ~16.6 TFLOP; the often-quoted 2 x
params x tokens, 18.5 TFLOP, also counts the embedding table and the prompt's logits.)

Bandwidth bound of batch-1 decode: each step reads every weight byte and its KV, so tok/s <=
bandwidth / (weight bytes + KV bytes of the mean context).

    python bench/gpu_bounds.py [--shape llama-3.1-8b] [--rate 790e12]    # the figures, no GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*


def decoder_linear_params(shape: dict) -> int:
    """Weights of a Llama-style decoder's projections (q, k, v, o, gate, up, down), all layers."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    q = o = hidden * shape["num_attention_heads"] * head_dim
    kv = 2 * hidden * shape["num_key_value_heads"] * head_dim
    return shape["num_hidden_layers"] * (q + kv + o + 3 * hidden * inter)


def request_flops(shape: dict, prompt: int, output: int) -> dict[str, float]:
    """FLOPs of one request of `prompt` + `output` tokens (see the module docstring), by part:
    {"linear", "lm_head", "attention"}."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    tokens = prompt + output
    contexts = tokens * (tokens - 1) / 2  # token t attends to t earlier ones (and itself)
    return {
        "linear": 2.0 * decoder_linear_params(shape) * tokens,
        "lm_head": 2.0 * shape["vocab_size"] * shape["hidden_size"] * (1 + output),
        "attention": 4.0
        * shape["num_hidden_layers"]
        * shape["num_attention_heads"]
        * head_dim
        * (contexts + tokens),
    }


def compute_bound_tok_s(
    shape: dict, prompt: int, output: int, rate: float, linear_rate: float | None = None
) -> float:
    """Output tok/s no engine can pass at matmul rate `rate` (FLOP/s); `linear_rate`: the
    projections' rate where they run another dtype (fp8), the rest at `rate`."""
    parts = request_flops(shape, prompt, output)
    rest = parts["lm_head"] + parts["attention"]
    seconds = parts["linear"] / (linear_rate or rate) + rest / rate
    return output / seconds


def bandwidth_bound_tok_s(bandwidth: float, weight_bytes: int, kv_bytes: int) -> float:
    """Batch-1 decode tok/s at `bandwidth` bytes/s reading every weight and the KV once."""
    return bandwidth / (weight_bytes + kv_bytes)


def matmul_rate(device: str, dtype: str = "bf16", n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on `device` (random data; mean of `repeats` after
    three warm-ups). dtype "bf16", "fp32", or "fp8": torch._scaled_mm on e4m3 inputs (bf16
    output)."""
    import torch

    kind = torch.float32 if dtype == "fp32" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=kind)
    b = torch.randn(n, n, device=device, dtype=kind)
    if dtype == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)

        def product():
            return torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)
    else:

        def product():
            return a @ b

    for _ in range(3):
        product()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        product()
    sync()
    return 2.0 * n**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    from bench.engine_bench import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--rate", type=float, default=790e12, help="bf16 matmul FLOP/s")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    parts = request_flops(shape, args.prompt, args.output)
    print(
        f"{args.shape} {args.prompt}/{args.output}: {sum(parts.values()) / 1e12:.2f} TFLOP a "
        f"request ({', '.join(f'{k} {v / 1e12:.2f}' for k, v in parts.items())}); at "
        f"{args.rate / 1e12:.0f} TFLOP/s: <= "
        f"{compute_bound_tok_s(shape, args.prompt, args.output, args.rate):.0f} output tok/s"
    )


if __name__ == "__main__":
    main()
