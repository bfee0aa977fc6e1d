"""An evaluation run over gRPC on the embedded platform: the validation items of a dataset read
through DatasetService, answered through InferenceService by the base model, a prompting
baseline, a trained adapter and an untrained one, graded and judged against the base model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import LINEAR_LAYERS, conversation
from tests.training.conftest import Platform
from tunefleet.core.graders import grader
from tunefleet.evaluation.likelihood import KlFromBase, Perplexity
from tunefleet.evaluation.report import EvaluationFailed, Gate
from tunefleet.evaluation.runner import (
    AnyGrader,
    Candidate,
    DatasetReader,
    EvalItem,
    Generator,
    _turns,
    run,
)
from tunefleet.v1 import (
    adapter_pb2,
    adapter_service_pb2,
    common_pb2,
    dataset_pb2,
    inference_pb2,
    training_job_pb2,
)

MakePlatform = Any
pytestmark = pytest.mark.timeout(600)
GREEDY = inference_pb2.SamplingParams(max_tokens=20, temperature=0.0)


async def upload_version(
    platform: Platform, adapter: str, directory: Path, create: bool = True
) -> str:
    if create:
        await platform.adapters.CreateAdapter(
            adapter_service_pb2.CreateAdapterRequest(
                adapter_id=adapter, adapter=adapter_pb2.Adapter(base_model="colours")
            )
        )

    files = {path.name: path.read_bytes() for path in sorted(directory.iterdir())}  # noqa: ASYNC240

    async def requests() -> Any:
        request = adapter_service_pb2.UploadAdapterVersionRequest
        yield request(header=request.Header(parent=f"adapters/{adapter}"))
        for name, data in files.items():
            yield request(file=adapter_pb2.AdapterFile(path=name, size_bytes=len(data)))
            yield request(chunk=data)
        yield request(finish_write=True)

    return str((await platform.adapters.UploadAdapterVersion(requests())).name)


def untrained_lora(chat_model: Path, directory: Path, seed: int = 5) -> Path:
    """A LoRA adapter with random weights, never trained on the task. (A zero one, as PEFT
    initialises it, cannot be registered: the registry refuses adapters that change nothing.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(chat_model)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(directory))
    return directory


async def test_base_prompting_baseline_trained_and_untrained_adapters_judged(
    make_platform: MakePlatform, chat_model: Path, tmp_path: Path
) -> None:
    platform = await make_platform(inference={"base_model": "colours", "max_loaded_adapters": 2})
    dataset = await platform.upload()
    job = await platform.create(
        dataset.name,
        lora={"rank": 16, "target_modules": [*LINEAR_LAYERS, "lm_head"]},
        hyperparameters={"max_steps": 300, "epochs": 100, "eval_every_steps": 300},
    )
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=600)
    assert job.state == training_job_pb2.TrainingJob.State.STATE_SUCCEEDED, job.error
    untrained = await upload_version(
        platform, "untrained", untrained_lora(chat_model, tmp_path / "untrained")
    )

    assert platform.server is not None
    address = f"127.0.0.1:{platform.server.port}"
    reader, generator = DatasetReader(address), Generator(address)
    items = await reader.items(dataset.name, dataset_pb2.DATASET_SPLIT_VALIDATION)
    assert len(items) == dataset.validation_record_count > 0
    assert items[0].reference.startswith("Colour: ") and items[0].messages[-1].role == "user"
    example = conversation("cat", "red")[1:]  # the user's turn and the answer
    few_shot = tuple(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in example)
    candidates = [
        Candidate("base"),
        Candidate("prompted", system_prompt="Say: Colour: red. Done.", few_shot=few_shot),
        Candidate("adapter", adapter=job.output_adapter_version),
        Candidate("untrained", adapter=untrained),
    ]
    graders: list[AnyGrader] = [
        grader("exact_match"),
        grader("token_f1"),
        grader("rouge_l"),
        Perplexity("perplexity"),
        KlFromBase("kl", max_tokens=8),
    ]
    gate = Gate("exact_match", min_improvement=0.3)
    outcome = await run(items, candidates, graders, generator, GREEDY, "base", gate)
    await asyncio.gather(reader.close(), generator.close())

    summary = outcome.summary
    assert summary["base"]["exact_match"].estimate.mean == 0.0
    adapter = summary["adapter"]["exact_match"]
    assert adapter.estimate.mean >= 0.8, adapter
    assert adapter.comparison is not None and adapter.comparison.verdict == "better"
    assert outcome.gates["adapter"].passed
    untrained_gate = outcome.gates["untrained"]
    assert not untrained_gate.passed
    assert untrained_gate.reasons[0].startswith("exact_match: no significant difference")
    assert not outcome.gates["prompted"].passed  # a random model does not follow prompts
    outputs = {(r.candidate, r.index): r.output for r in outcome.items}
    assert any(outputs[("untrained", i)] != outputs[("base", i)] for i in range(len(items)))
    assert summary["adapter"]["rouge_l"].estimate.mean > summary["base"]["rouge_l"].estimate.mean
    rouge = summary["adapter"]["rouge_l"].comparison
    assert rouge is not None and rouge.test == "paired-bootstrap" and rouge.verdict == "better"

    # Perplexity of the references: far lower after training, and lower is better.
    perplexity = summary["adapter"]["perplexity"]
    assert perplexity.lower_is_better and perplexity.comparison is not None
    assert perplexity.estimate.mean < summary["base"]["perplexity"].estimate.mean / 2
    assert perplexity.comparison.difference < 0 and perplexity.comparison.verdict == "better"
    scores = {(r.candidate, r.index): r.scores for r in outcome.items}
    for name, adapter_dir in (("base", None), ("untrained", tmp_path / "untrained")):
        expected = reference_nll(chat_model, adapter_dir, items[0])
        assert scores[(name, 0)]["perplexity"] == pytest.approx(expected, abs=1e-4), name
    # KL from the base model: none for the base model and its prompting, some for adapters.
    assert all(scores[(c, i)]["kl"] == 0.0 for c in ("base", "prompted") for i in range(len(items)))
    # The trained adapter moved the distribution a lot (its answers are near certain, and
    # unlikely for the base model); the untrained one, small random weights, barely.
    kl = summary["adapter"]["kl"]
    assert kl.estimate.mean > 1 and kl.comparison is not None
    assert kl.comparison.verdict == "worse" and kl.comparison.difference == kl.estimate.mean
    assert abs(summary["untrained"]["kl"].estimate.mean) < kl.estimate.mean / 10


