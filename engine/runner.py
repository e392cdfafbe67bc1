"""Runs one scheduled step through the model: packs tokens, owns the paged KV cache tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from hearth.engine import distributed
from hearth.engine.config import EngineSettings
from hearth.engine.kernels import autotune
from hearth.engine.kernels.attention import PagedBatch, Prefill, register
from hearth.engine.kernels.cuda_graphs import DecodeGraphs, GraphCaptureError
from hearth.engine.kernels.fusion import fuse_projections, reattach_groups, restore_forwards
from hearth.engine.kernels.selection import Kernels, Shapes, candidates, choose_kernels, probe
from hearth.engine.scheduler import Scheduled
from transformers import PreTrainedModel

__all__ = ["Kernels", "ModelRunner", "StepInputs", "choose_kernels", "kv_bytes_per_token"]

log = logging.getLogger("hearth.engine")


def kv_shape(model: PreTrainedModel, tp_size: int = 1) -> tuple[int, int, int]:
    """(layers, KV heads on this rank, head dim) of a decoder-only model."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if kv_heads % tp_size:
        raise ValueError(f"{kv_heads} KV heads cannot be split over {tp_size} ranks")
    return cfg.num_hidden_layers, kv_heads // tp_size, head_dim


def kv_bytes_per_token(model: PreTrainedModel, dtype: torch.dtype, tp_size: int = 1) -> int:
    layers, kv_heads, head_dim = kv_shape(model, tp_size)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


@dataclass
class StepInputs:
    """One step's packed tokens and cache addressing (plain lists: cheap to send to other ranks)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int] | None]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)


def _layer_devices(model: PreTrainedModel, num_layers: int) -> list[torch.device]:
    """The device of each attention layer (they differ under device_map)."""
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx not in devices:
            param = next(module.parameters(), None)
            if param is not None:
                devices[idx] = param.device
    fallback = next(model.parameters()).device
    return [devices.get(i, fallback) for i in range(num_layers)]


def _cpu_variants(dtype: torch.dtype, on_cpu: bool) -> list[str | None]:
    """The C++ kernels' builds this CPU can run (none for other dtypes or devices)."""
    if not on_cpu or dtype != torch.float32:
        return []
    from hearth.engine.kernels import cpu_kernels

    usable = [v for v in cpu_kernels.variants() if cpu_kernels.problem(v) is None]
    if not usable:
        log.warning("the CPU kernels are not used: %s", cpu_kernels.problem())
    # generic (no AVX2) is the fallback for CPUs without AVX2: not worth timing beside them
    return [v for v in usable if v != "generic"] or usable


