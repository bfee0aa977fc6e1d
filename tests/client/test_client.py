"""The SDK against a real embedded server: every test runs with the sync `Client` and with the
`AsyncClient` (see `Blocking`), so both pass the same tests."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from tests.client.conftest import UPLOAD_OPTIONS, job_spec
from tests.training.conftest import colour_records
from tunefleet import client as sdk_errors
from tunefleet.client import Client
from tunefleet.v1 import dataset_pb2, training_job_pb2

pytestmark = pytest.mark.timeout(300)
State = training_job_pb2.TrainingJob.State


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_upload_from_a_path_reports_progress(sdk: Client, colours: Path) -> None:
    progress: list[tuple[int, int | None]] = []
    dataset = sdk.datasets.upload(
        colours,
        options=UPLOAD_OPTIONS,
        labels={"team": "sdk"},
        chunk_size=1000,
        on_progress=lambda sent, total: progress.append((sent, total)),
    )
    size = colours.stat().st_size
    assert dataset.display_name == "colours.jsonl"  # the file's name by default
    assert dataset.record_count == 120
    assert dataset.train_record_count + dataset.validation_record_count == 120
    assert dataset.labels["team"] == "sdk"
    assert len(progress) == -(-size // 1000)
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)
    assert progress[-1] == (size, size)
    assert sdk.datasets.get(dataset.name) == dataset
    assert sdk.datasets.get(dataset.name.removeprefix("datasets/")) == dataset  # id alone


def test_upload_from_a_file_object_and_from_bytes(sdk: Client, tmp_path: Path) -> None:
    # Content of its own: the same records and options give the same dataset.
    path = tmp_path / "fresh.jsonl"
    path.write_bytes(colour_records(seed=uuid.uuid4().int % 10**6))
    with path.open("rb") as file:
        from_file = sdk.datasets.upload(file, options=UPLOAD_OPTIONS)
    assert from_file.display_name == "fresh.jsonl"
    with path.open("rb") as file:
        again = sdk.datasets.upload(file, options=UPLOAD_OPTIONS)
    assert again == from_file  # the same upload again: the same dataset
    renamed = sdk.datasets.upload(path.read_bytes(), display_name="b", options=UPLOAD_OPTIONS)
    assert renamed.name != from_file.name and renamed.display_name == "b"
    assert renamed.content_sha256 == from_file.content_sha256  # records stored once
    other = sdk.datasets.upload(
        path.read_bytes(), display_name="b", options={**UPLOAD_OPTIONS, "splitSeed": 9}
    )
    assert other.name not in (from_file.name, renamed.name) and other.display_name == "b"
    sdk.datasets.delete(from_file.name)  # the records it shares stay with the renamed dataset
    assert len(list(sdk.datasets.preview(renamed.name, limit=200))) == renamed.record_count


def test_check_contamination_as_its_docstring_shows(sdk: Client) -> None:
    lines = colour_records(seed=uuid.uuid4().int % 10**6).splitlines(keepends=True)
    options = {"validationFraction": 0}
    train = sdk.datasets.upload(b"".join(lines[:100]), options=options)
    evaluation = sdk.datasets.upload(b"".join(lines[90:]), options=options)
    report = sdk.datasets.check_contamination(train.name, evaluation.name)
    assert report.near_duplicate_threshold == 0.8  # the server's default
    assert (report.evaluation_records, report.exact_overlap) == (30, 10)
    strict = sdk.datasets.check_contamination(
        train.name, evaluation.name, near_duplicate_threshold=1.0
    )
    assert strict.near_duplicate_threshold == 1.0 and strict.exact_overlap == 10
    with pytest.raises(sdk_errors.InvalidArgument) as raised:
        sdk.datasets.check_contamination(train.name, evaluation.name, near_duplicate_threshold=0)
    assert raised.value.field == "near_duplicate_threshold"


def test_list_follows_page_tokens(sdk: Client) -> None:
    label = unique("page")
    names = {
        sdk.datasets.upload(
            json.dumps({"prompt": f"q{i} {label}", "completion": f"a{i}"}).encode() + b"\n",
            labels={"run": label},
            options={"validationFraction": 0},
        ).name
        for i in range(3)
    }
    listed = [d.name for d in sdk.datasets.list(filter=f"labels.run={label}", page_size=1)]
    assert sorted(listed) == sorted(names)


def test_preview_and_delete(sdk: Client, colours: Path) -> None:
    dataset = sdk.datasets.upload(colours, options=UPLOAD_OPTIONS)
    records = list(
        sdk.datasets.preview(dataset.name, split=dataset_pb2.DATASET_SPLIT_VALIDATION, limit=3)
    )
    assert len(records) == 3
    assert all(r.split == dataset_pb2.DATASET_SPLIT_VALIDATION for r in records)
    assert records[0].messages[-1].role == "assistant"
    sdk.datasets.delete(dataset.name)
    with pytest.raises(sdk_errors.NotFound):
        sdk.datasets.get(dataset.name)


def test_errors_carry_code_reason_metadata_and_field(sdk: Client) -> None:
    with pytest.raises(sdk_errors.NotFound) as missing:
        sdk.datasets.get("datasets/0000")
    assert missing.value.code.name == "NOT_FOUND"
    assert missing.value.reason == "NOT_FOUND"
    assert missing.value.metadata == {"name": "datasets/0000"}
    assert str(missing.value) == "NOT_FOUND: datasets/0000 not found"
    assert isinstance(missing.value, sdk_errors.TunefleetError)

    with pytest.raises(sdk_errors.InvalidArgument) as bad:
        sdk.training_jobs.create(
            {"baseModel": "colours", "method": "TRAINING_METHOD_LORA", "adapter": "adapters/x"}
        )
    assert bad.value.field == "training_job.train_dataset"
    assert bad.value.metadata["field"] == "training_job.train_dataset"

    with pytest.raises(sdk_errors.InvalidArgument) as local:  # refused before any call
        sdk.training_jobs.create({"baseModel": "colours", "noSuchField": 1})
    assert local.value.field == "training_job"
    assert "noSuchField" in local.value.message


def test_wait_follows_a_job_to_its_registered_version(sdk: Client, colours: Path) -> None:
    dataset = sdk.datasets.upload(colours, options=UPLOAD_OPTIONS)
    adapter = f"adapters/{unique('colours')}"
    job = sdk.training_jobs.create(job_spec(dataset.name, adapter))
    assert job.state in (State.STATE_VALIDATING, State.STATE_QUEUED, State.STATE_RUNNING)

    seen: list[training_job_pb2.TrainingEvent] = []
    done = sdk.training_jobs.wait(job.name, on_event=seen.append, timeout=240)
    assert done.state == State.STATE_SUCCEEDED, done.error
    assert done.output_adapter_version == f"{adapter}/versions/1"
    states = [State.Name(e.state_change.state) for e in seen if e.HasField("state_change")]
    assert states[-1] == "STATE_SUCCEEDED"
    assert [e.progress.step for e in seen if e.HasField("progress")] == [1, 2, 3, 4]
    assert [e.sequence for e in seen] == sorted({e.sequence for e in seen})  # none twice

    # The same events again, and from a sequence on; a finished job's stream ends.
    replay = list(sdk.training_jobs.events(job.name, follow=False))
    assert [e.sequence for e in replay] == [e.sequence for e in seen]
    later = list(sdk.training_jobs.events(job.name, after_sequence=seen[2].sequence))
    assert [e.sequence for e in later] == [e.sequence for e in seen[3:]]
    assert [c.step for c in sdk.training_jobs.checkpoints(job.name)] == [2, 4]
    assert job.name in [j.name for j in sdk.training_jobs.list(filter="state=SUCCEEDED")]


def test_cancel_and_a_wait_deadline(sdk: Client, colours: Path) -> None:
    dataset = sdk.datasets.upload(colours, options=UPLOAD_OPTIONS)
    job = sdk.training_jobs.create(
        job_spec(dataset.name, f"adapters/{unique('long')}", maxSteps=100000, epochs=1000)
    )
    with pytest.raises(sdk_errors.DeadlineExceeded):
        sdk.training_jobs.wait(job.name, timeout=1.0)
    cancelled = sdk.training_jobs.cancel(job.name)
    assert cancelled.state in (State.STATE_CANCELLING, State.STATE_CANCELLED)
    assert sdk.training_jobs.wait(job.name, timeout=120).state == State.STATE_CANCELLED


@pytest.fixture(scope="module")
def trained(platform: object, colours: Path) -> str:
    """adapters/colours-sdk with one trained version, made with the sync client."""
    from tests.client.conftest import connect

    with connect("sync", platform.target) as client:  # type: ignore[attr-defined]
        dataset = client.datasets.upload(colours, options=UPLOAD_OPTIONS)
        job = client.training_jobs.create(job_spec(dataset.name, "adapters/colours-sdk"))
        job = client.training_jobs.wait(job.name, timeout=240)
        assert job.state == State.STATE_SUCCEEDED, job.error
        return str(job.output_adapter_version)


def test_adapters_versions_aliases_and_download(sdk: Client, trained: str, tmp_path: Path) -> None:
    assert "adapters/colours-sdk" in [a.name for a in sdk.adapters.list()]
    versions = list(sdk.adapters.versions("colours-sdk"))
    assert [v.name for v in versions][-1] == trained
    assert versions[-1].lineage.base_model == "colours"

    alias = unique("stage")
    moved = sdk.adapters.set_alias("colours-sdk", alias, 1, reason="sdk test", expected_version="")
    assert moved.version == trained
    with pytest.raises(sdk_errors.Aborted) as lost:  # compare-and-set against the wrong version
        sdk.adapters.set_alias("colours-sdk", alias, 1, expected_version="")
    assert lost.value.reason == "ALIAS_MOVED"
    assert lost.value.metadata["current_version"] == trained
    same = sdk.adapters.set_alias("colours-sdk", alias, trained, expected_version=1)
    assert same.version == trained
    assert alias in [a.name.rsplit("/", 1)[-1] for a in sdk.adapters.aliases("colours-sdk")]
    assert any(m.reason == "sdk test" for m in sdk.adapters.alias_moves("colours-sdk"))

    paths = sdk.adapters.download(trained, tmp_path / "download")
    files = {p.name: p for p in paths}
    assert "adapter_config.json" in files
    version = sdk.adapters.get_version(trained)
    for file in version.files:
        assert hashlib.sha256(files[file.path].read_bytes()).hexdigest() == file.sha256


def test_uploading_a_folder_refuses_links_out_of_it(
    sdk: Client, trained: str, tmp_path: Path
) -> None:
    folder = tmp_path / "adapter"
    sdk.adapters.download(trained, folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("a password")
    (folder / "README.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="links outside"):
        sdk.adapters.upload_version("colours-sdk", folder)
    (folder / "README.txt").unlink()
    (folder / "README.txt").symlink_to(folder / "adapter_config.json")  # inside: uploaded
    version = sdk.adapters.upload_version("colours-sdk", folder)
    assert "README.txt" in {f.path for f in version.files}


def test_generate_stream_and_feedback(sdk: Client, trained: str) -> None:
    alias = unique("live")
    sdk.adapters.set_alias("colours-sdk", alias, trained)
    routed = f"adapters/colours-sdk@{alias}"
    turns = [{"role": "user", "content": "Which colour goes with the cat?"}]

    whole = sdk.inference.generate(messages=turns, adapter=routed, max_tokens=12)
    assert whole.adapter_version == trained
    pieces = list(sdk.inference.generate_stream(messages=turns, adapter=routed, max_tokens=12))
    assert "".join(p.text_delta for p in pieces) == whole.text  # greedy: the same text
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens
    base = sdk.inference.generate("Which colour", max_tokens=4)
    assert base.adapter_version == ""

    served = {s.adapter_version: s for s in sdk.inference.served()}
    assert routed in served[trained].routed_aliases
    feedback = sdk.inference.feedback(whole.response_id, rating=-1, corrected_text="Colour: red.")
    assert feedback.adapter_version == trained
    assert feedback.name in [
        f.name for f in sdk.inference.list_feedback(filter=f"adapter_version={trained}")
    ]
    with pytest.raises(sdk_errors.InvalidArgument) as both:
        sdk.inference.generate("x", messages=turns)
    assert both.value.field == "input"