def reference_nll(chat_model: Path, adapter: Path | None, item: EvalItem) -> float:
    """The reference answer's mean negative log-likelihood per token after the item's turns
    (rendered by transformers' chat template), from plain transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model: Any = AutoModelForCausalLM.from_pretrained(chat_model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    turns = [{"role": m.role, "content": m.content} for m in item.messages]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(item.reference, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return -float(
        sum(logprobs[i - 1, ids[0, i]] for i in range(start, ids.shape[1])) / len(answer_ids)
    )


async def test_generation_failures_fail_the_run_loudly(make_platform: MakePlatform) -> None:
    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload()
    assert platform.server is not None
    address = f"127.0.0.1:{platform.server.port}"
    reader, generator = DatasetReader(address), Generator(address)
    items = await reader.items(dataset.name, dataset_pb2.DATASET_SPLIT_VALIDATION, limit=5)
    assert len(items) == 5
    candidates = [Candidate("base"), Candidate("missing", adapter="adapters/missing@prod")]
    with pytest.raises(EvaluationFailed, match="could not grade 5 of 5 items of missing"):
        await run(items, candidates, [grader("exact_match")], generator, GREEDY, "base")
    await asyncio.gather(reader.close(), generator.close())


async def test_an_alias_moved_during_a_run_does_not_mix_versions(
    make_platform: MakePlatform, chat_model: Path, tmp_path: Path
) -> None:
    platform = await make_platform(inference={"base_model": "colours", "max_loaded_adapters": 2})
    dataset = await platform.upload()
    one = await upload_version(platform, "moving", untrained_lora(chat_model, tmp_path / "1", 1))
    two = await upload_version(
        platform, "moving", untrained_lora(chat_model, tmp_path / "2", 2), create=False
    )
    await set_alias(platform, "adapters/moving/aliases/prod", one)
    assert platform.server is not None
    address = f"127.0.0.1:{platform.server.port}"
    reader, generator = DatasetReader(address), Generator(address)
    items = await reader.items(dataset.name, dataset_pb2.DATASET_SPLIT_VALIDATION, limit=8)
    moved: list[str] = []

    async def pinned(candidate: str, version: str) -> None:
        # The alias moves as soon as the first answer came, and the move is seen by
        # InferenceService before any other item is asked for.
        moved.append(version)
        await set_alias(platform, "adapters/moving/aliases/prod", two)
        probe = Candidate("probe", "adapters/moving@prod")
        for _ in range(600):
            if (await generator.answer(probe, items[0], GREEDY)).version == two:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("InferenceService did not see the alias move")

    graders = [grader("exact_match")]
    outcome = await run(
        items, [Candidate("prod", "adapters/moving@prod")], graders, generator, GREEDY, "prod",
        pinned=pinned,
    )  # fmt: skip
    assert moved == [one]
    exact = await run(items, [Candidate("one", one), Candidate("two", two)], graders, generator,
                      GREEDY, "one")  # fmt: skip
    answers = {(r.candidate, r.index): r.output for r in [*outcome.items, *exact.items]}
    assert all(answers[("prod", i)] == answers[("one", i)] for i in range(len(items)))
    assert any(answers[("two", i)] != answers[("one", i)] for i in range(len(items)))
    await asyncio.gather(reader.close(), generator.close())


async def set_alias(platform: Platform, alias: str, version: str) -> None:
    await platform.adapters.SetAdapterAlias(
        adapter_service_pb2.SetAdapterAliasRequest(name=alias, version=version)
    )


def test_a_prompting_candidates_turns_keep_system_turns_first() -> None:
    def chat(*turns: tuple[str, str]) -> tuple[common_pb2.ChatMessage, ...]:
        return tuple(common_pb2.ChatMessage(role=role, content=text) for role, text in turns)

    item = EvalItem(id="0", messages=chat(("system", "Reply in JSON."), ("user", "Order 2 pens")))
    prompted = Candidate(
        "prompted", system_prompt="Be brief.", few_shot=chat(("user", "1 cup"), ("assistant", "{}"))
    )
    assert [(t.role, t.content) for t in _turns(prompted, item)] == [
        ("system", "Be brief."),
        ("system", "Reply in JSON."),
        ("user", "1 cup"),
        ("assistant", "{}"),
        ("user", "Order 2 pens"),
    ]
    assert _turns(Candidate("base"), item) == list(item.messages)
