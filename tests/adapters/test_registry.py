"""Versions, aliases, lineage and the change feed, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.adapters.conftest import MakeAdapter
from tests.adapters.test_validation import upload
from tunefleet.adapters.manager import AdapterManager
from tunefleet.core.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound


@pytest.fixture
def three_versions(registry: AdapterManager, make_adapter: MakeAdapter) -> AdapterManager:
    registry.create_adapter("support", "tiny-llama", "support bot", {"team": "ml"})
    for seed in (1, 2, 3):
        upload(registry, make_adapter(seed=seed, target_modules=["q_proj", "v_proj"]))
    return registry


def test_versions_are_numbered_and_immutable(three_versions: AdapterManager) -> None:
    registry = three_versions
    rows = [registry.get_version(f"adapters/support/versions/{n}") for n in (1, 2, 3)]
    assert [r.version for r in rows] == [1, 2, 3]
    assert len({r.serving_name for r in rows}) == 3
    assert rows[0].serving_name.startswith("support-v1-")
    assert registry.get_adapter("adapters/support").latest_version == 3
    with pytest.raises(AlreadyExists):
        registry.create_adapter("support", "tiny-llama", "", {})


def test_aliases_resolve_move_and_are_audited(three_versions: AdapterManager) -> None:
    registry = three_versions
    registry.aliases.set_alias(
        "adapters/support/aliases/prod", "adapters/support/versions/1", "first", "ann"
    )
    assert registry.get_version("adapters/support@prod").version == 1
    registry.aliases.set_alias(
        "adapters/support/aliases/prod",
        "adapters/support/versions/3",
        "better",
        "bob",
        expected_version="adapters/support/versions/1",
    )
    assert registry.get_version("adapters/support@prod").version == 3
    with pytest.raises(Aborted) as raised:
        registry.aliases.set_alias(
            "adapters/support/aliases/prod",
            "adapters/support/versions/2",
            "",
            "eve",
            expected_version="adapters/support/versions/1",
        )
    assert raised.value.metadata["current_version"] == "adapters/support/versions/3"
    moves = registry.aliases.list_moves("adapters/support", 10, "").items
    assert [(m.from_version, m.to_version, m.actor, m.reason) for m in moves] == [
        (1, 3, "bob", "better"),
        (None, 1, "ann", "first"),
    ]
    with pytest.raises(FailedPrecondition):
        registry.delete_version("adapters/support/versions/3")
    with pytest.raises(FailedPrecondition):
        registry.delete_adapter("adapters/support")
    registry.delete_version("adapters/support/versions/2")
    with pytest.raises(NotFound):
        registry.get_version("adapters/support/versions/2")


def test_concurrent_movers_are_atomic_and_audited(three_versions: AdapterManager) -> None:
    registry = three_versions
    alias = "adapters/support/aliases/prod"
    registry.aliases.set_alias(alias, "adapters/support/versions/1", "start", "init")
    barrier = threading.Barrier(6)
    wins: list[tuple[str, str]] = []
    lock = threading.Lock()

    def mover(worker: int) -> None:
        rng = random.Random(worker)
        barrier.wait()
        for _ in range(8):
            current = (
                f"adapters/support/versions/{registry.get_version('adapters/support@prod').version}"
            )
            target = f"adapters/support/versions/{rng.choice([1, 2, 3])}"
            try:
                registry.aliases.set_alias(
                    alias, target, f"w{worker}", f"worker-{worker}", expected_version=current
                )
            except Aborted:
                continue
            with lock:
                wins.append((current, target))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(mover, range(6)))
    moves = sorted(registry.aliases.list_moves(alias, 1000, "").items, key=lambda m: m.revision)
    assert len(moves) == len(wins) + 1
    # Every move starts where the previous one ended: no lost update.
    for before, after in itertools.pairwise(moves):
        assert after.from_version == before.to_version
    assert registry.get_version("adapters/support@prod").version == moves[-1].to_version


def test_change_feed_resumes_without_gaps(three_versions: AdapterManager) -> None:
    registry = three_versions
    first = registry.changes(0)
    assert [c.kind for c in first] == ["TYPE_ADAPTER_CREATED"] + ["TYPE_VERSION_CREATED"] * 3
    registry.aliases.set_alias(
        "adapters/support/aliases/prod", "adapters/support/versions/2", "", "a"
    )
    registry.aliases.delete_alias("adapters/support/aliases/prod", "rollback", "a")
    later = registry.changes(first[-1].revision)
    assert [c.kind for c in later] == ["TYPE_ALIAS_MOVED", "TYPE_ALIAS_DELETED"]
    assert [c.revision for c in first + later] == list(range(1, 7))
    assert later[0].payload["version"] == "adapters/support/versions/2"


def test_lineage_is_queryable_both_ways(
    registry: AdapterManager, make_adapter: MakeAdapter
) -> None:
    registry.create_adapter("a", "tiny-llama", "", {})
    registry.create_adapter("b", "tiny-llama", "", {})
    adapter = make_adapter(target_modules=["q_proj"])

    def register(name: str, datasets: list[str], job: str) -> None:
        up = registry.begin_upload(
            f"adapters/{name}",
            "",
            {
                "datasets": datasets,
                "training_job": job,
                "base_model": "tiny-llama",
                "method": "TRAINING_METHOD_LORA",
                "metrics": {"validation_loss": 1.5},
            },
        )
        for file in sorted(adapter.iterdir()):
            up.start_file(file.name, 0, "")
            up.write(file.read_bytes())
        registry.finish_upload(up)

    register("a", ["datasets/ds-1"], "trainingJobs/j1")
    register("b", ["datasets/ds-1", "datasets/ds-2"], "trainingJobs/j2")
    register("b", ["datasets/ds-2"], "trainingJobs/j3")
    from_ds1 = registry.list_versions("adapters/-", 'lineage.datasets:"datasets/ds-1"', 10, "")
    assert sorted((v.adapter_id, v.version) for v in from_ds1.items) == [("a", 1), ("b", 1)]
    by_job = registry.list_versions(
        "adapters/b", 'lineage.training_job = "trainingJobs/j3"', 10, ""
    )
    assert [(v.adapter_id, v.version) for v in by_job.items] == [("b", 2)]
    assert by_job.items[0].lineage["metrics"] == {"validation_loss": 1.5}


def test_a_stored_blob_that_changed_is_detected(
    three_versions: AdapterManager, tmp_path: Path
) -> None:
    registry = three_versions
    row = registry.get_version("adapters/support/versions/1")
    weights = next(f for f in row.files["files"] if f["path"] == "adapter_model.safetensors")
    blob = tmp_path / "blobs" / "sha256" / weights["sha256"][:2] / weights["sha256"]
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    from tunefleet.core.errors import DataLoss

    with pytest.raises(DataLoss):
        b"".join(registry.file_chunks(row, "adapter_model.safetensors"))
