"""Which kernels a model runs with: the choices, what can run where, and a launch probe.

Four knobs (EngineSettings): decode attention (`triton` and `cpu` read the paged cache in place,
`sdpa` gathers blocks), CUDA graphs, fused Triton norm/MLP kernels, and the C++ CPU matmul over
packed weights, plus, on CPU, the torch thread count. `candidates` lists every combination
`auto` may pick on the model's devices (explicit settings fixed); kernels/autotune.py times them
on the model's own shapes and picks the fastest correct one. `choose_kernels` is the choice
made without measuring (autotune off, tensor parallelism). The runner starts from
`startup_kernels` (that choice, launch-probed) and, when autotune runs, times
`tuning_candidates`.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from hearth.engine.config import EngineSettings
from hearth.engine.kv_cache import KVCacheSpec

log = logging.getLogger("hearth.engine")


class Kernels(NamedTuple):
    decode: str  # decode attention: "triton" or "cpu" (paged cache in place), "sdpa" (gather)
    graphs: bool  # CUDA graphs for pure decode steps
    fused: bool  # Triton RMSNorm and SiLU * up
    cpu_matmul: bool = False  # C++ matmul over packed weights (CPU, float32)
    cpu_variant: str | None = None  # the C++ kernels' ISA build (avx512, avx2); None: default
    threads: int = 0  # torch intra-op threads (CPU); 0: leave as configured
    # small batches on a GGUF source's own blocks (engine/quantization/gguf_linear.py)
    gguf: bool = False

    def describe(self) -> str:
        """e.g. 'decode attention cpu (avx2), CUDA graphs off, fused kernels off, CPU matmul on
        (avx2), 2 threads'."""
        isa = f" ({self.cpu_variant})" if self.cpu_variant else ""
        text = (
            f"decode attention {self.decode}{isa if self.decode == 'cpu' else ''}, "
            f"CUDA graphs {'on' if self.graphs else 'off'}, "
            f"fused kernels {'on' if self.fused else 'off'}, "
            f"CPU matmul {'on' + isa if self.cpu_matmul else 'off'}"
        )
        text += ", GGUF blocks at small batches" if self.gguf else ""
        return text + (f", {self.threads} threads" if self.threads else "")


def _placement(devices: set[torch.device]) -> tuple[bool, bool, bool]:
    """(all on CUDA, on exactly one CUDA device, all on CPU)."""
    cuda = all(device.type == "cuda" for device in devices)
    return cuda, cuda and len(devices) == 1, all(device.type == "cpu" for device in devices)


def _triton_runnable(cuda: bool) -> bool:
    """Triton kernels need CUDA tensors, unless Triton's CPU interpreter runs them (tests)."""
    return cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_kernels(
    settings: EngineSettings, devices: set[torch.device], head_dim: int, tp_size: int = 1
) -> Kernels:
    """The choice without measuring: what settings ask for, with `auto`/unset choosing the Triton
    kernels and CUDA graphs on one CUDA device (per rank under tensor parallelism) and
    PyTorch's own paths elsewhere (SDPA, and MKL on CPU): device_map over several GPUs, no
    Triton, the CPU. Raises ValueError for an explicit choice that cannot run."""
    cuda, one_gpu, on_cpu = _placement(devices)
    runnable = _triton_runnable(cuda)
    kernel = settings.decode_kernel
    if kernel == "auto":
        usable = one_gpu and _has_triton()
        kernel = (
            "triton" if usable and _triton_shape_problem(settings, head_dim) is None else "sdpa"
        )
    elif kernel == "cpu" and not on_cpu:
        raise ValueError("decode_kernel cpu needs the model on the CPU")
    elif kernel == "triton":
        if not runnable:
            raise ValueError("decode_kernel triton needs CUDA")
        if problem := _triton_shape_problem(settings, head_dim):
            raise ValueError(problem)
    graphs = settings.cuda_graphs
    if graphs is None:  # not under tensor parallelism: captures there are unverified
        graphs = kernel == "triton" and one_gpu and tp_size == 1
    if graphs and kernel != "triton":
        raise ValueError(
            "cuda_graphs needs the triton decode kernel, which cannot run here (CUDA and Triton)"
        )
    fused = settings.fused_kernels
    if fused is None:  # the fused MLP needs gate and up fused, which TP leaves split
        fused = kernel == "triton" and one_gpu and tp_size == 1
    elif fused and (not runnable or tp_size > 1):
        raise ValueError("fused_kernels needs CUDA and tensor_parallel_size 1")
    cpu_matmul = settings.cpu_matmul
    if cpu_matmul is None:
        cpu_matmul = False
    elif cpu_matmul and (not on_cpu or tp_size > 1):
        raise ValueError("cpu_matmul needs the model on the CPU and tensor_parallel_size 1")
    return Kernels(kernel, graphs, fused, cpu_matmul)


