"""Models loaded on first use, unloaded when idle, evicted under a memory budget per device.

What Ollama (`keep_alive`, `OLLAMA_MAX_LOADED_MODELS`), LM Studio (just-in-time loading, TTL) and
llama-server's router mode do, for the models of one models.yaml:

- Each configured model has a `Slot`: unloaded -> loading -> loaded -> unloading -> unloaded.
- `ensure(model)` (awaited by a request) loads it off the event loop; concurrent first requests
  share one load (one future). Its estimated bytes are reserved on its device while it loads.
- A load that does not fit its device's budget evicts the least recently used idle models on
  that device (`choose_victims`); a model with requests in flight (leases, or sequences in its
  engine) is never evicted. If evicting every idle model would still not make room: `NoRoom`
  (the route answers 503 with Retry-After), never an out-of-memory crash.
- A request holds a lease on its model from `ensure` until its HTTP response ends
  (`request_leases`, entered by server/limits.py's RequestGuard); when the last lease ends, the
  model's `keep_alive` timer starts (None: never unload; 0: unload at once).

The pure policy (`fits`, `choose_victims`, `idle_expired`) is unit-tested with fakes
(tests/unit/test_model_manager.py). Loading and unloading are callables given by the launcher
(hearth/on_demand.py): the server never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

from hearth.engine.types import EngineClient

log = logging.getLogger("hearth.models")

SlotState = Literal["unloaded", "loading", "loaded", "unloading"]
HOLDS_MEMORY = ("loading", "loaded", "unloading")  # states whose bytes count against the budget


class NoRoom(RuntimeError):
    """No idle model can be evicted to fit this load (HTTP 503 with Retry-After)."""


class LoadFailed(RuntimeError):
    """The model could not be loaded; str() names the model and the cause (HTTP 503)."""


@dataclass(frozen=True)
class ModelPlan:
    """What is known of a configured model before it loads."""

    model_id: str
    device: str  # the budget it counts against: "cpu", "cuda:0", ...
    estimate_bytes: int  # weights + KV cache + workspace it will allocate
    on_demand: bool  # False: loaded at start
    keep_alive_s: float | None  # idle seconds before unloading; None: never; 0: at once
    task: str = "generate"
    aliases: tuple[str, ...] = ()
    max_model_len: int | None = None
    pinned: bool = False  # never unloaded by the policy (a LoRA base, tensor parallelism)


@dataclass(eq=False)
class Slot:
    plan: ModelPlan
    state: SlotState = "unloaded"
    engine: EngineClient | None = None
    leases: int = 0  # requests holding this model (request_leases)
    last_used: float = 0.0  # monotonic seconds of the last acquire or release
    loads: int = 0
    evictions: int = 0  # unloads to make room for another model
    load_seconds: float = 0.0  # the last load's duration
    error: str | None = None  # the last load's failure
    transition: asyncio.Future | None = None  # the load or unload under way
    timer: asyncio.TimerHandle | None = None  # keep_alive

    def busy(self) -> bool:
        """Requests in flight: leases, or sequences in the engine (e.g. a background run)."""
        if self.leases > 0:
            return True
        if self.engine is None:
            return False
        stats = self.engine.stats()
        return stats.num_running + stats.num_waiting > 0


# -- the policy (pure) ------------------------------------------------------------------------
def used_bytes(slots: list[Slot], device: str) -> int:
    """Bytes held or reserved on `device` (loaded, loading, or not yet freed)."""
    return sum(
        s.plan.estimate_bytes for s in slots if s.plan.device == device and s.state in HOLDS_MEMORY
    )


def fits(need: int, used: int, budget: int | None) -> bool:
    """Whether `need` more bytes fit next to `used` under `budget` (None: no budget)."""
    return budget is None or used + need <= budget


def choose_victims(slots: list[Slot], incoming: Slot, budget: int | None) -> list[Slot] | None:
    """The least recently used idle loaded models on `incoming`'s device whose unloading makes
    room for it (oldest first, as few as needed); [] when it fits already; None when it cannot
    fit even after evicting every idle model (or is larger than the whole budget)."""
    device, need = incoming.plan.device, incoming.plan.estimate_bytes
    used = used_bytes([s for s in slots if s is not incoming], device)
    if fits(need, used, budget):
        return []
    idle = [
        s
        for s in slots
        if s is not incoming
        and s.plan.device == device
        and s.state == "loaded"
        and not s.plan.pinned
        and s.transition is None
        and not s.busy()
    ]
    victims = []
    for slot in sorted(idle, key=lambda s: s.last_used):
        victims.append(slot)
        used -= slot.plan.estimate_bytes
        if fits(need, used, budget):
            return victims
    return None


def idle_expired(slot: Slot, now: float) -> bool:
    """Whether a loaded model has been idle for its keep_alive."""
    keep = slot.plan.keep_alive_s
    if slot.state != "loaded" or keep is None or slot.plan.pinned or slot.busy():
        return False
    return now - slot.last_used >= keep


# -- leases per HTTP request ------------------------------------------------------------------
_LEASES: ContextVar[list[tuple[ModelManager, Slot]] | None] = ContextVar("leases", default=None)


@contextlib.contextmanager
def request_leases() -> Iterator[None]:
    """Scope of one HTTP request: models it acquires are released when it ends."""
    held: list[tuple[ModelManager, Slot]] = []
    token = _LEASES.set(held)
    try:
        yield
    finally:
        _LEASES.reset(token)
        for manager, slot in held:
            manager.release(slot)


# -- the manager ------------------------------------------------------------------------------
@dataclass
class ModelManager:
    """The slots of every configured model and the budgets of their devices.

    `load(model_id)` builds an engine (blocking: run in a worker thread), `unload(engine)` stops
    it and frees its memory (blocking); `on_loaded` / `on_unloaded` tell the registry.
    """

    plans: list[ModelPlan]
    budgets: dict[str, int | None]  # device -> bytes (a device not named: no budget)
    load: Callable[[str], EngineClient]
    unload: Callable[[EngineClient], None]
    on_loaded: Callable[[EngineClient], None] = lambda engine: None
    on_unloaded: Callable[[str], None] = lambda model_id: None
    clock: Callable[[], float] = time.monotonic
    retry_after_s: int = 5
    slots: dict[str, Slot] = field(init=False)

    def __post_init__(self) -> None:
        self.slots = {p.model_id: Slot(p) for p in self.plans}

    def state(self, model_id: str) -> SlotState:
        return self.slots[model_id].state

    def loaded(self, engine: EngineClient, seconds: float = 0.0) -> None:
        """Record a model loaded outside `ensure` (at start) in `seconds`."""
        slot = self.slots[engine.info.model_id]
        slot.state, slot.engine, slot.last_used = "loaded", engine, self.clock()
        slot.loads, slot.load_seconds = slot.loads + 1, seconds
        self.on_loaded(engine)
        self._arm(slot)

    async def ensure(self, model_id: str, lease: bool = True) -> EngineClient:
        """The model's engine, loading it first if needed (waiting on a load or unload under
        way); with `lease`, held until the current request ends (request_leases). NoRoom,
        LoadFailed."""
        slot = self.slots[model_id]
        while slot.state != "loaded":
            if slot.transition is None:  # unloaded: this request starts the load
                slot.transition = asyncio.ensure_future(self._load(slot))
            await asyncio.shield(slot.transition)
        slot.last_used = self.clock()
        if lease and (held := _LEASES.get()) is not None:
            slot.leases += 1
            held.append((self, slot))
            self._disarm(slot)
        elif not slot.leases:  # no request holds it: keep_alive counts from now
            self._arm(slot)
        assert slot.engine is not None
        return slot.engine

    def release(self, slot: Slot) -> None:
        slot.leases = max(0, slot.leases - 1)
        slot.last_used = self.clock()
        if slot.leases == 0:
            self._arm(slot)

    async def unload_now(self, model_id: str, evicted: bool = False) -> bool:
        """Unload a model once its requests are done (False: it was not loaded)."""
        slot = self.slots[model_id]
        while slot.state in ("loading", "unloading") and slot.transition is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(slot.transition)
        if slot.state != "loaded":
            return False
        while slot.busy():  # an admin unload waits for requests in flight
            await asyncio.sleep(0.05)
        if slot.state != "loaded":
            return False
        await asyncio.shield(self._begin_unload(slot, evicted))
        return True

    # -- transitions ----------------------------------------------------------------------
    async def _load(self, slot: Slot) -> None:
        model_id = slot.plan.model_id
        try:
            victims = choose_victims(list(self.slots.values()), slot, self._budget(slot))
            if victims is None:
                raise self._no_room(slot)
            slot.state = "loading"  # reserves its bytes from here on
            unloads = []
            for victim in victims:
                log.info(
                    "%s: evicting %s (least recently used, idle)", model_id, victim.plan.model_id
                )
                unloads.append(self._begin_unload(victim, evicted=True))
            for unload in unloads:
                await asyncio.shield(unload)
            log.info("%s: loading (first use)", model_id)
            start = self.clock()
            try:
                engine = await asyncio.to_thread(self.load, model_id)
            except Exception as exc:
                slot.error = f"The model '{model_id}' failed to load: {exc}"
                log.error("%s", slot.error)
                raise LoadFailed(slot.error) from exc
            slot.load_seconds = self.clock() - start
            slot.state, slot.engine, slot.error = "loaded", engine, None
            slot.loads += 1
            slot.last_used = self.clock()
            log.info("%s: loaded in %.1f s (load #%d)", model_id, slot.load_seconds, slot.loads)
            self.on_loaded(engine)  # keep_alive starts when its requests end (ensure, release)
        except BaseException:
            if slot.state == "loading":
                slot.state = "unloaded"
            raise
        finally:
            slot.transition = None

    def _begin_unload(self, slot: Slot, evicted: bool) -> asyncio.Future:
        """Stop serving the model now (new requests wait, then load it again) and free it in
        a worker thread; the future of that."""
        self._disarm(slot)
        slot.state = "unloading"
        self.on_unloaded(slot.plan.model_id)
        slot.transition = asyncio.ensure_future(self._unload(slot, slot.engine, evicted))
        return slot.transition

    async def _unload(self, slot: Slot, engine: EngineClient | None, evicted: bool) -> None:
        try:
            if engine is not None:
                await asyncio.to_thread(self.unload, engine)
        finally:
            slot.engine, slot.state, slot.transition = None, "unloaded", None
            slot.evictions += int(evicted)
        log.info("%s: unloaded%s", slot.plan.model_id, " (evicted)" if evicted else "")

    def _budget(self, slot: Slot) -> int | None:
        return self.budgets.get(slot.plan.device)

    def _no_room(self, slot: Slot) -> NoRoom:
        plan, budget = slot.plan, self._budget(slot)
        gib = 2**30
        if budget is not None and plan.estimate_bytes > budget:
            why = f"it needs {plan.estimate_bytes / gib:.2f} GiB, over the whole budget"
        else:
            why = "every other model on the device has requests in flight"
        return NoRoom(
            f"The model '{plan.model_id}' cannot be loaded now: {why} of {plan.device} "
            f"({(budget or 0) / gib:.2f} GiB); try again shortly."
        )

    # -- keep_alive ------------------------------------------------------------------------
    def _arm(self, slot: Slot) -> None:
        self._disarm(slot)
        keep = slot.plan.keep_alive_s
        if keep is None or slot.state != "loaded" or slot.leases:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # loaded at start, from the loader thread: armed on first release
            return
        slot.timer = loop.call_later(max(keep, 0.0), self._expire, slot)

    def _disarm(self, slot: Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None

    def _expire(self, slot: Slot) -> None:
        slot.timer = None
        if slot.state != "loaded" or slot.transition is not None:
            return
        if idle_expired(slot, self.clock()):
            log.info(
                "%s: idle for its keep_alive (%gs)", slot.plan.model_id, slot.plan.keep_alive_s
            )
            self._begin_unload(slot, evicted=False)
        elif slot.busy() and not slot.leases:  # a background run: look again shortly
            slot.timer = asyncio.get_running_loop().call_later(1.0, self._expire, slot)
        else:
            self._arm(slot)
