"""Every `tunefleet` command, run as the real installed binary against a real embedded server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import pytest

from tests.client.conftest import chat_model, colours, platform
from tests.helpers import free_port
from tunefleet.cli.main import cli
from tunefleet.cli.output import Settings
from tunefleet.demo.server import LocalServer
from tunefleet.storage.blobs import LocalBlobStore

__all__ = ["chat_model", "colours", "platform"]  # fixtures shared with the SDK's tests
pytestmark = pytest.mark.timeout(300)
TUNEFLEET = Path(sys.executable).with_name("tunefleet")


def tunefleet(
    server: LocalServer | None, *args: str, input: str | None = None, code: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run the binary; assert its exit code."""
    env = {**os.environ, "COLUMNS": "200"}
    if server is not None:
        env["TUNEFLEET_TARGET"] = server.target
    result = subprocess.run(
        [str(TUNEFLEET), *args],
        capture_output=True,
        text=True,
        input=input,
        env=env,
        timeout=280,
        check=False,
    )
    assert result.returncode == code, f"{args}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


def test_every_command_has_help() -> None:
    paths = command_paths(cli)
    assert {("datasets", "upload"), ("jobs", "logs"), ("adapters", "alias", "set")} <= set(paths)
    assert len(paths) >= 20
    for path in [(), *paths]:
        result = tunefleet(None, *path, "--help")
        assert "Usage: tunefleet" in result.stdout, path


def test_malformed_key_value_flags_are_refused_before_any_call() -> None:
    """No server is reachable: the refusal comes from the flag itself (exit 2, naming it)."""
    label = tunefleet(None, "adapters", "create", "a", "--base-model", "m", "--label", "x", code=2)
    assert "--label" in label.stderr and "KEY=VALUE" in label.stderr
    files = tunefleet(None, "adapters", "register", "a", "--file", "p=u", "--file", "p=v", code=2)
    assert "--file" in files.stderr and "each path once" in files.stderr


def test_datasets_commands(platform: LocalServer, colours: Path) -> None:
    upload = tunefleet(
        platform,
        "datasets",
        "upload",
        str(colours),
        "--validation-fraction",
        "0.2",
        "--keep-duplicates",
        "--label",
        "suite=cli",
    )
    assert "uploaded colours.jsonl" in upload.stdout
    assert "records" in upload.stdout and "120 (" in upload.stdout

    uploaded = as_json(
        tunefleet(
            platform,
            "datasets",
            "upload",
            str(colours),
            "--name",
            "scripted",
            "--keep-duplicates",
            "--validation-fraction",
            "0.25",  # other options: another dataset (the same ones give the same dataset)
            "-o",
            "json",
        )
    )
    name = uploaded["name"]
    assert uploaded["display_name"] == "scripted"
    assert uploaded["record_count"] == "120"  # int64 in protobuf JSON is a string

    listed = tunefleet(platform, "datasets", "list", "--filter", "labels.suite=cli")
    assert "colours.jsonl" in listed.stdout and "scripted" not in listed.stdout
    names = [d["name"] for d in as_json(tunefleet(platform, "datasets", "list", "-o", "json"))]
    assert name in names
    assert as_json(tunefleet(platform, "datasets", "get", name, "-o", "json"))["name"] == name
    assert "rejected 0" in tunefleet(platform, "datasets", "get", name).stdout

    preview = tunefleet(
        platform, "datasets", "preview", name, "--split", "validation", "--limit", "2", "-o", "json"
    )
    records = [json.loads(line) for line in preview.stdout.splitlines()]
    assert len(records) == 2 and {r["split"] for r in records} == {"DATASET_SPLIT_VALIDATION"}
    shown = tunefleet(platform, "datasets", "preview", name, "--limit", "1").stdout
    assert "assistant: Colour:" in shown

    assert tunefleet(platform, "datasets", "delete", name).stdout.strip() == f"deleted {name}"
    missing = tunefleet(platform, "datasets", "get", name, code=1)
    assert missing.stderr.strip() == f"error: NOT_FOUND: {name} not found"
    assert missing.stdout == ""