def candidates(
    settings: EngineSettings,
    devices: set[torch.device],
    head_dim: int,
    dtype: torch.dtype,
    cpu_variants: list[str],
) -> list[Kernels]:
    """Every kernel combination `auto` may pick on these devices (one process, no tensor
    parallelism), explicit settings held fixed; the PyTorch path first where it is allowed.
    `cpu_variants`: the C++ kernels' builds this CPU runs (kernels/cpu_kernels.py). Threads are
    left at 0 (autotune tries thread counts on the winner). Raises ValueError as
    choose_kernels does for explicit choices that cannot run."""
    static = choose_kernels(settings, devices, head_dim)  # validates the explicit choices
    _, one_gpu, on_cpu = _placement(devices)
    triton_ok = one_gpu and _has_triton() and _triton_shape_problem(settings, head_dim) is None
    cpu_ok = on_cpu and dtype == torch.float32 and bool(cpu_variants)
    if settings.decode_kernel != "auto":
        decodes = [settings.decode_kernel]
    else:
        decodes = ["sdpa"] + (["triton"] if triton_ok else []) + (["cpu"] if cpu_ok else [])
    fused_opts = _options(settings.fused_kernels, one_gpu and _has_triton())
    matmul_opts = _options(settings.cpu_matmul, cpu_ok)
    out: list[Kernels] = []
    for decode, fused, matmul in itertools.product(decodes, fused_opts, matmul_opts):
        graph_opts = _options(settings.cuda_graphs, decode == "triton" and one_gpu)
        uses_cpu = decode == "cpu" or matmul
        variants: list[str | None] = list(cpu_variants) if uses_cpu else [None]
        for graphs, variant in itertools.product(graph_opts, variants):
            if graphs and decode != "triton":  # graphs asked for by name need the Triton kernel
                continue
            out.append(Kernels(decode, graphs, fused, matmul, variant))
    if not out:  # explicit settings that no candidate satisfies: the static choice
        out = [static]
    # Candidates that patch the model alike side by side: switching between them is free.
    return sorted(out, key=lambda k: (k.fused, k.cpu_matmul, k.cpu_variant or ""))


def usable_cpu_variants(dtype: torch.dtype, on_cpu: bool) -> list[str | None]:
    """The C++ kernels' builds this CPU can run (none for other dtypes or devices); logs a
    warning when a float32 CPU model can run none of them."""
    if not on_cpu or dtype != torch.float32:
        return []
    from hearth.engine.kernels import cpu_kernels

    usable = [v for v in cpu_kernels.variants() if cpu_kernels.problem(v) is None]
    if not usable:
        log.warning("the CPU kernels are not used: %s", cpu_kernels.problem())
    # generic (no AVX2) is the fallback for CPUs without AVX2: not worth timing beside them
    return [v for v in usable if v != "generic"] or usable


def tuning_candidates(
    settings: EngineSettings, devices: list[torch.device], spec: KVCacheSpec, gguf: bool
) -> list[Kernels]:
    """`candidates` for a model whose attention layers sit on `devices` (one per layer), with
    the C++ builds this CPU runs; `gguf`: each routes a GGUF source's layers to its blocks.
    Raises ValueError as choose_kernels does."""
    on_cpu = all(d.type == "cpu" for d in devices)
    variants = usable_cpu_variants(spec.dtype, on_cpu)
    cands = candidates(settings, set(devices), spec.head_dim, spec.dtype, variants)
    return [c._replace(gguf=gguf) for c in cands]


