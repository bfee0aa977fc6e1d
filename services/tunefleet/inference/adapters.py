"""The adapters an inference server holds: a bounded cache of loaded versions, the routing of
aliases to versions, and hot-swapping when an alias moves.

- A version loads on first use (one load at a time per version; concurrent requests wait for
  the same load), into the first engine that accepts it (vLLM, then the PEFT engine beside it
  when configured), under the version's immutable serving name from the registry.
- At most `capacity` versions stay loaded: the least recently used one that is not pinned and has
  no request in flight is unloaded to make room. Versions an alias routes to are pinned.
- When a routed alias moves, the new version is loaded, then routing switches in one step;
  requests already running on the old version finish on it, and it is unloaded when the last one
  ends. If the new version fails to load, the alias keeps routing to the old one and the failure
  shows in the served list and the metrics.
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
from tunefleet.runtime.errors import FailedPrecondition, NotFound, ResourceExhausted
from tunefleet.storage.database import utcnow

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED, UNLOADING = "LOADING", "LOADED", "FAILED", "UNLOADING"
WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ServedVersion:
    version: str  # adapters/{adapter}/versions/{n}
    serving_name: str
    state: str = LOADING
    engine: Engine | None = None
    error: str = ""
    pinned: bool = False
    load_time: datetime | None = None
    request_count: int = 0
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    ready: asyncio.Future[None] | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class AdapterPool:
    def __init__(
        self,
        engines: list[Engine],
        registry: Registry,
        base_model: str,
        capacity: int,
        workdir: Path,
        metrics: InferenceMetrics,
    ) -> None:
        self.engines, self.registry, self.base_model = engines, registry, base_model
        self.capacity, self.workdir, self.metrics = capacity, workdir, metrics
        self.versions: dict[str, ServedVersion] = {}
        # One load per version at a time: concurrent first requests share it.
        self._load_locks: dict[str, asyncio.Lock] = {}
        self.routes: dict[str, str] = {}  # adapters/{adapter}@{alias} -> version name
        self.revision = 0  # of the registry's change feed, followed for alias moves
        self._background: set[asyncio.Task[Any]] = set()

    # --- requests ------------------------------------------------------------------------------

    async def acquire(self, reference: str) -> ServedVersion | None:
        """The loaded version a request names (None for the base model), counted in flight until
        `release`. An alias is routed (and followed from then on) on first use."""
        if not reference:
            return None
        version = self.routes.get(reference)
        if version is None:
            ref = names.version_ref(reference, "adapter")
            if ref.alias is not None:
                version = await self.route(reference)
            else:
                version = reference
        served = self.versions.get(version)
        if served is None or served.state == FAILED:
            served = await self.load(version)
        elif served.state == LOADING:
            self.metrics.cache.labels("miss").inc()
            assert served.ready is not None
            await asyncio.shield(served.ready)
        else:
            self.metrics.cache.labels("hit").inc()
        if served.state != LOADED:
            raise FailedPrecondition(
                f"{version} could not be loaded: {served.error}", reason="ADAPTER_NOT_LOADED"
            )
        served.in_flight += 1
        served.request_count += 1
        served.last_used = time.monotonic()
        served.idle.clear()
        return served

    def release(self, served: ServedVersion | None) -> None:
        if served is None:
            return
        served.in_flight -= 1
        if served.in_flight == 0:
            served.idle.set()

    # --- loading -------------------------------------------------------------------------------

    async def load(self, version: str, pin: bool = False) -> ServedVersion:
        """Load a version (or wait for the load under way); raises what refused it."""
        async with self._load_locks.setdefault(version, asyncio.Lock()):
            return await self._load(version, pin)

    async def _load(self, version: str, pin: bool) -> ServedVersion:
        served = self.versions.get(version)
        if served is not None and served.state in (LOADED, LOADING):
            served.pinned |= pin
            if served.ready is not None:
                await asyncio.shield(served.ready)
            return served
        self.metrics.cache.labels("miss").inc()
        row = await asyncio.to_thread(self.registry.get_version, version, "adapter")
        adapter = await asyncio.to_thread(self.registry.get_adapter, f"adapters/{row.adapter_id}")
        if adapter.base_model != self.base_model:
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
        refusals = [(e.name, e.refusal(row.config)) for e in self.engines]
        engine = next(
            (e for e, (_, why) in zip(self.engines, refusals, strict=True) if not why), None
        )
        if engine is None:
            reasons = "; ".join(f"{name}: {why}" for name, why in refusals)
            raise FailedPrecondition(
                f"{version} cannot be served here ({reasons})", reason="ADAPTER_NOT_SERVABLE"
            )
        served = ServedVersion(version, row.serving_name, pinned=pin, engine=engine)
        served.ready = asyncio.get_running_loop().create_future()
        self.versions[version] = served
        started = time.perf_counter()
        try:
            await self._make_room(served)
            path = await asyncio.to_thread(self._materialise, row)
            await engine.load_adapter(AdapterFiles(row.serving_name, path, row.config))
        except Exception as error:
            served.state, served.error = FAILED, f"{type(error).__name__}: {error}"
            self.metrics.loads.labels("failed").inc()
            log.warning("loading %s failed: %s", version, served.error)
        else:
            served.state, served.load_time = LOADED, utcnow()
            self.metrics.loads.labels("loaded").inc()
            self.metrics.load_seconds.observe(time.perf_counter() - started)
        finally:
            served.ready.set_result(None)
            self._count()
        return served

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
        loaded = [v for v in self.versions.values() if v is not incoming and v.state == LOADED]
        while len(loaded) >= self.capacity:
            candidates = [v for v in loaded if not v.pinned and v.in_flight == 0]
            if not candidates:
                raise ResourceExhausted(
                    f"all {self.capacity} adapter slots hold pinned or busy versions",
                    reason="ADAPTER_CACHE_FULL",
                )
            victim = min(candidates, key=lambda v: v.last_used)
            await self.unload(victim.version)
            self.metrics.evictions.inc()
            loaded.remove(victim)

    async def unload(self, version: str) -> ServedVersion:
        """Stop routing new requests to a version, let its in-flight ones finish, unload it."""
        served = self.versions.get(version)
        if served is None:
            raise NotFound(f"{version} is not loaded on this server")
        if served.state == LOADED:
            served.state = UNLOADING
            if served.in_flight:
                await served.idle.wait()
            assert served.engine is not None
            await served.engine.unload_adapter(served.serving_name)
        self.versions.pop(version, None)
        for alias in [a for a, v in self.routes.items() if v == version]:
            del self.routes[alias]
        self._count()
        return served

    def _count(self) -> None:
        self.metrics.loaded.set(sum(v.state == LOADED for v in self.versions.values()))

    # --- aliases -------------------------------------------------------------------------------

    async def route(self, alias: str) -> str:
        """Start routing `adapters/{adapter}@{alias}`: its current version, loaded and pinned."""
        row = await asyncio.to_thread(self.registry.get_version, alias, "adapter")
        version = names.version_name(row.adapter_id, row.version)
        if alias not in self.routes:
            await self.load(version, pin=True)
            self.routes.setdefault(alias, version)
        return self.routes[alias]

    def aliases_of(self, version: str) -> list[str]:
        return sorted(a for a, v in self.routes.items() if v == version)

    async def follow(self, poll_seconds: float, wait: Callable[[float], Any]) -> None:
        """Follow the registry's change feed for moves of the aliases this server routes."""
        self.revision = await asyncio.to_thread(self._latest_revision)
        while True:
            try:
                changes = await asyncio.to_thread(self.registry.changes, self.revision)
            except Exception:
                log.exception("reading the adapter registry's changes failed")
                changes = []
            for change in changes:
                self.revision = change.revision
                if change.kind in ("TYPE_ALIAS_MOVED", "TYPE_ALIAS_DELETED"):
                    adapter, alias = names.alias_name(change.payload["alias"])
                    routed = f"adapters/{adapter}@{alias}"
                    if routed not in self.routes:
                        continue
                    if change.kind == "TYPE_ALIAS_MOVED":
                        await self.swap(routed, change.payload["version"], change.create_time)
                    else:
                        self.unroute(routed)
            if not changes:
                await wait(poll_seconds)

    def _latest_revision(self) -> int:
        from tunefleet.adapters.registry import TOPIC
        from tunefleet.storage.changes import latest_revision

        with self.registry.db.session() as session:
            return latest_revision(session, TOPIC)

    async def swap(self, alias: str, version: str, moved_at: datetime) -> None:
        old = self.routes.get(alias)
        if old == version:
            return
        try:
            new = await self.load(version, pin=True)
        except Exception as error:
            new = ServedVersion(version, "", state=FAILED, error=str(error))
            self.versions.setdefault(version, new)
        if new.state != LOADED:
            self.metrics.swaps.labels("failed").inc()
            log.warning(
                "%s moved to %s, which failed to load; still serving %s", alias, version, old
            )
            return
        self.routes[alias] = version  # one step: new requests go to the new version
        self.metrics.swaps.labels("swapped").inc()
        self.metrics.swap_seconds.observe(max(0.0, (utcnow() - moved_at).total_seconds()))
        log.info("%s now serves %s (was %s)", alias, version, old)
        if old is not None and not self.aliases_of(old):
            retired = self.versions.get(old)
            if retired is not None:
                retired.pinned = False
                task = asyncio.create_task(self.unload(old))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def unroute(self, alias: str) -> None:
        """Stop routing a deleted alias; its version stays loaded (unpinned) for the cache."""
        version = self.routes.pop(alias, None)
        if version is not None and not self.aliases_of(version) and version in self.versions:
            self.versions[version].pinned = False
        log.info("%s was deleted: no longer routed", alias)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