def test_datasets_upload_options_and_contamination(
    platform: LocalServer, colours: Path, tmp_path: Path
) -> None:
    """Every upload option reaches the server; contamination of an evaluation set is counted."""
    lines = colours.read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[:80]) + "\n")
    held_out = tmp_path / "held_out.jsonl"  # 10 records that are in train, 20 that are not
    held_out.write_text("\n".join(lines[70:100]) + "\n")

    def uploaded(path: Path, *options: str) -> dict[str, Any]:
        result = tunefleet(platform, "datasets", "upload", str(path), *options, "-o", "json")
        return dict(as_json(result))

    evaluation = uploaded(held_out, "--format", "openai_chat", "--validation-fraction", "0")
    training = uploaded(
        train,
        *("--format", "openai_chat", "--seed", "7", "--invalid-records", "reject"),
        *("--min-records", "50", "--max-record-chars", "5000"),
        *("--near-duplicate-threshold", "0.9", "--validation-dataset", evaluation["name"]),
    )
    options = training["options"]
    assert options["format"] == "DATASET_FORMAT_OPENAI_CHAT"
    assert options["split_seed"] == "7" and options["min_record_count"] == "50"
    assert options["invalid_record_policy"] == "INVALID_RECORD_POLICY_REJECT"
    assert options["max_record_chars"] == "5000"
    assert options["near_duplicate_threshold"] == 0.9
    assert options["validation_dataset"] == evaluation["name"]

    report = as_json(
        tunefleet(
            platform,
            "datasets",
            "contamination",
            training["name"],
            evaluation["name"],
            "-o",
            "json",
        )
    )
    assert report["evaluation_records"] == "30" and report["exact_overlap"] == "10"
    shown = tunefleet(platform, "datasets", "contamination", training["name"], evaluation["name"])
    assert "10 (33.3%)" in shown.stdout
    refused = tunefleet(
        platform,
        *("datasets", "contamination", training["name"], evaluation["name"]),
        *("--near-duplicate-threshold", "1.5"),
        code=2,
    )
    assert "near_duplicate_threshold" in refused.stderr

    # A bad line under --invalid-records reject refuses the upload: exit 2 with the reason.
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines[:20]) + "\n{not json\n")
    rejected = tunefleet(
        platform, "datasets", "upload", str(broken), "--invalid-records", "reject", code=2
    )
    assert "INVALID_ARGUMENT" in rejected.stderr and "line 21" in rejected.stderr

    ready = tunefleet(platform, "datasets", "list", "--filter", "state=READY", "-o", "json")
    assert training["name"] in [d["name"] for d in as_json(ready)]
    none = tunefleet(platform, "datasets", "list", "--filter", "state=PROCESSING", "-o", "json")
    assert as_json(none) == []
    plain = tunefleet(platform, "datasets", "get", evaluation["name"]).stdout
    assert "not measured (no tokenizer model given)" in plain

    # Preference pairs stay pairs unless asked otherwise.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"Colour {i}?", "chosen": "Red.", "rejected": "Blue."}) + "\n"
            for i in range(10)
        )
    )
    preference = uploaded(pairs)
    assert preference["kind"] == "DATASET_KIND_PREFERENCE"
    pair = tunefleet(platform, "datasets", "preview", preference["name"], "--limit", "1").stdout
    assert "chosen: Red." in pair and "rejected: Blue." in pair
    assert uploaded(pairs, "--kind", "sft")["kind"] == "DATASET_KIND_SFT"


def test_a_rejection_of_10000_bad_lines_exits_2_with_its_reason_every_time(
    platform: LocalServer, tmp_path: Path
) -> None:
    """The CLI's own code, run in this process 100 times (the binary's start-up is tested
    above): the reason reaches the terminal and the exit code is 2, every time."""
    from click.testing import CliRunner

    path = tmp_path / "wrong-format.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": f"question {i} " + "x" * 80, "reply": f"answer {i}"}) + "\n"
            for i in range(10_000)
        )
    )
    runner = CliRunner()
    for _ in range(100):
        result = runner.invoke(
            cli,
            ["datasets", "upload", str(path), "--format", "alpaca"],
            env={"TUNEFLEET_TARGET": platform.target},
        )
        assert result.exit_code == 2, result.output
        assert "INVALID_ARGUMENT DATASET_REJECTED" in result.output


