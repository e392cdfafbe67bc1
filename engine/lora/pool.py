"""The engine's LoRA adapters: registered adapters (host memory) and a bounded slot pool (device).

- `load` / `unregister` may run on any thread: reading and checking an adapter happens off the
  engine thread, so loading never stalls generation; registering is a dict update under a lock.
- Each step, `step()` (on the engine thread) gives every adapter of the step a slot: one it
  holds already, a free one, or the least recently used slot of an adapter no sequence of the
  step uses (its weights are copied in: a few small host-to-device copies). It then builds the
  step's rows per slot and installs them for the layers' hooks (engine/lora/linear.py).
- `admissible` keeps the adapters of the running sequences within `max_loras`, so the pool
  never has to evict an adapter that a running sequence still needs.
- `cache_root` seeds the prefix cache's key chain per adapter load: two adapters (or two loads
  of one name) never share KV blocks.

No adapter registered: `step()` returns at once and no hook is installed (the base path is as
before). Steps with adapter rows run eagerly (no CUDA graph replay).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hearth.engine.lora.adapter import AdapterError, LoraWeights, read_adapter
from hearth.engine.lora.linear import LoraStep, StackedLora, make_hook
from hearth.engine.types import InvalidRequestError

_uids = itertools.count(1)


@dataclass
class _Entry:
    weights: LoraWeights
    uid: int  # unique per load: a reloaded name is a new adapter for the prefix cache


class LoraManager:
    """Adapters of one model: at most `max_loras` in device slots at once, rank <= `max_rank`."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, tp_size: int = 1) -> None:
        self.model, self.tp_size = model, tp_size
        self.max_loras, self.max_rank = max_loras, max_rank
        self.lock = threading.Lock()
        self.adapters: dict[str, _Entry] = {}
        self.slot_uid: list[int | None] = [None] * max_loras  # the load held by each slot
        self.slot_used = [0] * max_loras  # step counter of last use (LRU)
        self.stacks: dict[str, StackedLora] = {}  # layer path -> its stacked weights
        self.hooks: dict[str, Any] = {}  # layer path -> hook handle
        self.saved_forwards: dict[str, dict] = {}  # MLP path -> fused forward set aside
        self.current: LoraStep | None = None
        self.steps = 0

    # -- any thread -----------------------------------------------------------------------
    def load(self, name: str, source: str, base_dir: Path | None = None) -> LoraWeights:
        """Read, check and register adapter `name`; AdapterError (nothing registered) if it
        cannot be served or the name is taken."""
        if self.tp_size > 1:
            raise AdapterError(name, "LoRA adapters are not supported with tensor parallelism")
        with self.lock:
            if name in self.adapters:
                raise AdapterError(name, "an adapter of this name is already loaded")
        weights = read_adapter(name, source, self.model, self.max_rank, base_dir)
        with self.lock:
            if name in self.adapters:
                raise AdapterError(name, "an adapter of this name is already loaded")
            self.adapters[name] = _Entry(weights, next(_uids))
        return weights

    def unregister(self, name: str) -> bool:
        """Forget adapter `name` (its slot becomes free); False if it was not loaded. The caller
        waits for the adapter's requests first (server/lora_route.py)."""
        with self.lock:
            return self.adapters.pop(name, None) is not None

    def names(self) -> list[str]:
        with self.lock:
            return list(self.adapters)

    def check(self, name: str | None) -> None:
        """InvalidRequestError if a request names an adapter that is not loaded."""
        if name is not None and name not in self.adapters:
            raise InvalidRequestError(f"LoRA adapter {name!r} is not loaded", "model")

    # -- engine thread ----------------------------------------------------------------------
    def cache_root(self, seq: Any) -> int:
        """The first prefix-cache block's parent hash for `seq`: 0 for the base model."""
        name = seq.params.lora
        if name is None:
            return 0
        entry = self.adapters.get(name)
        return hash(("lora", name, entry.uid if entry else -1))

    def admissible(self, seq: Any, running: list[Any]) -> bool:
        """Whether `seq` may start next to `running` without more than max_loras adapters."""
        name = seq.params.lora
        if name is None:
            return True
        names = {s.params.lora for s in running if s.params.lora is not None}
        return name in names or len(names) < self.max_loras

    def _slot_for(self, name: str, busy: set[int]) -> int:
        """A slot holding adapter `name`'s weights (copied in if needed), not one in `busy`."""
        entry = self.adapters.get(name)
        if entry is None:
            raise InvalidRequestError(f"LoRA adapter {name!r} is not loaded", "model")
        if entry.uid in self.slot_uid:
            return self.slot_uid.index(entry.uid)
        live = {e.uid for e in self.adapters.values()}
        free = [s for s in range(self.max_loras) if s not in busy]
        if not free:
            raise RuntimeError(f"more than max_loras={self.max_loras} adapters in one step")
        # Free slots (never used, or their adapter unloaded) first, then the least recent.
        slot = min(free, key=lambda s: (self.slot_uid[s] in live, self.slot_used[s]))
        self._place(slot, entry)
        return slot

    def _place(self, slot: int, entry: _Entry) -> None:
        """Copy an adapter's weights into `slot` of every stacked layer it adapts."""
        self.slot_uid[slot] = None
        modules = entry.weights.modules
        for path in modules:
            if path not in self.stacks:
                self._install(path)
        for path, stack in self.stacks.items():
            a, b = modules.get(path, (None, None))
            stack.put(slot, a, b)
        self.slot_uid[slot] = entry.uid

    def _install(self, path: str) -> None:
        """Stack layer `path`'s slots and hook it (a fused Triton MLP goes back to the stock
        forward, which calls gate_proj and up_proj as layers)."""
        layer = self.model.get_submodule(path)
        self.stacks[path] = StackedLora(layer, self.max_loras, self.max_rank)
        self.hooks[path] = layer.register_forward_hook(make_hook(self.stacks[path], self._now))
        parent_path, _, leaf = path.rpartition(".")
        if leaf in ("gate_proj", "up_proj") and parent_path not in self.saved_forwards:
            parent = self.model.get_submodule(parent_path)
            if parent.__dict__.get("_hearth_forward") and "forward" in parent.__dict__:
                saved = {k: parent.__dict__.pop(k) for k in ("forward", "_hearth_forward")}
                self.saved_forwards[parent_path] = saved

    def _now(self) -> LoraStep | None:
        return self.current

    @contextmanager
    def step(self, runner: Any, scheduled: list[Any]) -> Iterator[None]:
        """Run the body (the step's forward) with the step's adapters in slots and their rows
        installed for the hooks; nothing at all when no scheduled item uses an adapter."""
        if not self.adapters or all(item.seq.params.lora is None for item in scheduled):
            yield
            return
        self.steps += 1
        slots: list[int] = []
        with self.lock:
            busy: set[int] = set()
            for item in scheduled:
                name = item.seq.params.lora
                slot = -1 if name is None else self._slot_for(name, busy)
                if slot >= 0:
                    busy.add(slot)
                    self.slot_used[slot] = self.steps
                slots += [slot] * item.num_tokens
        used = sorted(set(slots) - {-1})
        row_slot = None  # one adapter on every row: no per-row slots needed
        if len(used) > 1 or -1 in slots:
            row_slot = torch.tensor(slots, dtype=torch.long, device=runner.device)  # [n]
        self.current = LoraStep(used, row_slot, len(slots))
        graphs, runner.graphs = runner.graphs, None  # adapter rows: eager forward
        try:
            yield
        finally:
            self.current = None
            runner.graphs = graphs

    def slot_of(self, name: str) -> int | None:
        """The slot adapter `name` sits in now (tests, stats), or None."""
        entry = self.adapters.get(name)
        if entry is None or entry.uid not in self.slot_uid:
            return None
        return self.slot_uid.index(entry.uid)


def lora_manager(model: nn.Module, settings: Any, tp_size: int = 1) -> LoraManager:
    """The manager for a model with `settings.max_loras` slots of rank `settings.max_lora_rank`."""
    return LoraManager(model, settings.max_loras, settings.max_lora_rank, tp_size)
