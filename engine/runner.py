"""Runs one scheduled step through the model: packs tokens and cache addressing into a forward.

Start-up is `ModelRunner.__init__`'s named steps; the kernels package does the work
(engine/kernels/patching.py, selection.py, autotune.py) and engine/kv_cache.py owns the cache.

Longer than ~300 lines on purpose: one class whose start-up steps decide what its step runs (the
forward, kernels, CUDA graphs, tensor-parallel followers); the forward itself lives in
engine/models/ and the kernels in engine/kernels/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from hearth.engine import distributed
from hearth.engine.config import EngineSettings
from hearth.engine.host_memory import trim_host_memory
from hearth.engine.kernels import autotune, selection
from hearth.engine.kernels.attention import PagedBatch, Prefill
from hearth.engine.kernels.autotune_noise import SlowWatch
from hearth.engine.kernels.cuda_graphs import DecodeGraphs
from hearth.engine.kernels.patching import (
    capture_decode_graphs,
    needs_patch,
    patch_forwards,
    prepare_model,
)
from hearth.engine.kernels.selection import Kernels
from hearth.engine.kv_cache import KVCache, KVCacheSpec, layer_devices
from hearth.engine.lora import LoraManager
from hearth.engine.models import LlamaForward, own_forward
from hearth.engine.multimodal.encoder import MMStep, VisionEncoder, is_vision_model
from hearth.engine.scheduler import Scheduled
from hearth.engine.sequence import Sequence

__all__ = ["ModelRunner", "PromptRows", "StepInputs"]

log = logging.getLogger("hearth.engine")


@dataclass
class PromptRows:
    """Logits of a prompt_logprobs sequence's prompt positions computed in one step.

    `logits` [m, V]: row i is the model's prediction at position first - 1 + i, i.e. for the
    prompt token at position `first + i` (first >= 1: the first prompt token has none).
    """

    seq: Sequence
    first: int
    logits: torch.Tensor


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
    prompt_rows: list[int] = field(default_factory=list)  # also kept: prompt_logprobs positions
    mm: MMStep | None = None  # image rows and M-RoPE positions: prefill chunks of image prompts


class ModelRunner:
    """Owns the KV cache and runs steps. Under tensor parallelism rank 0 (the engine's) sends
    each step's inputs to the other ranks, which run the same forward in `follow()`."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        dtype: torch.dtype,
        settings: EngineSettings,
        max_model_len: int,
        tp_size: int = 1,
    ) -> None:
        """Start-up in order: prepare the model (paged attention, fused projections), choose
        kernels (static choice + launch probe), allocate the KV cache of `num_blocks` blocks,
        autotune (unless off or under tensor parallelism), apply the kernels (patch forwards,
        pack weights, capture CUDA graphs). Raises ValueError for settings that cannot run."""
        prepare_model(model, tp_size)
        # hearth's own forward for the Llama family (engine/models/), else transformers'
        self.own: LlamaForward | None = own_forward(model, tp_size, max_model_len)
        self.model, self.dtype, self.settings = model, dtype, settings
        self.tp_size, self.max_model_len = tp_size, max_model_len
        self.block_size = settings.block_size
        self.device = next(model.parameters()).device
        self.vision = VisionEncoder(model) if is_vision_model(model) else None
        self.graphs: DecodeGraphs | None = None
        self.kernels: Kernels | None = None  # what the model's forwards are patched for
        self.loras: LoraManager | None = None  # the engine's adapters (engine/lora/), if any
        self.decode_kernel, self.cpu_variant = "sdpa", None
        spec = KVCacheSpec.from_model(model, dtype, tp_size)
        devices = layer_devices(model, spec.num_layers)
        kernels = selection.startup_kernels(model, settings, devices, spec, tp_size)
        self.kv_cache = KVCache(spec, num_blocks, self.block_size, devices)
        self.candidates: list[Kernels] | None = None  # what autotune chose among, if it ran
        self.tuned_times: dict[str, float] | None = None  # the decision's step times (autotune)
        self.should_stop: Callable[[], bool] | None = None  # asked by a re-measure (retune)
        if settings.autotune != "off" and tp_size == 1:
            self.candidates = selection.tuning_candidates(settings, devices, spec, kernels.gguf)
            kernels = autotune.select(self, settings, self.candidates, max_model_len)
        self.kernels = self.apply(kernels, log_packing=True, final=True)
        # served batch-1 decode steps far slower than the decision's: re-measure when idle
        self.slow = SlowWatch(self._expected_step() if self.device.type == "cpu" else None)

    def _expected_step(self) -> float | None:
        """The decision's batch-1 decode step time (seconds), if autotune measured one."""
        return (self.tuned_times or {}).get("decode x1")

    @property
    def retune_due(self) -> bool:
        """Served batch-1 steps ran far slower than the decision's figure (SlowWatch)."""
        return self.slow.fired and self.candidates is not None

    def retune(self, stop: Callable[[], bool] | None = None) -> None:
        """Re-measure the kernel choice and apply it (at an idle moment: it writes the KV
        cache, whose cached prefixes the caller must forget). `stop` is asked between timed
        steps: when it says True (a request arrived, the engine is stopping) the re-measure
        ends at once. An interrupted or failed re-measure keeps the kernels it found."""
        log.info("autotune: served steps run far slower than measured: re-measuring")
        settings = self.settings.model_copy(update={"autotune": "remeasure"})
        before, self.should_stop = self.kernels, stop
        try:
            kernels = autotune.select(self, settings, self.candidates, self.max_model_len)
            self.apply(kernels, final=True)
        except Exception as exc:
            if isinstance(exc, autotune.Interrupted):
                log.info("autotune: re-measuring interrupted (%s); the kernels stay", exc)
            else:
                log.exception("autotune: re-measuring failed; the kernels stay as they were")
            self.kv_cache.fill(seed=None)
            if before is not None:
                self.apply(before, final=True)
        finally:
            self.should_stop = None
        self.slow.reset(self._expected_step())

    def apply(
        self,
        kernels: Kernels,
        graph_sizes: list[int] | None = None,
        log_packing: bool = False,
        final: bool = False,
    ) -> Kernels:
        """Switch the model to `kernels` (from whatever it ran before): forwards patched or
        restored, weights packed for the CPU matmul, CUDA graphs captured for `graph_sizes`
        (default: every bucket). Returns what was applied: packing that does not fit in memory
        and a failed capture of graphs that were not asked for by name fall back (logged);
        graphs asked for by name that cannot be captured raise GraphCaptureError. `final`: the
        choice to serve with (not an autotune trial): patched again, so that the packing may
        drop the weights' float32 originals (kernels/cpu_linear.py)."""
        self.graphs = None
        if needs_patch(self.kernels, kernels) or (final and kernels.cpu_matmul):
            self.kernels = None  # a patch that fails half way is redone next time
            kernels = patch_forwards(self.model, kernels, log_packing, final)
            if final:  # the trials' and dropped weights' heap pages back to the OS
                trim_host_memory()
        if kernels.threads:
            torch.set_num_threads(kernels.threads)
        self.decode_kernel, self.cpu_variant = kernels.decode, kernels.cpu_variant
        if kernels.graphs:
            self.graphs = capture_decode_graphs(
                self._run_model, self.kv_cache, self.settings, self.max_model_len, graph_sizes
            )
            if self.graphs is None:
                kernels = kernels._replace(graphs=False)
        self.kernels = kernels
        return kernels

    def sync(self) -> None:
        """Wait for the model's device (CUDA) to finish queued work; CPU: nothing to wait for."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timing_step(self, load: autotune.Workload) -> StepInputs:
        """A step of `load`'s shape over cache blocks no request owns yet: decode row i attends
        to blocks [i * nb, (i + 1) * nb); the prefill writes the last blocks of the cache."""
        bs, vocab = self.block_size, self.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(load.batch * 100_003 + load.context)
        ids = torch.randint(vocab, (load.batch * load.context,), generator=generator)
        step = StepInputs()
        if load.prefill:
            num_blocks = self.kv_cache.num_blocks
            first = num_blocks - -(-load.context // bs)
            table = list(range(first, num_blocks))
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
        """The model's logits [n, V] of the rows in kwargs' logits_to_keep: hearth's own
        forward where the model has one, except for steps with LoRA rows (their hooks sit on
        transformers' modules: engine/lora/linear.py) and image rows."""
        own = self.own
        lora_rows = self.loras is not None and self.loras.current is not None
        if own is not None and not lora_rows and "input_ids" in kwargs:
            ids, positions = kwargs["input_ids"][0], kwargs["position_ids"][0]  # [T] each
            return own(ids, positions, kwargs["hearth_batch"], kwargs["logits_to_keep"])
        return self.model(**kwargs).logits[0]  # [n, V]

    def _slots(self, table: list[int], start: int, stop: int) -> list[int]:
        """Cache slots (block id * block_size + offset) of positions [start, stop) of a block
        table."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def execute(self, scheduled: list[Scheduled]) -> tuple[torch.Tensor, list[PromptRows]]:
        """Run the step; returns logits [n, V] for the items that sample, in schedule order
        (1 + num_spec rows each), and the prompt-position logits of the items that asked for
        prompt_logprobs."""
        inputs = self.prepare(scheduled)
        if self.tp_size > 1:
            distributed.broadcast(inputs)
        started = time.perf_counter()
        with nullcontext() if self.loras is None else self.loras.step(self, scheduled):
            logits = self.forward(inputs)
        single = len(inputs.input_ids) == 1 and bool(inputs.decode_rows)  # batch-1 decode
        if single and inputs.decode_lens[0] <= 2 * autotune.DECODE_CONTEXT:  # ~ the timed one
            self.slow.observe(time.perf_counter() - started)
        n, parts, row = len(inputs.sample_rows), [], len(inputs.sample_rows)
        for item in scheduled:
            count = self._prompt_rows(item)
            if count:
                parts.append(PromptRows(item.seq, item.start + 1, logits[row : row + count]))
                row += count
        return logits[:n], parts

    @staticmethod
    def _prompt_rows(item: Scheduled) -> int:
        """How many of the chunk's positions predict a prompt token the request scores."""
        if item.seq.params.prompt_logprobs is None:
            return 0
        stop = min(item.start + item.num_tokens, item.seq.num_prompt_tokens - 1)
        return max(0, stop - item.start)

    def follow(self) -> None:
        """Other ranks: run every step rank 0 sends, until it sends None (close())."""
        while (inputs := distributed.broadcast()) is not None:
            self.forward(inputs)

    def close(self) -> None:
        """Rank 0 under tensor parallelism: stop the other ranks' `follow()`."""
        if self.tp_size > 1:
            distributed.broadcast(None)

    def prepare(self, scheduled: list[Scheduled]) -> StepInputs:
        """Pack the scheduled chunks into one row of tokens: single-token chunks decode against
        their block tables, longer ones are prefill chunks; each item that reaches the end of
        what it has to compute samples from its last row."""
        step = StepInputs()
        for item in scheduled:
            seq, start, num = item.seq, item.start, item.num_tokens
            row = len(step.input_ids)
            step.input_ids += seq.tokens(start, start + num - item.num_spec)
            step.input_ids += seq.spec_token_ids[: item.num_spec]  # draft tokens to verify
            if seq.mm is None or self.vision is None:
                step.positions += range(start, start + num)
            else:
                self._add_images(step, seq, row, start, num)
            step.slot_mapping += self._slots(seq.block_table, start, start + num)
            context = start + num
            if num == 1:
                step.decode_rows.append(row)
                step.decode_tables.append(seq.block_table)
                step.decode_lens.append(context)
            else:
                slots = None if start == 0 else self._slots(seq.block_table, 0, context)
                step.prefills.append((row, num, context, slots))
            if item.reaches_end:  # with draft tokens: the last real row and each draft's
                step.sample_rows += range(row + num - 1 - item.num_spec, row + num)
            step.prompt_rows += range(row, row + self._prompt_rows(item))
        return step

    def _add_images(self, step: StepInputs, seq: Sequence, row: int, start: int, num: int) -> None:
        """Positions of an image prompt's chunk (M-RoPE: shifted after the prompt, 3-D within
        it) and, where it covers image placeholders, the rows its images' features replace."""
        vision = self.vision
        offset = vision.position_offset(seq)
        step.positions += range(start + offset, start + num + offset)
        in_prompt = start < seq.num_prompt_tokens
        if not in_prompt or not (vision.mrope or seq.mm.hashes_in(start, start + num)):
            return
        if step.mm is None:
            step.mm = MMStep()
        vision.add(step.mm, seq, row, start, num)
        if vision.mrope:
            step.mm.rope.append((row, vision.positions3(seq, start, num)))

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Logits [len(step.sample_rows) + len(step.prompt_rows), V] of one packed step (those
        rows, in that order): a captured CUDA graph for pure decode steps of a captured batch
        size, else one eager forward over the paged cache."""
        pure_decode = not step.prefills and not step.prompt_rows
        pure_decode = pure_decode and len(step.sample_rows) == len(step.input_ids)
        if self.graphs is not None and pure_decode and step.mm is None:
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
        # Every integer input of the step in one tensor: one host-to-device copy, then views.
        keep = step.sample_rows + step.prompt_rows
        values = step.input_ids + step.positions + step.slot_mapping + keep
        sizes = [len(step.input_ids), len(step.positions), len(step.slot_mapping), len(keep)]
        for _, _, _, slots in step.prefills:
            values += slots or []
            sizes.append(len(slots or []))
        width = 0
        if step.decode_rows:
            width = max(len(t) for t in step.decode_tables)
            values += step.decode_rows + step.decode_lens
            for table in step.decode_tables:
                values += table + [0] * (width - len(table))
            sizes += [len(step.decode_rows)] * 2 + [len(step.decode_rows) * width]
        parts = torch.tensor(values, dtype=torch.long, device=dev).split(sizes)
        ids, positions, slot_mapping, kept = parts[:4]  # [T], [T], [T], [n]
        prefills = [
            Prefill(r, n, c, None if s is None else parts[4 + i])
            for i, (r, n, c, s) in enumerate(step.prefills)
        ]
        batch = PagedBatch(
            k_cache=self.kv_cache.k_cache,
            v_cache=self.kv_cache.v_cache,
            slot_mapping=slot_mapping,
            decode_rows=None,
            decode_tables=None,
            decode_mask=None,
            prefills=prefills,
        )
        if step.decode_rows:
            rows, lens, tables = parts[4 + len(prefills) :]  # [Bd], [Bd], [Bd * nb]
            batch.decode_rows = rows
            batch.decode_tables = tables.view(len(step.decode_rows), width)  # [Bd, nb]
            if self.decode_kernel == "sdpa":  # the kernels read lens instead of a mask
                mask = (
                    torch.arange(max(step.decode_lens), device=dev)[None, :] < lens[:, None]
                )  # [Bd, L]
                batch.decode_mask = mask[:, None, None, :]
            batch.decode_lens = lens
            batch.decode_kernel = self.decode_kernel
            batch.cpu_variant = self.cpu_variant
        kwargs = {
            "input_ids": ids[None],  # [1, T]
            "position_ids": positions[None],
            "use_cache": False,
            "logits_to_keep": kept,
            "hearth_batch": batch,
        }
        if step.mm is not None:  # image features in place of their placeholders' embeddings
            kwargs.update(self.vision.model_inputs(kwargs.pop("input_ids"), kwargs, step.mm))
        return self._run_model(kwargs)