def upload(platform: LocalServer, colours: Path) -> str:
    result = tunefleet(
        platform,
        "datasets",
        "upload",
        str(colours),
        "--keep-duplicates",
        "--validation-fraction",
        "0.2",
        "-o",
        "json",
    )
    return str(as_json(result)["name"])


JOB = [
    *("--base-model", "colours", "--rank", "8", "--learning-rate", "0.01"),
    *("--micro-batch-size", "8", "--max-sequence-length", "64"),
    *("--eval-every-steps", "2", "--max-steps", "4"),
]  # fmt: skip


def create_job(
    platform: LocalServer,
    dataset: str,
    adapter: str,
    *options: str,
    job: Sequence[str] = JOB,
    code: int = 0,
) -> subprocess.CompletedProcess[str]:
    """`tunefleet jobs create` of a small job (`job`'s flags) training `adapter` on `dataset`."""
    command = ["jobs", "create", *job, "--dataset", dataset, "--adapter", adapter, *options]
    return tunefleet(platform, *command, code=code)


def test_jobs_commands(platform: LocalServer, colours: Path) -> None:
    dataset = upload(platform, colours)
    out = create_job(platform, dataset, "adapters/cli", "--follow").stdout
    assert out.startswith("created trainingJobs/")
    job = out.split()[1]
    assert "SUCCEEDED" in out and "step     4/4" in out
    assert f"{job} SUCCEEDED adapters/cli/versions/1" in out

    listed = tunefleet(platform, "jobs", "list", "--filter", "state=SUCCEEDED")
    assert job in listed.stdout and "4/4" in listed.stdout
    got = as_json(tunefleet(platform, "jobs", "get", job, "-o", "json"))
    assert got["state"] == "STATE_SUCCEEDED"
    assert got["output_adapter_version"] == "adapters/cli/versions/1"
    assert "validation loss" in tunefleet(platform, "jobs", "get", job).stdout

    logs = tunefleet(platform, "jobs", "logs", job).stdout
    assert "RUNNING" in logs and "checkpoint at step 4" in logs and "  | " in logs
    events = tunefleet(platform, "jobs", "logs", job, "--follow", "-o", "json").stdout
    steps = [
        json.loads(line)["progress"]["step"] for line in events.splitlines() if '"progress"' in line
    ]
    assert steps == ["1", "2", "3", "4"]

    endless = [*JOB[:-2], "--max-steps", "100000", "--epochs", "1000"]
    long = as_json(create_job(platform, dataset, "adapters/cli-long", "-o", "json", job=endless))
    cancelled = tunefleet(platform, "jobs", "cancel", long["name"])
    assert cancelled.stdout.split()[-1] in ("CANCELLING", "CANCELLED")
    # Following a job that does not succeed exits non-zero.
    followed = tunefleet(platform, "jobs", "logs", long["name"], "--follow", code=1)
    assert f"{long['name']} CANCELLED" in followed.stdout

    invalid = tunefleet(platform, "jobs", "create", "--base-model", "colours", code=2)
    assert invalid.stderr.startswith("error: INVALID_ARGUMENT")
    assert len(invalid.stderr.strip().splitlines()) == 1
    # DPO on a dataset of conversations: refused, naming the dataset and the kind it needs.
    dpo = create_job(
        platform, dataset, "adapters/cli", "--objective", "dpo", "--dpo-beta", "0.2", code=2
    )
    assert "DATASET_KIND_PREFERENCE" in dpo.stderr and "train_dataset" in dpo.stderr
    # Two nodes on the local launcher: refused, naming the field (exit code 1: not the input's
    # form but what this server can run).
    nodes = create_job(platform, dataset, "adapters/cli", "--nodes", "2", code=1)
    assert "FAILED_PRECONDITION" in nodes.stderr and "resources.node_count" in nodes.stderr
    # Sharding one process's model: refused, naming the field.
    fsdp = create_job(platform, dataset, "adapters/cli", "--fsdp", code=2)
    assert "INVALID_ARGUMENT" in fsdp.stderr and "resources.fsdp" in fsdp.stderr


@pytest.fixture(scope="module")
def version(platform: LocalServer, colours: Path) -> str:
    dataset = upload(platform, colours)
    job = as_json(create_job(platform, dataset, "adapters/served", "-o", "json"))
    tunefleet(platform, "jobs", "logs", job["name"], "--follow")
    return "adapters/served/versions/1"


def test_adapters_commands(platform: LocalServer, version: str, tmp_path: Path) -> None:
    listed = tunefleet(platform, "adapters", "list").stdout
    assert "adapters/served" in listed
    versions = tunefleet(platform, "adapters", "versions", "served").stdout
    assert version in versions and "trainingJobs/" in versions
    assert (
        as_json(tunefleet(platform, "adapters", "versions", "served", "-o", "json"))[0]["name"]
        == version
    )

    moved = tunefleet(platform, "adapters", "alias", "set", "served", "prod", "1", "--reason", "t")
    assert moved.stdout.strip() == f"adapters/served/aliases/prod -> {version}"
    conflict = tunefleet(
        platform, "adapters", "alias", "set", "served", "prod", "1", "--expect", "", code=1
    )
    assert conflict.stderr.startswith("error: ABORTED ALIAS_MOVED:")
    # --expect takes a version number as well as a name.
    again = tunefleet(platform, "adapters", "alias", "set", "served", "prod", "1", "--expect", "1")
    assert again.stdout.strip() == f"adapters/served/aliases/prod -> {version}"
    assert "prod->1" in tunefleet(platform, "adapters", "list").stdout
    tunefleet(platform, "adapters", "alias", "set", "served", "candidate", "1")
    split = tunefleet(platform, "adapters", "alias", "canary", "served", "prod", "candidate", "10")
    assert split.stdout.strip() == f"adapters/served/aliases/prod -> {version}, 10% to candidate"
    stopped = tunefleet(platform, "adapters", "alias", "canary", "served", "prod", "candidate", "0")
    assert stopped.stdout.strip().endswith("no canary")
    itself = tunefleet(
        platform, "adapters", "alias", "canary", "served", "prod", "prod", "5", code=2
    )
    assert "canary.alias" in itself.stderr

    target = tmp_path / "download"
    downloaded = tunefleet(platform, "adapters", "download", version, str(target))
    assert "adapter_config.json" in downloaded.stdout
    assert (target / "adapter_config.json").is_file()
    files = as_json(
        tunefleet(platform, "adapters", "download", version, str(tmp_path / "again"), "-o", "json")
    )["files"]
    assert {Path(f).name for f in files} == {p.name for p in target.iterdir()}


def test_adapters_export_writes_a_checked_gguf_file(
    platform: LocalServer, version: str, tmp_path: Path
) -> None:
    from gguf import GGUFReader

    target = tmp_path / "out" / "model.gguf"
    short = f"served:{version.rsplit('/', 1)[1]}"
    export = ["adapters", "export", short, "--format", "gguf-q8_0", "-o", str(target)]
    exported = as_json(tunefleet(platform, *export, "--output", "json"))
    stored = exported["version"]
    assert (
        stored["kind"] == "KIND_QUANTIZED_MODEL" and stored["format"] == "EXPORT_FORMAT_GGUF_Q8_0"
    )
    merged = tunefleet(platform, "adapters", "versions", "served", "-o", "json")
    assert any(
        v["name"] == stored["quantized_from"] and v["merged_from"] == version
        for v in as_json(merged)
    )
    reader = GGUFReader(target)
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    # Naming the export itself downloads it again, with its check.
    again = tunefleet(
        platform, "adapters", "export", stored["name"], "-o", str(tmp_path / "again.gguf")
    )
    assert "check passed: top-1 agreement" in again.stdout
    assert (tmp_path / "again.gguf").read_bytes() == target.read_bytes()
    unknown = tunefleet(
        platform, "adapters", "export", short, "--format", "gguf-q5", "-o", "x", code=2
    )
    assert "gguf-q8_0" in unknown.stderr
    # A bitsandbytes checkpoint is a folder of files; an existing folder is not written over.
    folder = tmp_path / "int8"
    int8 = ["adapters", "export", short, "--format", "bnb-int8", "-o", str(folder)]
    assert "check " in tunefleet(platform, *int8, "--keep-failed").stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert "exists already" in tunefleet(platform, *int8, code=2).stderr


def test_the_adapter_lifecycle_from_the_command_line(
    platform: LocalServer, chat_model: Path, tmp_path: Path
) -> None:
    """create -> upload -> get -> alias (with --expect's short form) -> merge -> download equals
    the upload -> watch -> moves -> deletes, each through the binary against a real server."""
    from tests.training.conftest import lora_adapter

    def run(*args: str, code: int = 0) -> Any:
        return as_json(tunefleet(platform, "adapters", *args, "-o", "json", code=code))

    upload_dir = lora_adapter(chat_model, tmp_path / "adapter")
    created = run("create", "life", "--base-model", "colours", "--label", "team=cli")
    assert created["name"] == "adapters/life" and created["labels"] == {"team": "cli"}
    uploaded = tunefleet(platform, "adapters", "upload", "life", str(upload_dir)).stdout
    assert "adapters/life/versions/1" in uploaded
    version = run("get", "life:1")
    assert version["kind"] == "KIND_ADAPTER" and version["smoke_test"]["result"] == "RESULT_PASSED"
    assert run("get", "life")["latest_version"] == "1"

    moved = run("alias", "set", "life", "prod", "life:1", "--expect", "", "--reason", "first")
    assert moved["version"] == "adapters/life/versions/1"
    again = run("alias", "set", "life", "prod", "1", "--expect", "life:1")
    assert again["version"] == "adapters/life/versions/1"
    (listed,) = run("alias", "list", "life")
    assert listed["name"] == "adapters/life/aliases/prod"
    merged = run("merge", "life@prod", "--dtype", "float32")
    assert merged["kind"] == "KIND_FULL_MODEL" and merged["merged_from"] == version["name"]

    target = tmp_path / "download"
    tunefleet(platform, "adapters", "download", "life:1", str(target))
    for path in upload_dir.iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes(), path.name
    assert {p.name for p in target.iterdir()} == {p.name for p in upload_dir.iterdir()}

    # register: files a trainer wrote to the server's blob store become a version, checked.
    blobs = LocalBlobStore(platform.data_dir / "blobs")
    files = [
        f"{p.name}={blobs.uri(blobs.put_file(p).sha256)}" for p in sorted(upload_dir.iterdir())
    ]
    registered = run("register", "life", *(f for pair in files for f in ("--file", pair)))
    assert registered["name"] == "adapters/life/versions/3"
    assert registered["smoke_test"]["result"] == "RESULT_PASSED"
    assert {f["sha256"] for f in registered["files"]} == {f["sha256"] for f in version["files"]}
    missing_blob = files[0].split("=")[0] + "=" + blobs.uri("0" * 64)
    refused = tunefleet(platform, "adapters", "register", "life", "--file", missing_blob, code=2)
    assert refused.stderr.startswith("error: INVALID_ARGUMENT") and "files" in refused.stderr

    watched = tunefleet(platform, "adapters", "watch", "life", "--limit", "4", "-o", "json")
    kinds = [json.loads(line)["type"] for line in watched.stdout.splitlines()]
    assert kinds[:3] == ["TYPE_ADAPTER_CREATED", "TYPE_VERSION_CREATED", "TYPE_ALIAS_MOVED"]
    moves = run("alias", "moves", "life")
    assert [m["reason"] for m in moves if m.get("reason")] == ["first"]
    run("alias", "delete", "life", "prod", "--reason", "done")
    assert run("delete", "life:2") == {"deleted": "adapters/life/versions/2"}
    missing = tunefleet(platform, "adapters", "get", "life:2", code=1)
    assert missing.stderr.startswith("error: NOT_FOUND")
    assert run("delete", "life") == {"deleted": "life"}
    bad = tunefleet(platform, "adapters", "create", "Bad Id", "--base-model", "colours", code=2)
    assert "adapter_id" in bad.stderr


def test_serving_scoring_checkpoints_and_leases_commands(
    platform: LocalServer, version: str, colours: Path
) -> None:
    loaded = as_json(tunefleet(platform, "served", "load", version, "--pin", "-o", "json"))
    assert loaded["adapter_version"] == version and loaded["pinned"]
    assert version in tunefleet(platform, "served", "list").stdout
    tunefleet(platform, "served", "unload", version)
    scored = as_json(
        tunefleet(
            platform, "score", "Which colour goes with the cat?", " Colour: red.", "-o", "json"
        )
    )
    assert scored["token_logprobs"] and all(p <= 0 for p in scored["token_logprobs"])
    job = as_json(tunefleet(platform, "adapters", "get", version, "-o", "json"))["lineage"]
    checkpoints = as_json(
        tunefleet(platform, "jobs", "checkpoints", job["training_job"], "-o", "json")
    )
    steps = [int(c["step"]) for c in checkpoints]
    assert steps and steps == sorted(steps) and all(c["uri"] for c in checkpoints), checkpoints
    dataset = upload(platform, colours)
    lease = ["datasets", "leases"]
    held = as_json(
        tunefleet(
            platform, *lease, "create", dataset, "cli-test", "--holder", "tests/cli", "-o", "json"
        )
    )
    assert held["name"] == f"{dataset}/leases/cli-test"
    assert "tests/cli" in tunefleet(platform, *lease, "list", dataset).stdout
    refused = tunefleet(platform, "datasets", "delete", dataset, code=1)
    assert "FAILED_PRECONDITION" in refused.stderr
    tunefleet(platform, *lease, "delete", held["name"])
    tunefleet(platform, "datasets", "delete", dataset)


def test_generate_and_feedback(platform: LocalServer, version: str, tmp_path: Path) -> None:
    tunefleet(platform, "adapters", "alias", "set", "served", "live", "1")
    ask = ["generate", "--chat", "--adapter", "adapters/served@live", "--max-tokens", "8"]
    question = "Which colour goes with the cat?"
    streamed = tunefleet(platform, *ask, question)
    assert f"[{version}; " in streamed.stderr and "response " in streamed.stderr
    whole = as_json(tunefleet(platform, *ask, "-o", "json", question))
    assert streamed.stdout.rstrip("\n") == whole["text"]  # greedy: the same answer
    assert whole["adapter_version"] == version

    piped = tunefleet(platform, "generate", "--max-tokens", "4", input="Which colour")
    assert "[base model; " in piped.stderr

    recorded = tunefleet(
        platform, "feedback", whole["response_id"], "--rating", "-1", "--corrected-text", "red"
    )
    assert recorded.stdout.startswith("recorded feedback/")
    assert f"rating -1 for {version}" in recorded.stdout
    out_of_range = tunefleet(platform, "feedback", whole["response_id"], "--rating", "3", code=2)
    assert "--rating" in out_of_range.stderr

    # The correction becomes training data: an SFT example and a preference pair.
    only = f'adapter_version="{version}"'
    made = as_json(
        tunefleet(
            platform, "datasets", "from-feedback", "--filter", only, "--name", "fb", "-o", "json"
        )
    )
    assert made["sft_examples"] == 1 and made["preference_pairs"] == 1
    sft = as_json(tunefleet(platform, "datasets", "get", made["made"]["sft"], "-o", "json"))
    assert sft["display_name"] == "fb-sft" and int(sft["record_count"]) == 1
    written = tunefleet(
        platform, "datasets", "from-feedback", "--filter", only, "--write", str(tmp_path)
    )
    assert "1 SFT examples and 1 preference pairs from 1 feedback" in written.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert record["messages"][-1] == {"role": "assistant", "content": "red"}


