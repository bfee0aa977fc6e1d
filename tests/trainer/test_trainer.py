"""The trainer on a tiny model and a learnable synthetic task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import MakeSpec, conversation, write_records
from tunefleet.trainer.data import IGNORE, Example, batches, encode
from tunefleet.trainer.spec import SpecError, load_spec, parse_spec
from tunefleet.trainer.train import Trainer, batch_loss


def train(spec: dict[str, Any]) -> dict[str, Any]:
    trainer = Trainer(parse_spec(spec))
    try:
        return trainer.run()
    finally:
        trainer.reporter.close()


def events(output: Path, kind: str = "") -> list[dict[str, Any]]:
    """The events of a run's progress.jsonl (of one `kind`); none before it exists."""
    path = output / "progress.jsonl"
    found = [json.loads(line) for line in path.open()] if path.exists() else []
    return [e for e in found if not kind or e["event"] == kind]


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> str:
    path = tmp_path / f"{Path(spec['output_dir']).name}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def torchrun(tmp_path: Path, spec: dict[str, Any], processes: int = 2) -> None:
    """One torchrun of `processes` trainers (a multi-GPU Job's command line), on CPU."""
    from tunefleet.training.launcher import trainer_command

    result = subprocess.run(
        trainer_command(sys.executable, processes, write_spec(tmp_path, spec)),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]


def start_nodes(tmp_path: Path, specs: list[dict[str, Any]]) -> list[subprocess.Popen[str]]:
    """Torchrun "nodes" of one trainer each, as a multi-node Job's Pods run them (the same
    command line), meeting at the first one's address on 127.0.0.1; each leaves its outcome in
    `<output>.outcome`."""
    from tunefleet.demo.server import free_port
    from tunefleet.training.launcher import Nodes, trainer_command

    port, processes = free_port(), []
    for rank, spec in enumerate(specs):
        nodes = Nodes(len(specs), str(rank), "127.0.0.1", port)
        outcome = tmp_path / f"{Path(spec['output_dir']).name}.outcome"
        processes.append(
            subprocess.Popen(
                trainer_command(sys.executable, 1, write_spec(tmp_path, spec), nodes),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "TUNEFLEET_RESULT_FILE": str(outcome)},
            )
        )
    return processes


