"""The adapters an inference server holds: a bounded cache of loaded versions, the routing of
aliases to versions, and hot-swapping when an alias moves.

The rules that keep every response answered by the weights of the version stamped on it:
- A loaded version is known by its serving name, which the registry derives from the version's
  content and never reuses; a version name is resolved to it on every request, so a deleted and
  re-created `adapters/x/versions/1` with other bytes is a different entry, and a deleted version
  answers NOT_FOUND at once.
- A request holds a reference to the loaded version it was routed to until it ends
  (`acquire`/`release`): unloading waits for the last reference, and a version being unloaded
  takes no new ones. Routes only ever point at loaded versions.
- Alias moves are serialised per alias and converge on the alias's current target in the
  registry (the change feed only says *that* an alias moved): the new version is loaded, routing
  switches in one step, and the old version drains and is unloaded. A version wanted again while
  it drains (A→B→A within one request) is kept, not reloaded. If the new version fails to load,
  the alias keeps routing to the old one and the failure shows in the served list and metrics.
- At most `capacity` versions stay loaded: the least recently used one that is not pinned, not
  routed and has no request in flight is unloaded to make room; when none can go, the request
  fails RESOURCE_EXHAUSTED (ADAPTER_CACHE_FULL).
- Versions and adapters deleted in the registry are unloaded once their requests end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tunefleet.adapters import names
from tunefleet.adapters.registry import Registry
from tunefleet.adapters.store import VersionRow
from tunefleet.inference.engine import AdapterFiles, Engine
from tunefleet.inference.metrics import InferenceMetrics
from tunefleet.runtime.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    TunefleetError,
    Unavailable,
)
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.storage.database import utcnow

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED, UNLOADING = "LOADING", "LOADED", "FAILED", "UNLOADING"
WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Errors that refuse a version before it loads (not servable here, no room).
REFUSALS = (FailedPrecondition, ResourceExhausted)
# An alias re-routed this many times while one request looked it up: tell the client to retry.
MAX_ROUTING_TRIES = 8


@dataclass
class ServedVersion:
    version: str  # adapters/{adapter}/versions/{n}
    serving_name: str
    state: str = LOADING
    engine: Engine | None = None
    error: str = ""
    failure: TunefleetError | None = None  # what a request for a FAILED version is answered
    pinned: bool = False  # kept loaded on request (LoadAdapter with pin)
    load_time: datetime | None = None
    request_count: int = 0
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # loading ended
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no request in flight
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # unloaded from the engine
    unload_ticket: int = 0  # the latest unload asked for; a version wanted again cancels it
    removing: bool = False  # the engine is unloading it: too late to keep it


class AdapterPool:
    def __init__(
        self,
        engines: list[Engine],
        registry: Registry,
        base_model: str,
        capacity: int,
        workdir: Path,
        metrics: InferenceMetrics,
        models: ModelCatalogue | None = None,
    ) -> None:
        self.engines, self.registry, self.base_model = engines, registry, base_model
        self.capacity, self.workdir, self.metrics = capacity, workdir, metrics
        self.models = models or ModelCatalogue()
        self.served: dict[str, ServedVersion] = {}  # serving name -> entry
        self.routes: dict[str, ServedVersion] = {}  # adapters/{adapter}@{alias} -> entry
        self._alias_locks: dict[str, asyncio.Lock] = {}
        self.revision = 0  # of the registry's change feed, followed for alias moves
        self._background: set[asyncio.Task[Any]] = set()

    # --- requests ------------------------------------------------------------------------------

    async def acquire(self, reference: str) -> ServedVersion | None:
        """The loaded version a request names (None for the base model), held until `release`.
        An alias is routed (and followed from then on) on first use."""
        if not reference:
            return None
        ref = names.version_ref(reference, "adapter")
        for _ in range(MAX_ROUTING_TRIES):
            if ref.alias is not None:
                served = self.routes.get(reference) or await self.route(reference)
            else:
                row = await asyncio.to_thread(self.registry.get_version, reference, "adapter")
                served = await self._ensure(row)
            # Nothing awaits between this check and taking the reference: a version that is
            # LOADED here cannot start unloading before the request holds it.
            if served.state == LOADED:
                served.in_flight += 1
                served.request_count += 1
                served.last_used = time.monotonic()
                served.idle.clear()
                return served
            if served.state == FAILED and served.failure is not None:
                raise served.failure
        raise Unavailable(f"{reference} kept moving while this request was routed: retry")

    def release(self, served: ServedVersion | None) -> None:
        if served is None:
            return
        served.in_flight -= 1
        if served.in_flight == 0:
            served.idle.set()

    def aliases_of(self, served: ServedVersion) -> list[str]:
        return sorted(alias for alias, routed in self.routes.items() if routed is served)

    def find(self, version: str) -> list[ServedVersion]:
        """The entries of a version name (several only while an old copy drains)."""
        return [s for s in self.served.values() if s.version == version]

    # --- loading -------------------------------------------------------------------------------

    async def load(self, version: str, pin: bool = False) -> ServedVersion:
        """Load a version (or wait for the load under way); raises what refused it."""
        row = await asyncio.to_thread(self.registry.get_version, version, "adapter")
        served = await self._ensure(row, pin)
        if served.state == FAILED and served.failure is not None:
            raise served.failure
        return served

    async def _ensure(self, row: VersionRow, pin: bool = False) -> ServedVersion:
        """The entry of a version row, loaded if needed. The result may be FAILED, or (rarely,
        when it was evicted meanwhile) UNLOADING: callers check its state."""
        while True:
            served = self.served.get(row.serving_name)
            if served is None or served.state == FAILED:
                return await self._load(row, pin)
            served.pinned |= pin
            if served.state == LOADING:
                self.metrics.cache.labels("miss").inc()
                await served.ready.wait()
                return served
            if served.state == UNLOADING and served.removing:
                await served.gone.wait()  # then load it again
                continue
            if served.state == UNLOADING:
                served.state = LOADED  # wanted again while draining: keep it
                log.info("%s is wanted again: kept loaded", served.version)
            self.metrics.cache.labels("hit").inc()
            return served

    async def _load(self, row: VersionRow, pin: bool) -> ServedVersion:
        version = names.version_name(row.adapter_id, row.version)
        served = ServedVersion(version, row.serving_name, pinned=pin)
        self.served[row.serving_name] = served  # before any await: one load per version
        self.metrics.cache.labels("miss").inc()
        started = time.perf_counter()
        try:
            served.engine = await self._engine_for(row, version)
            await self._make_room(served)
            path = await asyncio.to_thread(self._materialise, row)
            await served.engine.load_adapter(AdapterFiles(row.serving_name, path, row.config))
        except Exception as error:
            served.state, served.error = FAILED, f"{type(error).__name__}: {error}"
            if isinstance(error, REFUSALS):
                # Refused (not servable here, no room): said as it is, and not listed.
                served.failure = error
                self.served.pop(row.serving_name, None)
            else:
                served.failure = FailedPrecondition(
                    f"{version} could not be loaded: {served.error}",
                    reason="ADAPTER_NOT_LOADED",
                )
                self.metrics.loads.labels("failed").inc()
                log.warning("loading %s failed: %s", version, served.error)
            served.failure.metadata.setdefault("adapter_version", version)
        else:
            served.state, served.load_time = LOADED, utcnow()
            served.idle.set()
            self.metrics.loads.labels("loaded").inc()
            self.metrics.load_seconds.observe(time.perf_counter() - started)
        finally:
            served.ready.set()
            self._count()
        return served

    async def _engine_for(self, row: VersionRow, version: str) -> Engine:
        """The first engine that serves this version exactly; FAILED_PRECONDITION naming why
        none does."""
        adapter = await asyncio.to_thread(self.registry.get_adapter, f"adapters/{row.adapter_id}")
        if not self._same_model(adapter.base_model):
            raise FailedPrecondition(
                f"{version} is an adapter of {adapter.base_model!r}; this server serves "
                f"{self.base_model!r}",
                reason="ADAPTER_BASE_MODEL_MISMATCH",
            )
        if row.kind != "adapter":
            raise FailedPrecondition(
                f"{version} is a full model, served as a base model of its own",
                reason="NOT_AN_ADAPTER",
            )
        refusals = []
        for engine in self.engines:
            why = engine.refusal(row.config)  # kinds: the registry's report reads the same rules
            if why is None:
                return engine
            refusals.append(f"{engine.name}: {why}")
        raise FailedPrecondition(
            f"{version} cannot be served here ({'; '.join(refusals)})",
            reason="ADAPTER_NOT_SERVABLE",
        )

    def _same_model(self, base_model: str) -> bool:
        if base_model == self.base_model:
            return True
        mine = self.models.find(self.base_model)
        theirs = self.models.find(base_model)
        return mine is not None and theirs is not None and mine.resolve() == theirs.resolve()

    def _materialise(self, row: VersionRow) -> Path:
        """The version's weights and config in a local directory named by its serving name."""
        directory = self.workdir / row.serving_name
        if (directory / "adapter_config.json").exists():
            return directory
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for file in row.files["files"]:
            if file["path"] in WEIGHT_FILES or file["path"].endswith(".safetensors"):
                with (partial / file["path"]).open("wb") as out:
                    for chunk in self.registry.file_chunks(row, file["path"]):
                        out.write(chunk)
        if not (partial / "adapter_config.json").exists():
            (partial / "adapter_config.json").write_text(json.dumps(row.config))
        partial.rename(directory)
        return directory

    async def _make_room(self, incoming: ServedVersion) -> None:
        def occupying() -> list[ServedVersion]:
            return [
                v
                for v in self.served.values()
                if v is not incoming and v.state in (LOADED, LOADING)
            ]

        while len(occupying()) >= self.capacity:
            candidates = [
                v
                for v in occupying()
                if v.state == LOADED and not v.pinned and not v.in_flight and not self.aliases_of(v)
            ]
            if not candidates:
                raise ResourceExhausted(
                    f"all {self.capacity} adapter slots hold pinned, routed or busy versions",
                    reason="ADAPTER_CACHE_FULL",
                )
            victim = min(candidates, key=lambda v: v.last_used)
            self.metrics.evictions.inc()
            await self.unload(victim)

    async def unload(self, served: ServedVersion) -> ServedVersion:
        """Take no new requests for a version, let the ones holding it finish, unload it; a
        version wanted again before that (see `_ensure`) stays loaded."""
        if served.state != LOADED:
            if served.state == UNLOADING:
                await served.gone.wait()
            return served
        served.state = UNLOADING
        for alias in self.aliases_of(served):
            del self.routes[alias]  # routes point at loaded versions only
        served.unload_ticket += 1
        ticket = served.unload_ticket
        while served.in_flight:
            await served.idle.wait()
        if served.state != UNLOADING or served.unload_ticket != ticket:
            return served  # wanted again, or another unload took over
        served.removing = True
        try:
            assert served.engine is not None
            await served.engine.unload_adapter(served.serving_name)
        finally:
            if self.served.get(served.serving_name) is served:
                del self.served[served.serving_name]
            served.gone.set()
            self._count()
        return served

    def _retire(self, served: ServedVersion) -> None:
        """Unload a version in the background once nothing routes to it."""
        if self.aliases_of(served) or served.pinned or served.state != LOADED:
            return
        task = asyncio.create_task(self.unload(served))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _count(self) -> None:
        self.metrics.loaded.set(sum(v.state == LOADED for v in self.served.values()))

    # --- aliases -------------------------------------------------------------------------------

    def _lock(self, alias: str) -> asyncio.Lock:
        return self._alias_locks.setdefault(alias, asyncio.Lock())

    async def route(self, alias: str) -> ServedVersion:
        """Start routing `adapters/{adapter}@{alias}` to its current version, loaded."""
        async with self._lock(alias):
            routed = self.routes.get(alias)
            if routed is not None:
                return routed
            row = await asyncio.to_thread(self.registry.get_version, alias, "adapter")
            served = await self._ensure(row)
            if served.state == FAILED and served.failure is not None:
                raise served.failure
            if served.state == LOADED:
                self.routes[alias] = served
            return served

    async def follow(self, poll_seconds: float, wait: Callable[[float], Any]) -> None:
        """Follow the registry's change feed: alias moves and deletions, deleted versions."""
        self.revision = await asyncio.to_thread(self.registry.latest_revision)
        while True:
            try:
                changes = await asyncio.to_thread(self.registry.changes, self.revision)
            except Exception:
                log.exception("reading the adapter registry's changes failed")
                changes = []
            for change in changes:
                self.revision = change.revision
                try:
                    await self._apply(change.kind, change.payload, change.create_time)
                except Exception:
                    log.exception("following %s %s failed", change.kind, change.payload)
            if not changes:
                await wait(poll_seconds)

    async def _apply(self, kind: str, payload: dict[str, Any], moved_at: datetime) -> None:
        if kind in ("TYPE_ALIAS_MOVED", "TYPE_ALIAS_DELETED"):
            adapter, alias = names.alias_name(payload["alias"])
            routed = f"adapters/{adapter}@{alias}"
            if routed in self.routes:
                await self.swap(routed, payload.get("version"), moved_at)
        elif kind == "TYPE_VERSION_DELETED":
            self._forget(lambda s: s.version == payload["version"])
        elif kind == "TYPE_ADAPTER_DELETED":
            self._forget(lambda s: s.version.startswith(payload["adapter"] + "/versions/"))

    def _forget(self, deleted: Callable[[ServedVersion], bool]) -> None:
        """Unload deleted versions once their requests end."""
        for served in [s for s in self.served.values() if deleted(s)]:
            for alias in self.aliases_of(served):
                del self.routes[alias]
            served.pinned = False
            log.info("%s was deleted: unloading it", served.version)
            self._retire(served)

    async def swap(self, alias: str, target: str | None, moved_at: datetime | None = None) -> None:
        """Follow one move of `alias` to the version `target` (None: the alias was deleted), one
        move at a time per alias. A move that a later one has already superseded in the registry
        is skipped: the later move's own change follows it."""
        async with self._lock(alias):
            old = self.routes.get(alias)
            try:
                row = await asyncio.to_thread(self.registry.get_version, alias, "adapter")
            except NotFound:
                # Its version stays loaded (for requests naming it) until the cache evicts it.
                self.routes.pop(alias, None)
                log.info("%s was deleted: no longer routed", alias)
                return
            version = names.version_name(row.adapter_id, row.version)
            if version != target or (old is not None and old.serving_name == row.serving_name):
                return
            try:
                new = await self._ensure(row)
            except Exception as error:
                new = ServedVersion(version, row.serving_name, state=FAILED, error=str(error))
                self.served.setdefault(row.serving_name, new)
            if new.state != LOADED:
                self.metrics.swaps.labels("failed").inc()
                log.warning(
                    "%s moved to %s, which failed to load; still serving %s",
                    alias,
                    version,
                    old.version if old else None,
                )
                return
            self.routes[alias] = new  # one step: new requests go to the new version
            self.metrics.swaps.labels("swapped").inc()
            if moved_at is not None:
                self.metrics.swap_seconds.observe(max(0.0, (utcnow() - moved_at).total_seconds()))
            log.info("%s now serves %s (was %s)", alias, version, old.version if old else None)
            if old is not None:
                self._retire(old)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