def test_eval_commands(platform: LocalServer, version: str, colours: Path) -> None:
    dataset = upload(platform, colours)
    evaluate = ["eval", "create", "--dataset", dataset, "--max-items", "6", "--max-tokens", "8"]
    created = tunefleet(
        platform,
        *evaluate,
        "--candidate", "base",
        "--candidate", f"tuned={version}",
        "--candidate", "prompted",
        "--system-prompt", "prompted=Answer with the colour [in one word].",
        "--grader", "exact_match",
        "--grader", "rouge_l",
        "--wait",
    )  # fmt: skip
    assert created.stdout.startswith("created evaluationJobs/")
    name = created.stdout.split()[1]
    shown = tunefleet(platform, "eval", "get", name).stdout
    assert created.stdout.endswith(shown)  # --wait shows the job as `eval get` does
    for text in ("SUCCEEDED", "VS BASELINE", "mcnemar-exact", "paired-bootstrap", version):
        assert text in shown, text
    assert "base model + system prompt" in shown  # the prompting baseline, named as such
    job = as_json(tunefleet(platform, "eval", "get", name, "-o", "json"))
    assert [r["candidate"] for r in job["results"]] == ["base", "tuned", "prompted"]
    assert job["candidates"][1]["adapter_version"] == version
    assert name in tunefleet(platform, "eval", "list").stdout

    answers = tunefleet(platform, "eval", "items", name, "--candidate", "tuned").stdout
    assert answers.count("  answer:    ") == 6 and answers.count("  reference: 'Colour: ") == 6
    failures = tunefleet(platform, "eval", "items", name, "--below", "rouge_l", "2", "-o", "json")
    lines = [json.loads(line) for line in failures.stdout.splitlines()]
    assert len(lines) == 18 and {line["candidate"] for line in lines} == {
        "base",
        "tuned",
        "prompted",
    }
    assert not tunefleet(platform, "eval", "items", name, "--below", "rouge_l", "0").stdout

    # The same model twice is no better than itself: the gate fails, and --wait exits 3.
    gated = tunefleet(
        platform, *evaluate, "--candidate", "base", "--candidate", "again", "--grader",
        "exact_match", "--gate", "exact_match", "--wait", code=3,
    )  # fmt: skip
    assert "gate again: FAILED" in gated.stdout
    assert "no significant difference from the baseline" in gated.stdout
    ended = tunefleet(platform, "eval", "cancel", name, code=1)
    assert "FAILED_PRECONDITION" in ended.stderr
    bad = tunefleet(
        platform, *evaluate, "--candidate", "a", "--grader", "bleu", "--gate", "rouge_l", code=2
    )
    assert "evaluation_job.gate.metric" in bad.stderr
    unknown = tunefleet(platform, *evaluate, "--candidate", "a", "--system-prompt", "b=x", code=2)
    assert "'b' is not a candidate" in unknown.stderr


