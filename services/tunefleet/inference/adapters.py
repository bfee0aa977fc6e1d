"""The adapters an inference server holds: a bounded cache of loaded versions, the routing of
aliases to versions, and hot-swapping when an alias moves.

The rules that keep every response answered by the weights of the version stamped on it:
- Everything comes from AdapterService's public RPCs (`inference/peers.py`), never its tables.
- A loaded version is known by its serving name, which the registry derives from the version's
  content and never reuses; a version name is resolved to it on every request, so a deleted and
  re-created `adapters/x/versions/1` with other bytes is a different entry, and a deleted version
  answers NOT_FOUND at once. While AdapterService cannot answer, a version already loaded goes on
  serving requests that name it.
- A request holds a reference to the loaded version it was routed to until it ends
  (`acquire`/`release`): unloading waits for the last reference, and a version being unloaded
  takes no new ones. Routes only ever point at loaded versions.
- Alias moves arrive pushed on `WatchAdapterChanges`, which resumes after its last revision when
  the stream breaks (AdapterService restarting loses no move). They are serialised per alias and
  converge on the alias's current target in the registry: the new version is loaded, routing
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
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunefleet.core import names
from tunefleet.core.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    TunefleetError,
    Unavailable,
)
from tunefleet.inference.engine import AdapterFiles, Engine
from tunefleet.inference.metrics import InferenceMetrics
from tunefleet.inference.peers import AdapterServiceClient, Version
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.storage.database import utcnow
from tunefleet.v1 import adapter_pb2

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
        registry: AdapterServiceClient,
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
        # Aliases with a canary: adapters/{a}@{alias} -> (adapters/{a}@{other}, percent), read
        # when an alias is first routed and kept up to date by the change feed; `_canary_news`
        # counts the feed's canary changes per alias, so that a read overtaken by one is dropped.
        self.canaries: dict[str, tuple[str, int]] = {}
        self._canary_news: dict[str, int] = {}
        self._alias_locks: dict[str, asyncio.Lock] = {}
        self.revision = -1  # of the registry's change feed (-1: from its newest change on)
        self.following = asyncio.Event()  # the watch is open: moves from now on are seen
        self._background: set[asyncio.Task[Any]] = set()
        # Read by the metrics endpoint's thread: a copy in one step, never a dict that changes.
        metrics.routes.source = lambda: {a: s.version for a, s in list(self.routes.items())}

    # --- requests ------------------------------------------------------------------------------

    async def acquire(
        self, reference: str, routing_key: str = "", split: bool = True
    ) -> ServedVersion | None:
        """The loaded version a request names (None for the base model), held until `release`.
        An alias is routed (and followed from then on) on first use. With `split`, a request for
        an alias with a canary goes to the canary's version for its share of the requests (drawn
        from `routing_key` when given, so that one key always lands on one side); a canary that
        cannot answer (its alias gone, its version failing to load) leaves the request on the
        alias's own version."""
        if not reference:
            return None
        ref = names.version_ref(reference, "adapter")
        for _ in range(MAX_ROUTING_TRIES):
            if ref.alias is not None:
                served = self.routes.get(reference) or await self.route(reference)
                if split and served.state == LOADED:
                    served = await self._canary(reference, routing_key) or served
            else:
                served = await self._version(reference)
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

    async def _version(self, name: str) -> ServedVersion:
        """The entry of a version name, resolved now; while AdapterService cannot answer, the
        copy already loaded (if any)."""
        try:
            info = await self.registry.version(name)
        except Unavailable:
            loaded = [s for s in self.find(name) if s.state == LOADED]
            if not loaded:
                raise
            log.warning("AdapterService is unavailable: serving %s as loaded", name)
            return loaded[0]
        return await self._ensure(info)

    async def _canary(self, alias: str, routing_key: str) -> ServedVersion | None:
        """The canary's loaded version when this request is drawn for it, else None."""
        split = self.canaries.get(alias)
        if split is None or not _drawn(alias, routing_key, split[1]):
            return None
        other, _ = split
        try:
            served = self.routes.get(other) or await self.route(other)
        except TunefleetError as error:
            log.warning(
                "%s's canary %s cannot answer (%s): served by %s", alias, other, error, alias
            )
            return None
        return served if served.state == LOADED else None

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
        served = await self._ensure(await self.registry.version(version), pin)
        if served.state == FAILED and served.failure is not None:
            raise served.failure
        return served

    async def _ensure(self, info: Version, pin: bool = False) -> ServedVersion:
        """The entry of a version, loaded if needed. The result may be FAILED, or (rarely,
        when it was evicted meanwhile) UNLOADING: callers check its state."""
        self.metrics.version_seen(info.name)
        # Also for a loaded entry: the same bytes may come back in an adapter created again
        # for another base model.
        self._check_model(info)
        while True:
            served = self.served.get(info.serving_name)
            if served is None or served.state == FAILED:
                return await self._load(info, pin)
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

    async def _load(self, info: Version, pin: bool) -> ServedVersion:
        version = info.name
        served = ServedVersion(version, info.serving_name, pinned=pin)
        self.served[info.serving_name] = served  # before any await: one load per version
        self.metrics.cache.labels("miss").inc()
        started = time.perf_counter()
        try:
            path = await self._materialise(info)
            config = json.loads(await asyncio.to_thread((path / "adapter_config.json").read_text))
            served.engine = self._engine_for(version, config)
            await self._make_room(served)
            await served.engine.load_adapter(AdapterFiles(info.serving_name, path, config))
        except Exception as error:
            served.state, served.error = FAILED, f"{type(error).__name__}: {error}"
            if isinstance(error, REFUSALS):
                # Refused (not servable here, no room): said as it is, and not listed.
                served.failure = error
                self.served.pop(info.serving_name, None)
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

    def _check_model(self, info: Version) -> None:
        """FAILED_PRECONDITION unless the version is an adapter of the model served here."""
        if not self._same_model(info.base_model):
            raise FailedPrecondition(
                f"{info.name} is an adapter of {info.base_model!r}; this server serves "
                f"{self.base_model!r}",
                reason="ADAPTER_BASE_MODEL_MISMATCH",
                metadata={"adapter_version": info.name},
            )
        if info.full_model:
            raise FailedPrecondition(
                f"{info.name} is a full model (merged or quantized), not an adapter: it is served "
                "as a base model of its own",
                reason="NOT_AN_ADAPTER",
                metadata={"adapter_version": info.name},
            )

    def _engine_for(self, version: str, config: dict[str, Any]) -> Engine:
        """The first engine that serves this version exactly; FAILED_PRECONDITION naming why
        none does."""
        refusals = []
        for engine in self.engines:
            why = engine.refusal(config)  # kinds: the registry's report reads the same rules
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

    async def _materialise(self, info: Version) -> Path:
        """The version's weights and config in a local directory named by its serving name,
        downloaded from AdapterService."""
        directory = self.workdir / info.serving_name
        if await asyncio.to_thread((directory / "adapter_config.json").exists):
            return directory
        partial = directory.with_name(directory.name + ".partial")
        await asyncio.to_thread(shutil.rmtree, partial, True)
        await asyncio.to_thread(partial.mkdir, parents=True)
        paths = [
            file.path
            for file in info.files
            if file.path in WEIGHT_FILES or file.path.endswith(".safetensors")
        ]
        if "adapter_config.json" not in paths:
            raise FailedPrecondition(
                f"{info.name} has no adapter_config.json", reason="ADAPTER_NOT_SERVABLE"
            )
        await self.registry.download(info, paths, partial)
        await asyncio.to_thread(partial.rename, directory)
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
            served = await self._ensure(await self.registry.version(alias))
            if served.state == FAILED and served.failure is not None:
                raise served.failure
            if served.state == LOADED:
                await self._read_canary(alias)
                self.routes[alias] = served
            return served

    async def _read_canary(self, alias: str) -> None:
        """The alias's canary as AdapterService has it now, unless the feed brought a newer one
        while it was read."""
        news = self._canary_news.get(alias, 0)
        try:
            canary = await self.registry.canary(alias)
        except NotFound:  # deleted meanwhile: requests for it say so themselves
            canary = None
        except TunefleetError as error:  # the feed brings it once AdapterService answers again
            log.warning("cannot read %s's canary: %s", alias, error)
            return
        if self._canary_news.get(alias, 0) == news:
            self._set_canary(alias, canary)

    def _set_canary(self, alias: str, canary: adapter_pb2.AliasCanary | None) -> None:
        if canary is None or not canary.percent:
            self.canaries.pop(alias, None)
            return
        adapter = alias.split("@")[0]
        self.canaries[alias] = (f"{adapter}@{canary.alias}", canary.percent)

    async def follow(self) -> None:
        """Follow AdapterService's change feed for ever: alias moves and deletions, deleted
        versions. `following` is set once the watch is open."""
        async for change in self.registry.changes(self.revision, on_connect=self._connected):
            self.revision = change.revision
            try:
                await self._apply(change)
            except Exception:
                log.exception("following change %d (%s) failed", change.revision, change.type)

    async def _connected(self, revision: int) -> None:
        again = self.following.is_set()
        self.revision = revision
        self.following.set()
        if again:  # resumed after a break: the feed brings what was missed; make sure of it
            for alias in list(self.routes):
                await self.swap(alias, None, current=True)
                await self._read_canary(alias)

    async def _apply(self, change: adapter_pb2.AdapterChange) -> None:
        kinds = adapter_pb2.AdapterChange
        if change.type in (kinds.TYPE_ALIAS_MOVED, kinds.TYPE_ALIAS_DELETED):
            adapter, alias = names.alias_name(change.alias)
            routed = f"adapters/{adapter}@{alias}"
            if routed in self.routes:
                moved_at = change.time.ToDatetime(tzinfo=UTC)
                await self.swap(routed, change.version or None, moved_at)
        elif change.type == kinds.TYPE_ALIAS_CANARY_CHANGED:
            adapter, alias = names.alias_name(change.alias)
            routed = f"adapters/{adapter}@{alias}"
            self._canary_news[routed] = self._canary_news.get(routed, 0) + 1
            self._set_canary(routed, change.canary if change.HasField("canary") else None)
            log.info("%s's canary is now %s", routed, self.canaries.get(routed))
        elif change.type == kinds.TYPE_VERSION_CREATED:
            self._prefetch(change.adapter, change.version)
        elif change.type == kinds.TYPE_VERSION_DELETED:
            self._forget(lambda s: s.version == change.version)
        elif change.type == kinds.TYPE_ADAPTER_DELETED:
            self._forget(lambda s: s.version.startswith(change.adapter + "/versions/"))

    def _prefetch(self, adapter: str, version: str) -> None:
        """Load a new version of an adapter served here through an alias, in the background and
        only into a free slot (nothing is evicted for it): the likely next target of the alias,
        so promoting it needs no load."""
        if not any(alias.startswith(f"{adapter}@") for alias in self.routes) or self.find(version):
            return
        if sum(v.state in (LOADED, LOADING) for v in self.served.values()) >= self.capacity:
            return
        task = asyncio.create_task(self._load_ahead(version))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _load_ahead(self, version: str) -> None:
        try:
            await self._ensure(await self.registry.version(version))
        except Exception as error:  # a request for it will say why; nothing is waiting now
            log.info("%s was not loaded ahead: %s", version, error)

    def _forget(self, deleted: Callable[[ServedVersion], bool]) -> None:
        """Unload deleted versions once their requests end."""
        for served in [s for s in self.served.values() if deleted(s)]:
            for alias in self.aliases_of(served):
                del self.routes[alias]
            served.pinned = False
            log.info("%s was deleted: unloading it", served.version)
            self._retire(served)

    async def swap(
        self,
        alias: str,
        target: str | None,
        moved_at: datetime | None = None,
        *,
        current: bool = False,
    ) -> None:
        """Follow one move of `alias` to the version `target` (None: the alias was deleted), one
        move at a time per alias. A move that a later one has already superseded in the registry
        is skipped: the later move's own change follows it. With `current`, follow the alias to
        wherever it points now."""
        async with self._lock(alias):
            old = self.routes.get(alias)
            loaded = [s for s in self.find(target or "") if s.state == LOADED]
            if loaded and not current:
                # Pushed moves arrive in order, so the last one wins without asking where the
                # alias points now; a target already loaded needs no call at all.
                if old is not loaded[0]:
                    self._route(alias, old, loaded[0], moved_at)
                return
            try:
                info = await self.registry.version(alias)
            except NotFound:
                # Its version stays loaded (for requests naming it) until the cache evicts it.
                self.routes.pop(alias, None)
                log.info("%s was deleted: no longer routed", alias)
                return
            version = info.name
            if (version != target and not current) or (
                old is not None and old.serving_name == info.serving_name
            ):
                return
            try:
                new = await self._ensure(info)
            except Exception as error:
                new = ServedVersion(version, info.serving_name, state=FAILED, error=str(error))
                self.served.setdefault(info.serving_name, new)
            if new.state != LOADED:
                self.metrics.swaps.labels("failed").inc()
                log.warning(
                    "%s moved to %s, which failed to load; still serving %s",
                    alias,
                    version,
                    old.version if old else None,
                )
                return
            self._route(alias, old, new, moved_at)

    def _route(
        self,
        alias: str,
        old: ServedVersion | None,
        new: ServedVersion,
        moved_at: datetime | None,
    ) -> None:
        """Point `alias` at the loaded `new` in one step: new requests go there, those holding
        `old` finish on it. `old` stays loaded as any other cached version (evicted least
        recently used first), so moving the alias back (a rollback) needs no load."""
        self.routes[alias] = new
        self.metrics.swaps.labels("swapped").inc()
        if moved_at is not None:
            self.metrics.swap_seconds.observe(max(0.0, (utcnow() - moved_at).total_seconds()))
        log.info("%s now serves %s (was %s)", alias, new.version, old.version if old else None)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.registry.close()


def _drawn(alias: str, routing_key: str, percent: int) -> bool:
    """Whether a request goes to the canary: by its key (one key, one side), else at random."""
    if not routing_key:
        return random.random() * 100 < percent  # noqa: S311 - a traffic split, not a secret
    digest = hashlib.sha256(f"{alias}\n{routing_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent
