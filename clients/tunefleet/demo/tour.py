"""`make demo`: the whole product on one machine, through the SDK.

It starts the embedded server, ingests the bundled order-extraction sample, fine-tunes
SmolLM2-135M-Instruct with LoRA (a tiny random model with `--quick`), shows the loss live,
registers the adapter and points `prod` at it, answers one prompt with base and adapter, trains
a second version, evaluates the base model, a few-shot prompting baseline and both versions with
EvaluationService (exact match with 95% intervals, paired differences from the base model with
McNemar's p-value, a gate), moves `prod` to version 2 and shows the served version change without
a restart, records feedback, prints the per-adapter metrics, and turns the improvement loop once:
prod's wrong answers corrected, a retrained challenger judged against prod, promoted or refused
by the gate.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.client import Client
from tunefleet.demo import models, task
from tunefleet.demo.server import LocalServer
from tunefleet.v1 import dataset_pb2, evaluation_pb2, retraining_pb2, training_job_pb2

ADAPTER = "adapters/orders"
PROD = f"{ADAPTER}@prod"


@dataclass(frozen=True)
class Plan:
    """What a run trains and evaluates."""

    model: str
    held_out: int  # validation examples scored per model
    max_tokens: int
    first: dict[str, Any]  # hyperparameters of version 1
    second: dict[str, Any]  # hyperparameters of version 2
    lora_rank: int
    few_shot: int  # worked examples the prompting baseline is shown
    must_improve: bool  # a real instruct model must beat its base; a random one need not


FULL = Plan(
    model=models.SMOLLM2,
    held_out=24,
    max_tokens=40,
    # Version 1 is a short first try; version 2 trains twice as long.
    first={"learningRate": 1e-3, "maxSteps": 10, "microBatchSize": 8, "evalEverySteps": 5},
    second={"learningRate": 1e-3, "epochs": 1, "microBatchSize": 8, "evalEverySteps": 8},
    lora_rank=16,
    few_shot=3,
    must_improve=True,
)
QUICK = Plan(
    model=models.TINY,
    held_out=12,
    max_tokens=32,
    first={"learningRate": 1e-2, "maxSteps": 15, "microBatchSize": 16, "evalEverySteps": 5},
    second={"learningRate": 1e-2, "maxSteps": 40, "microBatchSize": 16, "evalEverySteps": 10},
    lora_rank=16,
    few_shot=1,  # the tiny model's context is 256 tokens
    must_improve=False,
)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def prepare_model(plan: Plan) -> Path:
    cache = models.cache_dir()
    started = time.monotonic()
    if plan.model == models.SMOLLM2:
        path = models.smollm2(cache)
    else:
        path = models.tiny(cache, task.corpus(), task.questions())
    print(f"  {plan.model}: {path} ({time.monotonic() - started:.1f} s)")
    return path


def server_settings(plan: Plan, model_path: Path) -> dict[str, Any]:
    return {
        "models": {plan.model: str(model_path)},
        "logging": {"level": "WARNING"},
        "training": {"heartbeat_seconds": 5, "poll_seconds": 0.5},
        "inference": {"base_model": plan.model, "max_batch": 24},
    }


def ingest(client: Client, plan: Plan) -> dataset_pb2.Dataset:
    sample = task.sample()
    step(f"ingest: upload the bundled sample orders.jsonl ({len(sample)} bytes)")
    dataset = client.datasets.upload(
        sample,
        display_name="orders",
        options={"validationFraction": 0.2, "splitSeed": 7, "tokenizerModel": plan.model},
        on_progress=lambda sent, total: print(f"  sent {sent}/{total} bytes"),
    )
    report, cleaning = dataset.validation_report, dataset.cleaning_report
    print(
        f"  {dataset.name}: {dataset.record_count} records "
        f"({dataset.train_record_count} train / {dataset.validation_record_count} validation)"
    )
    print(f"  read {report.total_records}, rejected {report.rejected_records}:")
    for error in report.errors:
        code = dataset_pb2.RecordErrorCode.Name(error.code).removeprefix("RECORD_ERROR_CODE_")
        print(f"    line {error.line}: {code}: {error.message}")
    print(
        f"  duplicates removed: {cleaning.exact_duplicates_removed} exact, "
        f"{cleaning.near_duplicates_removed} near"
    )
    for count in cleaning.pii_counts:
        kind = dataset_pb2.PiiType.Name(count.type).removeprefix("PII_TYPE_")
        print(f"  PII redacted: {count.count} x {kind}")
    tokens = dataset.token_statistics
    print(
        f"  tokens ({tokens.tokenizer_model}): {tokens.total_tokens} in all, "
        f"{tokens.tokens_per_record.mean:.0f} per record on average"
    )
    return dataset


def held_out_prompt(client: Client, dataset: str) -> list[dict[str, str]]:
    """The turns of a validation record (one the training never sees) before its answer."""
    (record,) = client.datasets.preview(
        dataset, split=dataset_pb2.DATASET_SPLIT_VALIDATION, limit=1
    )
    return [{"role": m.role, "content": m.content} for m in record.messages][:-1]


def train(client: Client, plan: Plan, dataset: str, hyperparameters: dict[str, Any]) -> str:
    """Run a LoRA job, printing the loss as it falls; the registered version."""
    job = client.training_jobs.create(
        {
            "displayName": "orders",
            "baseModel": plan.model,
            "method": "TRAINING_METHOD_LORA",
            "lora": {"rank": plan.lora_rank},
            "hyperparameters": {"maxSequenceLength": 256, **hyperparameters},
            "trainDataset": dataset,
            "adapter": ADAPTER,
        }
    )
    print(f"  {job.name} created; estimate: {job.resource_estimate.explanation}")
    print(f"  {'step':>9} {'train loss':>10} {'val loss':>9} {'tok/s':>7} {'eta':>6}")

    def show(event: training_job_pb2.TrainingEvent) -> None:
        if event.HasField("state_change"):
            state = training_job_pb2.TrainingJob.State.Name(event.state_change.state)
            print(f"  [{state.removeprefix('STATE_')}]", flush=True)
        elif event.HasField("progress"):
            p = event.progress
            validation = f"{p.validation_loss:9.4f}" if p.HasField("validation_loss") else " " * 9
            print(
                f"  {p.step:>4}/{p.total_steps:<4} {p.train_loss:10.4f} {validation} "
                f"{p.tokens_per_second:7.0f} {p.eta.seconds:5d}s",
                flush=True,
            )

    started = time.monotonic()
    job = client.training_jobs.wait(job.name, on_event=show)
    if job.state != training_job_pb2.TrainingJob.STATE_SUCCEEDED:
        raise SystemExit(f"training failed: {job.error.reason}: {job.error.message}")
    evaluation = job.evaluation
    print(
        f"  done in {time.monotonic() - started:.0f} s: validation loss "
        f"{evaluation.base_validation_loss:.4f} (base) -> {evaluation.validation_loss:.4f}; "
        f"registered {job.output_adapter_version}"
    )
    return job.output_adapter_version


def prompting_examples(client: Client, dataset: str, count: int) -> list[dict[str, str]]:
    """The few-shot baseline's example turns: the request and answer of training records."""
    turns = []
    for record in client.datasets.preview(
        dataset, split=dataset_pb2.DATASET_SPLIT_TRAIN, limit=count
    ):
        turns += [{"role": m.role, "content": m.content} for m in record.messages]
    return [turn for turn in turns if turn["role"] != "system"]


def evaluate(
    client: Client, plan: Plan, dataset: str, versions: dict[str, str]
) -> evaluation_pb2.EvaluationJob:
    """One EvaluationService job: the base model (the baseline), the base model prompted with
    worked examples from the training split, and each version, on the held-out validation
    records; exact match (with a gate: significantly better than the base model) and JSON
    validity."""
    job = client.evaluations.create(
        {
            "displayName": "orders: base, few-shot prompting, adapters",
            "candidates": [
                {"name": "base"},
                {"name": "few-shot", "fewShot": prompting_examples(client, dataset, plan.few_shot)},
                *({"name": name, "adapter": version} for name, version in versions.items()),
            ],
            "baseline": "base",
            "dataset": dataset,
            "maxItems": plan.held_out,
            "sampling": {"maxTokens": plan.max_tokens},
            "graders": [{"type": "exact_match"}, {"type": "json_valid"}],
            "gate": {"metric": "exact_match"},
        }
    )
    print(f"  {job.name}: {len(job.candidates)} candidates, up to {plan.held_out} items each")
    started, shown = time.monotonic(), [-1]

    def progress(current: evaluation_pb2.EvaluationJob) -> None:
        """A line per candidate's worth of answers."""
        if current.answers_total and current.answers_done // plan.held_out != shown[0]:
            shown[0] = current.answers_done // plan.held_out
            print(f"  answers {current.answers_done}/{current.answers_total}", flush=True)

    done = client.evaluations.wait(job.name, on_change=progress)
    if done.state != evaluation_pb2.EvaluationJob.STATE_SUCCEEDED:
        raise SystemExit(f"evaluation failed: {done.error_reason}: {done.error_message}")
    print(f"  done in {time.monotonic() - started:.0f} s")
    return done


def show_results(job: evaluation_pb2.EvaluationJob) -> None:
    """The table: each candidate's exact match with its 95% interval, the paired difference
    from the baseline with its interval and McNemar's exact p-value, JSON validity, the gate."""
    compared_with = f"vs {job.baseline} (95% CI)"
    print(
        f"  {'candidate':<10} {'exact match':<23} {compared_with:<24} "
        f"{'McNemar p':>9}  {'valid JSON':<11} gate"
    )
    for result in job.results:
        scores = {score.grader: score for score in result.scores}
        exact, valid = scores["exact_match"], scores["json_valid"]
        hits = round(exact.mean * exact.count)
        line = f"{hits}/{exact.count} {exact.mean:4.0%} [{exact.ci_low:.0%}, {exact.ci_high:.0%}]"
        compared, p_value = "(baseline)", ""
        if exact.HasField("comparison"):
            c = exact.comparison
            compared = f"{c.difference:+.0%} [{c.ci_low:+.0%}, {c.ci_high:+.0%}]"
            p_value = f"{c.p_value:.2g}"
        gate = ""
        if result.HasField("gate_passed"):
            gate = "passed" if result.gate_passed else "failed"
        print(
            f"  {result.candidate:<10} {line:<23} {compared:<24} {p_value:>9}  "
            f"{valid.mean:<11.0%} {gate}"
        )


def improve(client: Client, plan: Plan, dataset: str) -> retraining_pb2.RetrainingRun:
    """One turn of the loop. A frozen evaluation set (the held-out records evaluated above); prod
    answers other held-out prompts, and each wrong answer is rated -1 with the right one; a
    retraining run turns the corrections (with prod's own training data) into a challenger,
    judges it against prod on the frozen set, and moves prod only through the gate."""
    held = list(
        client.datasets.preview(
            dataset, split=dataset_pb2.DATASET_SPLIT_VALIDATION, limit=2 * plan.held_out
        )
    )
    lines = [json.dumps({"messages": [_turn(m) for m in r.messages]}) for r in held]
    frozen = client.datasets.upload(
        ("\n".join(lines[: plan.held_out]) + "\n").encode(),
        display_name="orders-frozen",
        options={"validationFraction": 0},
    )
    policy = client.retraining.create_policy(
        {
            "adapter": ADAPTER,
            "evaluation": {
                "dataset": frozen.name,
                "split": "DATASET_SPLIT_TRAIN",
                "sampling": {"maxTokens": plan.max_tokens},
                "graders": [{"type": "exact_match"}, {"type": "json_valid"}],
                "gate": {"metric": "exact_match"},
            },
            "data": {"minNewExamples": 1},
            "recipe": {"hyperparameters": plan.first},  # v2's recipe, trained as briefly as v1
            "promotion": "PROMOTION_AUTO",
        }
    )
    print(f"  {policy.name}: challenger judged against prod on {frozen.name}, gate exact_match")
    corrected = 0
    for record in held[plan.held_out :]:
        turns = [_turn(m) for m in record.messages]
        answer = client.inference.generate(messages=turns[:-1], adapter=PROD, max_tokens=64)
        if answer.text.strip() != turns[-1]["content"].strip():
            client.inference.feedback(
                answer.response_id, rating=-1, corrected_text=turns[-1]["content"]
            )
            corrected += 1
    print(f"  prod answered {len(held) - plan.held_out} prompts; {corrected} corrected")
    run = client.retraining.start("orders")

    def show(current: retraining_pb2.RetrainingRun) -> None:
        if current.events:
            print(f"  {current.events[-1].message}", flush=True)

    run = client.retraining.wait(run.name, on_change=show)
    for name in run.evaluation_jobs:
        show_results(client.evaluations.get(name))
    turns = [_turn(m) for m in held[0].messages][:-1]
    served = client.inference.generate(messages=turns, adapter=PROD, max_tokens=8)
    print(f"  {PROD} serves {served.adapter_version}: {describe(run)}")
    return run


def describe(run: retraining_pb2.RetrainingRun) -> str:
    if run.state != retraining_pb2.RetrainingRun.STATE_SUCCEEDED:
        return f"{run.name} failed: {run.error_reason}: {run.error_message}"
    outcome = retraining_pb2.RetrainingRun.Outcome.Name(run.outcome).removeprefix("OUTCOME_")
    why = f" ({'; '.join(run.gate_reasons)})" if run.gate_reasons else ""
    return f"{outcome.lower()}{why}"


def _turn(message: Any) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


def ask(client: Client, turns: list[dict[str, str]], adapter: str) -> str:
    """Stream one answer to the terminal; the version that produced it."""
    label = adapter or "base model"
    print(f"  {label:<28} ", end="", flush=True)
    version = ""
    for piece in client.inference.generate_stream(messages=turns, adapter=adapter, max_tokens=64):
        print(piece.text_delta, end="", flush=True)
        version = piece.adapter_version or version
    print(f"   [{version or 'base'}]")
    return version


def show_metrics(metrics_url: str) -> None:
    with urllib.request.urlopen(metrics_url, timeout=5) as page:  # noqa: S310 - local
        lines = page.read().decode().splitlines()
    wanted = (
        "tunefleet_inference_requests_total",
        "tunefleet_inference_generated_tokens_total",
        "tunefleet_inference_alias_swaps_total",
    )
    for line in lines:
        if line.startswith(wanted):
            print(f"  {line}")


def run(
    quick: bool = False,
    data_dir: Path | None = None,
    target: str = "",
    metrics_url: str = "",
    openai_url: str = "",
) -> int:
    """The tour on `tunefleet serve` started here, or (`target`) on services already running
    there, a gateway in front of them for example, with the base model of the plan; the
    OpenAI-compatible API (`openai_url`, the started server's own) is asked once."""
    plan = QUICK if quick else FULL
    started = time.monotonic()
    if target:
        step(f"the services at {target}, serving {plan.model}")
        code = tour(target, metrics_url, plan, openai_url)
    else:
        step(f"base model {plan.model} (prepared once and cached)")
        model_path = prepare_model(plan)
        data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tunefleet-demo-"))
        server = LocalServer(data_dir, server_settings(plan, model_path))
        step(
            f"starting `tunefleet serve` on {server.target} (all five services; data in {data_dir})"
        )
        with server:
            openai_url = f"http://127.0.0.1:{server.openai_port}/v1"
            code = tour(server.target, server.metrics_url, plan, openai_url)
        print(f"  tunefleet serve exited with {server.process.returncode if server.process else 0}")
    print(f"  demo finished in {time.monotonic() - started:.0f} s")
    return code


def ask_openai(openai_url: str, turns: list[dict[str, str]]) -> None:
    """The same question through the OpenAI-compatible API, as any OpenAI client asks it."""
    import openai

    with openai.OpenAI(base_url=openai_url, api_key="unused", max_retries=0) as client:
        model = PROD.removeprefix("adapters/")
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=turns,  # type: ignore[arg-type]
            max_tokens=64,
            temperature=0,
        )
        reply = raw.parse()
    print(f"  {model:<28} {reply.choices[0].message.content}")
    print(f"  [{raw.headers['x-tunefleet-adapter-version']}; response id {reply.id}]")


def tour(target: str, metrics_url: str, plan: Plan, openai_url: str = "") -> int:
    with Client(target) as client:
        dataset = ingest(client, plan)
        prompt = held_out_prompt(client, dataset.name)
        print(f"  held-out prompt: {prompt[-1]['content']!r}")

        step("fine-tune version 1 (LoRA, live loss)")
        first = train(client, plan, dataset.name, plan.first)
        moved = client.adapters.set_alias("orders", "prod", first, reason="first version")
        print(f"  {moved.name} -> {moved.version}")

        step("the same prompt, base model and adapters/orders@prod")
        ask(client, prompt, "")
        served_before = ask(client, prompt, PROD)

        step("fine-tune version 2 (longer)")
        second = train(client, plan, dataset.name, plan.second)

        step(
            f"evaluate with EvaluationService on {plan.held_out} held-out records: the base "
            f"model, the base model shown {plan.few_shot} worked example(s), versions 1 and 2"
        )
        evaluation = evaluate(client, plan, dataset.name, {"v1": first, "v2": second})
        show_results(evaluation)
        gates = {
            r.candidate: r.gate_passed for r in evaluation.results if r.HasField("gate_passed")
        }

        step("move prod to version 2 (compare-and-set against version 1), no restart")
        moved = client.adapters.set_alias(
            "orders", "prod", second, reason="longer training", expected_version=first
        )
        print(f"  {moved.name} -> {moved.version}")
        deadline = time.monotonic() + 30
        served_after = served_before
        while served_after == served_before and time.monotonic() < deadline:
            answer = client.inference.generate(messages=prompt, adapter=PROD, max_tokens=64)
            served_after = answer.adapter_version
        ask(client, prompt, PROD)
        print(f"  {PROD} served {served_before}, now {served_after}")
        for served in client.inference.served():
            aliases = ", ".join(served.routed_aliases) or "-"
            print(
                f"  loaded {served.adapter_version}: aliases {aliases}, "
                f"{served.request_count} requests"
            )

        if openai_url:
            step(f"the same prompt through the OpenAI-compatible API ({openai_url}, openai client)")
            ask_openai(openai_url, prompt)

        step("feedback on an answer")
        answer = client.inference.generate(messages=prompt, adapter=PROD, max_tokens=64)
        feedback = client.inference.feedback(answer.response_id, rating=1, comment="correct")
        print(f"  {feedback.name}: rating {feedback.rating:+.0f} for {feedback.adapter_version}")

        if metrics_url:
            step("per-adapter metrics (Prometheus)")
            show_metrics(metrics_url)

        step("the improvement loop: corrected answers retrain prod, judged against it")
        loop = improve(client, plan, dataset.name)

        step(f"summary ({evaluation.name})")
        show_results(evaluation)
        improved = gates.get("v2", False)
        print(
            "  version 2 passed the gate (significantly better than the base model): "
            + ("yes" if improved else "no")
        )
        if not plan.must_improve:
            print(
                "  (--quick: a tiny model trained for seconds; the loss falls, answers stay wrong)"
            )
        print(f"  served version after the alias move: {served_after}")
        print(f"  the loop's run: {describe(loop)}")
    if plan.must_improve and not improved:
        print("  version 2 is not significantly better than the base model: the demo failed")
        return 1
    return 0