def _options(setting: bool | None, possible: bool) -> list[bool]:
    """The values an on/off knob may take: the explicit one, else off and (if possible) on."""
    if setting is not None:
        return [setting]
    return [False, True] if possible else [False]


class Shapes:
    """The sizes the kernels see on this rank."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, hidden: int) -> None:
        self.heads, self.kv_heads, self.head_dim, self.hidden = heads, kv_heads, head_dim, hidden


def startup_kernels(
    model: PreTrainedModel,
    settings: EngineSettings,
    devices: list[torch.device],
    spec: KVCacheSpec,
    tp_size: int = 1,
) -> Kernels:
    """The choice before any measuring: `choose_kernels` for the layers' `devices`, then
    `probe` on the model's shapes on this rank, plus GGUF block routing at small batches for a
    GGUF source (engine/quantization/gguf_weights.py; not under tensor parallelism). Raises
    ValueError for explicit settings that cannot run here."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads // tp_size
    shapes = Shapes(heads, spec.num_kv_heads, spec.head_dim, cfg.hidden_size)
    kernels = choose_kernels(settings, set(devices), spec.head_dim, tp_size)
    kernels = probe(kernels, settings, next(model.parameters()).device, spec.dtype, shapes)
    gguf = getattr(model, "hearth_quantization", None) == "gguf" and tp_size == 1
    return kernels._replace(gguf=gguf)


def probe(
    kernels: Kernels,
    settings: EngineSettings,
    device: torch.device,
    dtype: torch.dtype,
    shape: Shapes,
) -> Kernels:
    """Launch each kernel that `auto` chose once, on tiny inputs of the model's shapes: one that
    cannot run here (too little shared memory, an old GPU, no C++ compiler, a dtype other than
    float32 for the CPU kernels) gives way to the PyTorch path, with a warning. Explicit
    choices that cannot run raise ValueError (or the launch's own error)."""
    if kernels.decode == "cpu" or kernels.cpu_matmul:
        from hearth.engine.kernels import cpu_kernels

        problem = "they compute in float32 only" if dtype != torch.float32 else None
        problem = problem or cpu_kernels.problem()
        if problem is not None:
            for name, value in (("decode_kernel", "cpu"), ("cpu_matmul", True)):
                if getattr(settings, name) == value:
                    raise ValueError(f"{name}: the CPU kernels cannot run: {problem}")
            level = logging.INFO if dtype != torch.float32 else logging.WARNING
            log.log(level, "the CPU kernels are not used: %s", problem)
            kernels = kernels._replace(decode="sdpa", cpu_matmul=False, cpu_variant=None)
    if kernels.decode == "triton" and settings.decode_kernel == "auto":
        try:
            from hearth.engine.kernels.triton_attention import paged_decode

            q = torch.randn(1, shape.heads, shape.head_dim, device=device).to(dtype)  # [1, H, D]
            kv = torch.randn(1, settings.block_size, shape.kv_heads, shape.head_dim, device=device)
            kv = kv.to(dtype)  # [1, bs, Hkv, D]
            ones = torch.ones(1, 1, dtype=torch.int32, device=device)
            paged_decode(q, kv, kv, ones - 1, ones[0], 1.0)
            _sync(device)
        except Exception as exc:
            if settings.cuda_graphs:
                raise
            log.warning("the Triton decode kernel cannot run here, using SDPA: %s", exc)
            kernels = kernels._replace(decode="sdpa", graphs=False)
    if kernels.fused and settings.fused_kernels is None:
        try:
            from hearth.engine.kernels.fused_ops import rms_norm, silu_mul

            hidden = torch.randn(1, shape.hidden, device=device).to(dtype)  # [1, hidden]
            rms_norm(hidden, hidden[0], 1e-6)
            silu_mul(torch.randn(1, 2048, device=device).to(dtype))
            _sync(device)
        except Exception as exc:
            log.warning("the fused Triton kernels cannot run here: %s", exc)
            kernels = kernels._replace(fused=False)
    return kernels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a failed launch surfaces here at the latest


def _triton_shape_problem(settings: EngineSettings, head_dim: int) -> str | None:
    from hearth.engine.kernels.triton_attention import shape_problem

    return shape_problem(settings.block_size, head_dim)