class ModelRunner:
    """Owns the KV cache and runs steps. Under tensor parallelism rank 0 (the engine's) sends
    each step's inputs to the other ranks, which run the same forward in `follow()`.

    Start-up, in order: fuse projections, choose kernels (`choose_kernels` + `probe`, then
    engine/kernels/autotune.py's measured choice unless autotune is off), allocate the KV cache,
    apply the kernels (patch forwards, pack weights, capture CUDA graphs)."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        dtype: torch.dtype,
        settings: EngineSettings,
        max_model_len: int,
        tp_size: int = 1,
    ) -> None:
        name = register()
        try:
            model.set_attn_implementation(name)
        except (ValueError, AttributeError):  # older transformers: set the config directly
            model.config._attn_implementation = name
        if tp_size == 1:  # sharded (DTensor) weights stay as transformers split them
            fuse_projections(model)  # one matmul for q/k/v and for gate/up: ~8% faster CPU decode
            if next(model.parameters()).is_cuda:  # the unfused weights' blocks, before the KV
                torch.cuda.empty_cache()  # cache and graph pools (a 70B bf16 leaves little)
        self.model, self.dtype, self.settings = model, dtype, settings
        self.tp_size = tp_size
        self.num_blocks = num_blocks
        self.block_size = settings.block_size
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        self.graphs: DecodeGraphs | None = None
        self.kernels: Kernels | None = None  # what the model's forwards are patched for
        self.decode_kernel, self.cpu_variant = "sdpa", None
        layers, kv_heads, head_dim = kv_shape(model, tp_size)
        devices = _layer_devices(model, layers)
        cfg = model.config.get_text_config()
        shapes = Shapes(cfg.num_attention_heads // tp_size, kv_heads, head_dim, cfg.hidden_size)
        kernels = choose_kernels(settings, set(devices), head_dim, tp_size)
        kernels = probe(kernels, settings, self.device, dtype, shapes)
        # A GGUF source's own blocks (quantization/gguf_weights.py) at small batches
        gguf = getattr(model, "hearth_quantization", None) == "gguf" and tp_size == 1
        kernels = kernels._replace(gguf=gguf)
        self.allocate_kv_cache(devices, kv_heads, head_dim)
        if settings.autotune != "off" and tp_size == 1:
            on_cpu = all(d.type == "cpu" for d in devices)
            cands = candidates(
                settings, set(devices), head_dim, dtype, _cpu_variants(dtype, on_cpu)
            )
            cands = [c._replace(gguf=gguf) for c in cands]
            kernels = autotune.select(self, settings, cands, max_model_len)
        self.kernels = self.apply(kernels, log_packing=True)

    def allocate_kv_cache(self, devices: list[torch.device], kv_heads: int, head_dim: int) -> None:
        """Per layer K and V blocks on the layer's device, plus one scratch block that CUDA
        graphs' padding rows write to. Zeroed: padded slots are masked out, but NaN garbage
        times a zero weight is still NaN."""
        shape = (self.num_blocks + 1, self.block_size, kv_heads, head_dim)
        self.k_cache = [
            torch.zeros(shape, dtype=self.dtype, device=d) for d in devices
        ]  # per layer [num_blocks + 1, block_size, Hkv, D]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]

    def apply(
        self, kernels: Kernels, graph_sizes: list[int] | None = None, log_packing: bool = False
    ) -> Kernels:
        """Switch the model to `kernels` (from whatever it ran before): forwards patched or
        restored, weights packed for the CPU matmul, CUDA graphs captured for `graph_sizes`
        (default: every bucket). Returns what was applied: packing that does not fit in memory
        and a failed capture of graphs that were not asked for by name fall back (logged)."""
        self.graphs = None
        patched = (kernels.fused, kernels.cpu_matmul, kernels.cpu_variant, kernels.gguf)
        current = self.kernels
        if current is None or (*current[2:5], current.gguf) != patched:
            kernels = self._patch(kernels, log_packing)
        if kernels.threads:
            torch.set_num_threads(kernels.threads)
        self.decode_kernel, self.cpu_variant = kernels.decode, kernels.cpu_variant
        if kernels.graphs:
            max_blocks = -(-self.max_model_len // self.block_size)
            try:
                self.graphs = DecodeGraphs(
                    self._run_model,
                    self.k_cache,
                    self.v_cache,
                    self.settings.max_num_seqs,
                    max_blocks,
                    scratch_block=self.num_blocks,
                    sizes=graph_sizes,
                )
            except GraphCaptureError as exc:  # a model whose forward cannot be captured
                if self.settings.cuda_graphs:  # asked for by name: say so at startup
                    raise
                log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
                kernels = kernels._replace(graphs=False)
        self.kernels = kernels
        return kernels

    def _patch(self, kernels: Kernels, log_packing: bool) -> Kernels:
        """The model's forwards for `kernels`: restored, then fused kernels patched in and the
        weights packed for the CPU matmul (off when the copies would not fit)."""
        self.kernels = None
        restore_forwards(self.model)
        reattach_groups(self.model)
        if kernels.fused:
            from hearth.engine.kernels.fused_ops import patch_model

            patch_model(self.model)
        if kernels.cpu_matmul:
            from hearth.engine.kernels.cpu_linear import pack_model

            if packed := pack_model(self.model, variant=kernels.cpu_variant):
                if log_packing:
                    log.info("packed %d MiB of linear weights for the CPU matmul", packed >> 20)
            else:
                kernels = kernels._replace(cpu_matmul=False)
        if kernels.gguf:  # after the packing: above its row limit a layer runs what it had
            from hearth.engine.quantization.gguf_linear import route_model

            routed = route_model(self.model)
            if log_packing:
                log.info("small batches on %d MiB of GGUF blocks", routed >> 20)
        return kernels

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fill_kv(self, seed: int | None, blocks: int = 0) -> None:
        """The first `blocks` cache blocks of every layer filled with the same seeded normal
        values (autotune compares candidates' logits over a cache that is not all zeros), or
        every block zeroed again (seed None)."""
        if seed is None:
            for tensor in (*self.k_cache, *self.v_cache):
                tensor.zero_()
            return
        first = self.k_cache[0]
        generator = torch.Generator(device=first.device).manual_seed(seed)
        shape = (min(blocks, first.shape[0]), *first.shape[1:])  # [blocks, bs, Hkv, D]
        values = torch.randn(shape, generator=generator, device=first.device)
        for tensor in (*self.k_cache, *self.v_cache):
            tensor[: shape[0]].copy_(values.to(tensor.device, tensor.dtype))

    def timing_step(self, load: autotune.Workload) -> StepInputs:
        """A step of `load`'s shape over cache blocks no request owns yet: decode row i attends
        to blocks [i * nb, (i + 1) * nb); the prefill writes the last blocks of the cache."""
        bs, vocab = self.block_size, self.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(load.batch * 100_003 + load.context)
        ids = torch.randint(vocab, (load.batch * load.context,), generator=generator)
        step = StepInputs()
        if load.prefill:
            first = self.num_blocks - -(-load.context // bs)
            table = list(range(first, self.num_blocks))
            step.input_ids = ids[: load.context].tolist()
            step.positions = list(range(load.context))
            step.slot_mapping = self._slots(table, 0, load.context)
            step.prefills = [(0, load.context, load.context, None)]
            step.sample_rows = [load.context - 1]
            return step
        nb = -(-load.context // bs)
        for row in range(load.batch):
            table = list(range(row * nb, (row + 1) * nb))
            step.input_ids.append(int(ids[row]))
            step.positions.append(load.context - 1)
            step.slot_mapping += self._slots(table, load.context - 1, load.context)
            step.decode_rows.append(row)
            step.decode_tables.append(table)
            step.decode_lens.append(load.context)
            step.sample_rows.append(row)
        return step

    @torch.inference_mode()
    def _run_model(self, kwargs: dict) -> torch.Tensor:
        return self.model(**kwargs).logits[0]  # [n, V]

    def _slots(self, table: list[int], start: int, stop: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def execute(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """Run the step; returns logits [n, V] for the items that sample, in schedule order."""
        inputs = self.prepare(scheduled)
        if self.tp_size > 1:
            distributed.broadcast(inputs)
        return self.forward(inputs)

    def follow(self) -> None:
        """Other ranks: run every step rank 0 sends, until it sends None (close())."""
        while (inputs := distributed.broadcast()) is not None:
            self.forward(inputs)

    def close(self) -> None:
        if self.tp_size > 1:
            distributed.broadcast(None)

    def prepare(self, scheduled: list[Scheduled]) -> StepInputs:
        step = StepInputs()
        for item in scheduled:
            seq, start, num = item.seq, item.start, item.num_tokens
            row = len(step.input_ids)
            step.input_ids += seq.tokens(start, start + num)
            step.positions += range(start, start + num)
            step.slot_mapping += self._slots(seq.block_table, start, start + num)
            context = start + num
            if num == 1:
                step.decode_rows.append(row)
                step.decode_tables.append(seq.block_table)
                step.decode_lens.append(context)
            else:
                slots = None if start == 0 else self._slots(seq.block_table, 0, context)
                step.prefills.append((row, num, context, slots))
            if item.reaches_end:
                step.sample_rows.append(row + num - 1)
        return step

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        pure_decode = not step.prefills and len(step.sample_rows) == len(step.input_ids)
        if self.graphs is not None and pure_decode:
            logits = self.graphs.run(
                step.input_ids,
                step.positions,
                step.slot_mapping,
                step.decode_tables,
                step.decode_lens,
            )
            if logits is not None:
                return logits
        dev = self.device

        def longs(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        prefills = [
            Prefill(r, n, c, None if s is None else longs(s)) for r, n, c, s in step.prefills
        ]
        batch = PagedBatch(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            slot_mapping=longs(step.slot_mapping),
            decode_rows=None,
            decode_tables=None,
            decode_mask=None,
            prefills=prefills,
        )
        if step.decode_rows:
            tables = step.decode_tables
            width = max(len(t) for t in tables)
            lens = longs(step.decode_lens)
            batch.decode_rows = longs(step.decode_rows)
            batch.decode_tables = longs([t + [0] * (width - len(t)) for t in tables])
            if self.decode_kernel == "sdpa":  # the kernels read lens instead of a mask
                mask = (
                    torch.arange(max(step.decode_lens), device=dev)[None, :] < lens[:, None]
                )  # [Bd, L]
                batch.decode_mask = mask[:, None, None, :]
            batch.decode_lens = lens
            batch.decode_kernel = self.decode_kernel
            batch.cpu_variant = self.cpu_variant
        return self._run_model(
            {
                "input_ids": longs([step.input_ids]),
                "position_ids": longs([step.positions]),
                "use_cache": False,
                "logits_to_keep": longs(step.sample_rows),
                "hearth_batch": batch,
            }
        )