def test_retraining_commands(platform: LocalServer, version: str, colours: Path) -> None:
    dataset = upload(platform, colours)
    tunefleet(platform, "adapters", "alias", "set", "served", "prod", "1")
    created = tunefleet(
        platform, "retraining", "create-policy", "--adapter", "adapters/served",
        "--eval-dataset", dataset, "--grader", "exact_match", "--gate", "exact_match",
        "--min-new-examples", "1000", "--auto",
    )  # fmt: skip
    assert created.stdout.strip() == "created retrainingPolicies/served for adapters/served"
    listed = tunefleet(platform, "retraining", "policies").stdout
    assert "retrainingPolicies/served" in listed and "AUTO" in listed
    policy = as_json(tunefleet(platform, "retraining", "get-policy", "served", "-o", "json"))
    assert policy["name"] == "retrainingPolicies/served"
    assert policy["adapter"] == "adapters/served"
    assert policy["evaluation"]["dataset"] == dataset
    # Too little feedback: the run ends without training, and -w exits 3 (not promoted).
    ran = tunefleet(platform, "retraining", "run", "served", "-w", code=3)
    assert "new examples, fewer than the 1000 needed" in ran.stdout
    assert "NOT_ENOUGH_DATA" in ran.stdout
    (run,) = as_json(tunefleet(platform, "retraining", "runs", "served", "-o", "json"))
    shown = tunefleet(platform, "retraining", "get", run["name"]).stdout
    assert "started: manual" in shown and "champion prod is " + version in shown
    refused = tunefleet(platform, "retraining", "approve", run["name"], code=1)
    assert "RUN_NOT_AWAITING_APPROVAL" in refused.stderr
    twice = tunefleet(platform, "retraining", "create-policy", "--adapter", "adapters/served",
                      "--eval-dataset", dataset, "--grader", "exact_match", "--gate",
                      "exact_match", code=1)  # fmt: skip
    assert "ALREADY_EXISTS" in twice.stderr
    tunefleet(platform, "retraining", "delete-policy", "served")
    assert "(none)" in tunefleet(platform, "retraining", "policies").stdout


def test_the_general_suite_uploads_whole_and_evaluates(
    platform: LocalServer, tmp_path: Path
) -> None:
    assert len(tunefleet(None, "eval", "suite", "general").stdout.splitlines()) == 300
    written = tunefleet(None, "eval", "suite", "general", "--lm-eval", str(tmp_path / "task"))
    assert "--tasks tunefleet_general" in written.stdout
    assert (tmp_path / "task" / "tunefleet_general.yaml").is_file()
    assert len((tmp_path / "task" / "general.jsonl").read_text().splitlines()) == 300
    uploaded = as_json(tunefleet(platform, "eval", "suite", "general", "--upload", "-o", "json"))
    assert int(uploaded["train_record_count"]) == 300  # nothing dropped as a near duplicate
    assert "validation_record_count" not in uploaded  # 0, which JSON leaves out
    job = as_json(
        tunefleet(
            platform, "eval", "create", "--dataset", uploaded["name"], "--split", "train",
            "--candidate", "base", "--grader", "exact_match", "--contains", "--normalise",
            "--max-items", "12", "--max-tokens", "6", "--wait", "-o", "json",
        )
    )  # fmt: skip
    assert job["state"] == "STATE_SUCCEEDED" and job["answers_done"] == "12"
    assert job["graders"][0]["normalise"] is True
    assert job["graders"][1] == {"type": "string_check", "operation": "like", "normalise": True}
    assert [s["grader"] for s in job["results"][0]["scores"]] == ["exact_match", "string_check"]


def test_bad_options_are_refused_before_any_call(colours: Path, tmp_path: Path) -> None:
    label = tunefleet(None, "datasets", "upload", str(colours), "--label", "team", code=2)
    assert "--label" in label.stderr and "expected KEY=VALUE, got 'team'" in label.stderr
    spec = tmp_path / "job.json"
    for text, message in [("{not json", "not JSON"), ("[1]", "expected a JSON object")]:
        spec.write_text(text)
        refused = tunefleet(None, "jobs", "create", "--from-file", str(spec), code=2)
        assert "--from-file" in refused.stderr and message in refused.stderr
    for timeout in ("0", "soon"):
        refused = tunefleet(None, "--timeout", timeout, "datasets", "list", code=2)
        assert "--timeout" in refused.stderr


def test_timeout_bounds_every_call_uploads_included() -> None:
    options = Settings("localhost:1", None, False, None, timeout=2.5).options()
    assert (options.timeout, options.stream_timeout) == (2.5, 2.5)
    default = Settings("localhost:1", None, False, None).options()
    assert (default.timeout, default.stream_timeout) == (30.0, None)


def test_an_unreachable_server_is_one_line_and_exit_1() -> None:
    target = f"127.0.0.1:{free_port()}"
    result = tunefleet(None, "--target", target, "datasets", "list", code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: UNAVAILABLE")
    assert lines[0].endswith(f"(is a server running at {target}?)")