def succeed(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors[-4000:]


@pytest.mark.parametrize(
    ("method", "learning_rate"),
    [("lora", 1e-2), ("dora", 1e-2), ("qlora", 1e-2), ("full", 1e-3)],
)
def test_each_method_learns_the_task(
    make_spec: MakeSpec, chat_model: Path, method: str, learning_rate: float
) -> None:
    result = train(make_spec(method=method, hyperparameters={"learning_rate": learning_rate}))
    evaluation = result["evaluation"]
    assert evaluation["validation_loss"] < 0.6 * evaluation["base_validation_loss"], evaluation
    assert evaluation["perplexity"] < evaluation["base_perplexity"]
    assert evaluation["adapter_changes_logits"]
    output = Path(result["output_dir"])
    if method == "full":
        assert (output / "model.safetensors").exists() and (output / "tokenizer.json").exists()
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((output / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora") and config["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(chat_model)
    probe = torch.tensor([[5, 40, 77, 120, 33]])
    with torch.no_grad():
        before = base(probe).logits
        after = PeftModel.from_pretrained(base, output)(probe).logits
    assert not torch.allclose(before, after)


def test_only_assistant_tokens_carry_loss(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    messages = [
        {"role": "system", "content": "Answer with one colour."},
        {"role": "user", "content": "Which colour goes with the cat?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "blue"},
    ]
    (example,) = encode(tokenizer, [messages], 128).examples
    trained = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(trained) == "red<|end|>blue<|end|>"  # the assistant turns only
    untrained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE]
    )
    assert "Which colour" in untrained and "Answer with" in untrained and "red" not in untrained


CALL_TEMPLATE = (  # writes a call as `call NAME ARGUMENTS`
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}call {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_tool_calls_are_rendered_by_the_template_and_carry_loss(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    from tunefleet.core.chat import renders_tool_calls
    from tunefleet.trainer.data import Conversation

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    assert not renders_tool_calls(tokenizer)  # the test model's template writes content only
    tokenizer.chat_template = CALL_TEMPLATE
    assert renders_tool_calls(tokenizer)
    tool = {"name": "colour_of", "description": "", "parameters": {"type": "object"}}
    call = {"id": "call_0", "name": "colour_of", "arguments": {"animal": "cat"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Which colour goes with the cat?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "red", "tool_call_id": "call_0", "name": "colour_of"},
        {"role": "assistant", "content": "red"},
    ]
    (example,) = encode(tokenizer, [Conversation(messages, [tool])], 256).examples
    trained = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(trained) == 'call colour_of {"animal": "cat"}<|end|>red<|end|>'
    untrained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE]
    )
    assert "tools: colour_of" in untrained and "<|tool|>red" in untrained


def test_weight_zero_turns_carry_no_loss(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    messages: list[dict[str, Any]] = [
        *conversation("cat", "red")[:2],
        {"role": "assistant", "content": "red", "weight": 0},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "blue"},
    ]
    (example,) = encode(tokenizer, [messages], 128).examples
    labelled = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(labelled) == "blue<|end|>"


def test_truncation_is_counted_and_never_silent(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    normal = conversation("cat", "red")
    limit = len(encode(tokenizer, [normal], 1000).examples[0].input_ids) + 2
    long_answer = [*normal[:2], {"role": "assistant", "content": "red " * 40}]
    encoded = encode(tokenizer, [normal, long_answer], limit)
    assert (len(encoded.examples), encoded.truncated, encoded.dropped) == (2, 1, 0)
    assert len(encoded.examples[1].input_ids) == limit
    too_long_prompt = [
        {"role": "user", "content": "why " * 60},
        {"role": "assistant", "content": "x"},
    ]
    assert encode(tokenizer, [too_long_prompt], limit).dropped == 1


def test_packing_keeps_attention_inside_each_example(chat_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model)
    model.eval()  # type: ignore[no-untyped-call]
    examples = encode(
        tokenizer,
        [conversation(a, c) for a, c in [("cat", "red"), ("dog", "blue"), ("owl", "green")]],
        256,
    ).examples
    packed = batches(examples, 8, tokenizer.pad_token_id, True, 256, seed=0, epoch=0)
    assert len(packed) == 1 and len(packed[0].input_ids) == 1  # all three share one row
    with torch.no_grad():
        together = float(batch_loss(model, packed[0]))
        alone = sum(
            float(batch_loss(model, batches([e], 1, 0, False, 256, 0, 0)[0])) for e in examples
        )
    assert together == pytest.approx(alone, rel=1e-5)


def drifting_validation(tmp_path: Path) -> dict[str, str]:
    """Validation data whose answers have another format: fitting the training data makes its
    loss fall at first, then rise."""
    other = write_records(
        tmp_path / "other.jsonl", train=0, validation=24, answer="Farbe: {} -- fertig!"
    )
    return {"uri": str(other), "split": "validation"}


def test_early_stopping(make_spec: MakeSpec, tmp_path: Path) -> None:
    # Training stops after `patience` evaluations without improvement.
    spec = make_spec(
        validation_data=drifting_validation(tmp_path),
        hyperparameters={"epochs": 20, "eval_every_steps": 2, "early_stopping_patience": 2},
    )
    result = train(spec)
    events = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").open()]
    stopped = [e for e in events if e["event"] == "early_stopped"]
    assert stopped and result["steps"] < 20 * 12
    losses = [e["validation_loss"] for e in events if e.get("validation_loss") is not None]
    assert min(losses) < losses[-1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "sft"}, "method: Input should be 'lora', 'qlora', 'dora' or 'full'"),
        ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than or equal to 1"),
        ({"lora": {"rank": 1024}}, "lora.rank: Input should be less than or equal to 512"),
        ({"hyperparameters": {"warmup_ratio": 1.5}}, "hyperparameters.warmup_ratio"),
        ({"base_model": "/nowhere"}, "base_model: '/nowhere' is not a model directory"),
        ({"train_data": {"uri": "/nowhere.jsonl"}}, "train_data.uri"),
    ],
)
def test_bad_specs_are_refused(make_spec: MakeSpec, change: dict[str, Any], message: str) -> None:
    spec = make_spec()
    spec.update(change)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


def test_qlora_without_bitsandbytes_is_refused(
    make_spec: MakeSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SpecError, match="qlora needs bitsandbytes"):
        parse_spec(make_spec(method="qlora"))


def test_data_that_cannot_fit_is_refused_before_the_model_loads(
    make_spec: MakeSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tunefleet.trainer.train as train_module

    def no_model(spec: Any) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(train_module, "load_model", no_model)
    trainer = Trainer(parse_spec(make_spec(hyperparameters={"max_sequence_length": 16})))
    with pytest.raises(SpecError, match="lose every assistant token at max_sequence_length 16"):
        trainer.run()
    trainer.reporter.close()


def test_labels_align_with_examples() -> None:
    example = Example([1, 2, 3], [IGNORE, 2, 3])
    (batch,) = batches([example, Example([4, 5], [IGNORE, 5])], 2, 0, False, 8, 0, 0)
    assert batch.trainable == 3 and batch.tokens == 5


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    import signal
    import time

    hyper = {"epochs": 3, "checkpoint_every_steps": 4, "eval_every_steps": 6}
    lora = {"rank": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    reference = train(make_spec(output="reference", lora=lora, hyperparameters=hyper))

    spec = make_spec(output="killed", lora=lora, hyperparameters=hyper)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "tunefleet.trainer", "--spec", str(spec_file)]
    progress = tmp_path / "killed" / "progress.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the second checkpoint, then kill
        events = [json.loads(line) for line in progress.open()] if progress.exists() else []
        if [e for e in events if e["event"] == "checkpoint" and e["step"] >= 8]:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(e["step"] for e in events if e["event"] == "progress")
    assert killed_at < reference["steps"], "the run finished before it was killed"
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert result["steps"] == reference["steps"]
    assert result["evaluation"]["validation_loss"] == pytest.approx(
        reference["evaluation"]["validation_loss"], rel=1e-6, abs=1e-7
    )


def test_task_metrics_compare_base_and_result(make_spec: MakeSpec, tmp_path: Path) -> None:
    # A fixed reply format, which fine-tuning teaches quickly: the result matches it exactly.
    records = write_records(tmp_path / "fixed.jsonl", train=96, validation=12, answer="All fine.")
    spec = make_spec(
        train_data={"uri": str(records), "split": "train"},
        evaluation={"examples": 6, "metrics": ["exact_match", "json_valid"], "max_new_tokens": 16},
    )
    evaluation = train(spec)["evaluation"]
    assert evaluation["base_task_metrics"] == {"exact_match": 0.0, "json_valid": 0.0}
    assert evaluation["task_metrics"] == {"exact_match": 1.0, "json_valid": 0.0}


def test_data_and_checkpoints_live_in_the_blob_store(make_spec: MakeSpec, tmp_path: Path) -> None:
    from tunefleet.storage.blobs import LocalBlobStore

    store = LocalBlobStore(tmp_path / "blobs")
    records = write_records(tmp_path / "records-for-blob.jsonl", train=48, validation=12)
    uri = store.uri(store.put_file(records).sha256)
    storage = {"blob_backend": "local", "blob_dir": str(tmp_path / "blobs")}
    hyper = {"epochs": 2, "checkpoint_every_steps": 4}
    reference = train(
        make_spec(
            output="first",
            storage=storage,
            hyperparameters=hyper,
            train_data={"uri": uri, "split": "train"},
        )
    )
    events = [json.loads(line) for line in (tmp_path / "first" / "progress.jsonl").open()]
    stored = {e["step"]: e["uri"] for e in events if e["event"] == "checkpoint"}
    assert sorted(stored) == [4, 8, 12] and all(
        u.endswith(tuple("0123456789abcdef")) for u in stored.values()
    )
    # Another machine: a fresh output directory, resuming from the checkpoint of step 8.
    resumed = train(
        make_spec(
            output="elsewhere",
            storage=storage,
            hyperparameters=hyper,
            train_data={"uri": uri, "split": "train"},
            resume_from=stored[8],
        )
    )
    assert resumed["steps"] == reference["steps"] == 12
    assert resumed["evaluation"]["validation_loss"] == pytest.approx(
        reference["evaluation"]["validation_loss"], rel=1e-6, abs=1e-7
    )


def test_blob_data_needs_storage(make_spec: MakeSpec) -> None:
    with pytest.raises(SpecError, match="is a blob, but the spec has no storage"):
        parse_spec(make_spec(train_data={"uri": "s3://bucket/tunefleet/sha256/ab/" + "a" * 64}))


def test_a_checkpoint_pointer_beside_the_spec_sets_resume_from(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    """On Kubernetes the launcher writes the last checkpoint into the run's Secret, mounted
    beside the spec; a retried Pod resumes from it."""
    storage = {"blob_backend": "local", "blob_dir": str(tmp_path / "blobs")}
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps(make_spec(storage=storage)))
    assert load_spec(folder / "spec.json").resume_from == ""
    (folder / "resume_from").write_text("")  # an empty pointer is no pointer
    assert load_spec(folder / "spec.json").resume_from == ""
    (folder / "resume_from").write_text("file://checkpoints/40")
    assert load_spec(folder / "spec.json").resume_from == "file://checkpoints/40"


def test_two_processes_under_torchrun_train_like_one_with_their_combined_batch(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    """Data parallelism (what a multi-GPU Job runs), on CPU with the gloo backend: two processes
    with micro-batches of 8 take the same steps as one process accumulating two micro-batches."""
    hyper = {"max_steps": 4, "eval_every_steps": 4}
    train(make_spec(output="single", hyperparameters={**hyper, "gradient_accumulation_steps": 2}))
    torchrun(tmp_path, make_spec(output="parallel", hyperparameters=hyper))
    single = events(tmp_path / "single", "progress")
    parallel = events(tmp_path / "parallel", "progress")
    assert [e["step"] for e in parallel] == [1, 2, 3, 4]  # reported once, by the first process
    for one, two in zip(single, parallel, strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    assert parallel[-1]["validation_loss"] == pytest.approx(single[-1]["validation_loss"], rel=1e-3)
    assert (tmp_path / "parallel" / "result.json").exists()


def test_two_nodes_under_torchrun_train_like_one_process_with_their_combined_batch(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    """A two-node run as a multi-node Job runs it (the same command line): two torchrun "nodes"
    of one process each on this machine, meeting at the first one's address (gloo on
    127.0.0.1), each with its own output folder as each Pod has its own scratch volume. They
    take the same steps as one process accumulating both micro-batches, and only the first
    node reports and writes the result."""
    hyper = {"max_steps": 4, "eval_every_steps": 4}
    train(make_spec(output="single", hyperparameters={**hyper, "gradient_accumulation_steps": 2}))
    succeed(
        start_nodes(
            tmp_path, [make_spec(output=f"node-{r}", hyperparameters=hyper) for r in (0, 1)]
        )
    )
    single = events(tmp_path / "single", "progress")
    nodes = events(tmp_path / "node-0", "progress")
    assert [e["step"] for e in nodes] == [1, 2, 3, 4]
    for one, two in zip(single, nodes, strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    assert nodes[-1]["validation_loss"] == pytest.approx(single[-1]["validation_loss"], rel=1e-3)
    assert (tmp_path / "node-0" / "result.json").exists()
    assert not (tmp_path / "node-1" / "result.json").exists()
    assert not (tmp_path / "node-1" / "progress.jsonl").exists()


@pytest.mark.timeout(600)  # three runs of 200 steps, two of them of two processes
def test_a_gang_that_lost_a_node_starts_again_from_its_checkpoint_as_if_never_stopped(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    """Two torchrun "nodes" as a multi-node Job runs them (tunefleet.trainer.gang), each with its
    own output folder and the shared blob store. The second node is killed after a checkpoint
    was stored: the first node's trainer fails PEER_LOST, and the gang wrapper ends with that
    status (torchrun's own would be 1, which fails the Job), which the Job retries. Both nodes
    started again from the stored checkpoint end as one process on their combined batch does."""
    import time

    import psutil

    from tunefleet.storage.blobs import LocalBlobStore
    from tunefleet.trainer.outcome import PEER_LOST_EXIT
    from tunefleet.training.launcher import EXIT_REASONS

    assert PEER_LOST_EXIT not in EXIT_REASONS  # the Job retries it
    store = LocalBlobStore(tmp_path / "blobs")
    records = write_records(tmp_path / "gang-records.jsonl", train=96, validation=24)
    data = {"uri": store.uri(store.put_file(records).sha256), "split": "train"}
    storage = {"blob_backend": "local", "blob_dir": str(tmp_path / "blobs")}
    hyper = {"max_steps": 200, "epochs": 100, "eval_every_steps": 100, "checkpoint_every_steps": 4}
    common = {"storage": storage, "train_data": data}
    train(
        make_spec(
            output="single",
            hyperparameters={**hyper, "gradient_accumulation_steps": 2},
            **common,
        )
    )

    def start(attempt: str, **spec: Any) -> list[subprocess.Popen[str]]:
        outputs = [f"{attempt}-{rank}" for rank in (0, 1)]
        documents = [make_spec(output=o, hyperparameters=hyper, **common, **spec) for o in outputs]
        return start_nodes(tmp_path, documents)

    first = start("first")
    deadline = time.monotonic() + 300
    while not events(tmp_path / "first-0", "checkpoint"):
        assert time.monotonic() < deadline and first[0].poll() is None, first[0].stderr
        time.sleep(0.05)
    # The second node is gone: every process of its Pod (torchrun starts each trainer in a
    # session of its own; Kubernetes kills the container's whole cgroup).
    node = psutil.Process(first[1].pid)
    for member in [*node.children(recursive=True), node]:
        member.kill()
    first[1].wait()
    _, errors = first[0].communicate(timeout=300)
    assert first[0].returncode == PEER_LOST_EXIT, errors[-4000:]
    said = json.loads((tmp_path / "first-0.outcome").read_text())
    assert said["reason"] == "PEER_LOST", said
    stored = events(tmp_path / "first-0", "checkpoint")
    reached = max(e["step"] for e in events(tmp_path / "first-0", "progress"))
    assert reached < 200, "the run ended before the node was lost"

    # The Job's retries: both nodes again, reading the pointer to the last stored checkpoint.
    succeed(start("again", resume_from=stored[-1]["uri"]))
    resumed = events(tmp_path / "again-0", "progress")
    assert resumed[0]["step"] == stored[-1]["step"] + 1
    single = {e["step"]: e for e in events(tmp_path / "single", "progress")}
    for step in resumed:
        assert step["train_loss"] == pytest.approx(single[step["step"]]["train_loss"], rel=1e-4)
    assert resumed[-1]["step"] == 200
    assert resumed[-1]["validation_loss"] == pytest.approx(single[200]["validation_loss"], rel=1e-4)


@pytest.mark.timeout(600)  # four runs, three of them of two processes
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_on_two_processes_trains_like_one_unsharded_process(
    make_spec: MakeSpec, tmp_path: Path, method: str
) -> None:
    """FSDP2 on CPU with gloo: two processes each holding half of every parameter, gradient and
    optimizer moment take the same steps as one whole model accumulating both micro-batches;
    the saved result has the same weights; and a sharded run resumed from its own sharded
    checkpoint (gathered, written, broadcast back) continues as if never stopped."""
    from safetensors.torch import load_file

    hyper = {
        "max_steps": 4,
        "eval_every_steps": 2,
        "checkpoint_every_steps": 2,
        "lr_scheduler": "constant",
        "warmup_ratio": 0,
        "learning_rate": 1e-2 if method == "lora" else 1e-3,
    }
    common = {"method": method, "evaluation": {"examples": 2, "max_new_tokens": 4}}
    single = make_spec(
        output="single", hyperparameters={**hyper, "gradient_accumulation_steps": 2}, **common
    )
    train(single)
    torchrun(tmp_path, make_spec(output="sharded", hyperparameters=hyper, fsdp=True, **common))
    # Two steps, then resumed for the other two from the step-2 checkpoint.
    halves = {"output": "resumed", "fsdp": True, **common}
    torchrun(tmp_path, make_spec(hyperparameters={**hyper, "max_steps": 2}, **halves))
    torchrun(tmp_path, make_spec(hyperparameters=hyper, resume=True, **halves))

    reference = events(tmp_path / "single", "progress")
    resumed = events(tmp_path / "resumed", "progress")
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]  # reported once, by the first process
    for output, steps in (
        ("sharded", events(tmp_path / "sharded", "progress")),
        ("resumed", resumed),
    ):
        assert [e["step"] for e in steps] == [1, 2, 3, 4]
        for one, two in zip(reference, steps, strict=True):
            assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4), output
            assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3), output
            if one["validation_loss"] is not None:
                assert two["validation_loss"] == pytest.approx(one["validation_loss"], rel=1e-4), (
                    output
                )
    saved = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    expected = load_file(str(tmp_path / "single" / saved))
    results = {}
    for output in ("sharded", "resumed"):
        weights = load_file(str(tmp_path / output / saved))
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            assert torch_close(weights[name], value), f"{output}: {name}"
        results[output] = json.loads((tmp_path / output / "result.json").read_text())
    single_result = json.loads((tmp_path / "single" / "result.json").read_text())
    for result in results.values():
        # Evaluated at the end by both processes in step (generation included).
        assert result["evaluation"]["task_metrics"] == single_result["evaluation"]["task_metrics"]
        assert result["evaluation"]["validation_loss"] == pytest.approx(
            single_result["evaluation"]["validation_loss"], rel=1e-4
        )


def torch_close(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5))


def _lora_gradients(model: Any, batch: Any) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    batch_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("guarded", [True, False])
def test_qlora_gradients_are_the_same_after_an_evaluation(
    make_spec: MakeSpec, chat_model: Path, monkeypatch: pytest.MonkeyPatch, guarded: bool
) -> None:
    # bitsandbytes repacks 4-bit weights for its CPU inference kernel (which has no backward)
    # the first time a layer runs outside training mode, on CPUs with AVX512-BF16. Pretend this
    # one has it, so the test takes that path on any machine.
    import bitsandbytes.nn.modules
    import torch
    from transformers import AutoTokenizer

    from tunefleet.trainer import model as trainer_model
    from tunefleet.trainer.train import evaluate_loss

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    if not guarded:  # the control: without the guard the test sees the defect
        monkeypatch.setattr(trainer_model, "keep_4bit_layers_trainable", lambda model: None)
    spec = parse_spec(make_spec(method="qlora"))
    torch.manual_seed(0)
    model = trainer_model.load_model(spec)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    examples = encode(tokenizer, [conversation("cat", "red"), conversation("dog", "blue")], 64)
    (batch,) = batches(examples.examples, 2, tokenizer.eos_token_id, False, 64, 0, 0)
    before = _lora_gradients(model, batch)
    evaluate_loss(model, [batch])  # model.eval(), as the base and periodic evaluations do
    after = _lora_gradients(model, batch)
    assert before.keys() == after.keys() and before
    relative = max(
        float((after[n] - before[n]).norm() / before[n].norm().clamp_min(1e-12)) for n in before
    )
    if guarded:
        assert relative < 1e-4, f"LoRA gradients changed by up to {relative:.1%} after evaluating"
    else:
        assert relative > 0.05


def test_checkpoints_are_pruned_to_the_newest_and_the_best(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    spec = make_spec(
        validation_data=drifting_validation(tmp_path),
        keep_checkpoints=2,
        hyperparameters={"epochs": 3, "eval_every_steps": 2, "checkpoint_every_steps": 2},
    )
    train(spec)
    events = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").open()]
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    losses = {e["step"]: e["validation_loss"] for e in events if e["event"] == "checkpoint"}
    best = min(losses, key=lambda step: (losses[step], step))
    assert len(saved) > 3 and best not in saved[-2:], "the task should peak early"
    left = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert left == [f"checkpoint-{step:08d}" for step in sorted({best, *saved[-2:]})]


def test_early_stopping_keeps_the_best_steps_adapter(
    make_spec: MakeSpec, chat_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec = make_spec(
        validation_data=drifting_validation(tmp_path),
        keep_checkpoints=1,
        hyperparameters={
            "epochs": 20,
            "eval_every_steps": 2,
            "checkpoint_every_steps": 4,
            "early_stopping_patience": 2,
        },
    )
    result = train(spec)
    events = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").open()]
    (stopped,) = [e for e in events if e["event"] == "early_stopped"]
    losses = {e["step"]: e["validation_loss"] for e in events if e.get("validation_loss")}
    best_step = min(losses, key=lambda step: (losses[step], step))
    assert stopped["best_step"] == best_step < stopped["step"]
    # The result is the best step's: its validation loss, and the weights of its checkpoint.
    assert result["evaluation"]["validation_loss"] == pytest.approx(losses[best_step], rel=1e-5)
    best = load_file(
        str(
            tmp_path
            / "out"
            / "checkpoints"
            / f"checkpoint-{best_step:08d}"
            / "trainable.safetensors"
        )
    )
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(chat_model), result["output_dir"]
    )
    saved = dict(adapter.named_parameters())
    for name, value in best.items():
        assert torch.equal(saved[name], value), name


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        ("torch.OutOfMemoryError", 5, "OUT_OF_MEMORY"),
        ("MemoryError", 5, "OUT_OF_MEMORY"),
        ("RuntimeError", 1, "TRAINER_FAILED"),
    ],
)
def test_the_exit_status_and_the_outcome_say_why_training_failed(
    make_spec: MakeSpec,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    code: int,
    reason: str,
) -> None:
    import torch

    from tunefleet.trainer.__main__ import main

    kind = {
        "torch.OutOfMemoryError": torch.OutOfMemoryError,
        "MemoryError": MemoryError,
        "RuntimeError": RuntimeError,
    }[error]

    def fail(self: Trainer) -> None:
        raise kind("out of memory at step 3")

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(make_spec()))
    monkeypatch.setenv("TUNEFLEET_RESULT_FILE", str(tmp_path / "outcome.json"))
    monkeypatch.setattr(Trainer, "run", fail)
    assert main(["--spec", str(spec)]) == code
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["reason"] == reason and "out of memory at step 3" in outcome["message"]
