"""EvaluationService end to end on the demo's real model, SmolLM2-135M-Instruct: adapters trained
by TrainingService on the bundled order-extraction sample are judged against the base model, a
few-shot prompting baseline and an untrained LoRA on the held-out records, and against the base
model on the bundled general suite (whole-word answers) with KL from the base model, where an
over-trained adapter shows what it forgot. Minutes on CPU: marked `large`, run alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.evaluation.test_runner import upload_version
from tests.training.conftest import Platform
from tunefleet.client import AsyncClient, Options
from tunefleet.demo import models, task
from tunefleet.suites import general, jsonl
from tunefleet.v1 import dataset_pb2, evaluation_pb2, training_job_pb2

pytestmark = [pytest.mark.large, pytest.mark.timeout(3600)]
MakePlatform = Any
BETTER = evaluation_pb2.EVALUATION_VERDICT_BETTER
WORSE = evaluation_pb2.EVALUATION_VERDICT_WORSE


def untrained_lora(model: Path, directory: Path) -> Path:
    """PEFT's LoRA initialisation (B = 0) with B nudged off zero, so that the registry, which
    refuses adapters that change nothing, takes it: an adapter that was never trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 1e-4)
    peft_model.save_pretrained(str(directory))
    return directory


async def train(client: AsyncClient, dataset: str, adapter: str, **hyperparameters: Any) -> str:
    job = await client.training_jobs.create(
        {
            "baseModel": models.SMOLLM2,
            "method": "TRAINING_METHOD_LORA",
            "lora": {"rank": 16},
            "hyperparameters": {"maxSequenceLength": 256, "microBatchSize": 8, **hyperparameters},
            "trainDataset": dataset,
            "adapter": adapter,
        }
    )
    job = await client.training_jobs.wait(job.name)
    assert job.state == training_job_pb2.TrainingJob.STATE_SUCCEEDED, job.error
    return str(job.output_adapter_version)


async def evaluate(client: AsyncClient, **job: Any) -> evaluation_pb2.EvaluationJob:
    created = await client.evaluations.create({"baseline": "base", **job})
    done: evaluation_pb2.EvaluationJob = await client.evaluations.wait(created.name)
    assert done.state == evaluation_pb2.EvaluationJob.STATE_SUCCEEDED, done.error_message
    return done


def scores(job: evaluation_pb2.EvaluationJob) -> dict[str, dict[str, Any]]:
    return {r.candidate: {s.grader: s for s in r.scores} for r in job.results}


def table(job: evaluation_pb2.EvaluationJob) -> str:
    """The results as the test's failure message (and -s output) shows them."""
    lines = []
    for result in job.results:
        for s in result.scores:
            c = s.comparison
            versus = (
                f" diff {c.difference:+.3f} p {c.p_value:.3g}" if s.HasField("comparison") else ""
            )
            lines.append(f"{result.candidate:<12} {s.grader:<14} {s.mean:.3f} n {s.count}{versus}")
        lines.append(
            f"{result.candidate:<12} gate {result.gate_passed} {list(result.gate_reasons)}"
        )
    return "\n".join(lines)


async def test_the_gate_passes_a_trained_adapter_and_the_suite_shows_an_over_trained_ones_loss(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    model = models.smollm2(models.cache_dir())
    platform: Platform = await make_platform(
        models={models.SMOLLM2: str(model)},
        inference={"base_model": models.SMOLLM2, "max_batch": 24},
    )
    assert platform.server is not None
    target = f"127.0.0.1:{platform.server.port}"
    async with AsyncClient(target, options=Options(timeout=600)) as client:
        orders = await client.datasets.upload(
            task.sample(),
            display_name="orders",
            options={"validationFraction": 0.2, "splitSeed": 7},
        )
        # Every seventh record of the general suite: 43 items over all its tasks, all kept.
        suite = await client.datasets.upload(
            jsonl(general()[::7]),
            display_name="general",
            options={
                "validationFraction": 0,
                "removeExactDuplicates": False,
                "removeNearDuplicates": False,
            },
        )
        assert suite.train_record_count == 43
        # Trained as the demo's version 1 (10 steps); over-trained: two epochs (48 steps) at five
        # times the learning rate.
        trained = await train(
            client,
            orders.name,
            "adapters/orders",
            learningRate=1e-3,
            maxSteps=10,
            evalEverySteps=10,
        )
        over = await train(
            client, orders.name, "adapters/orders", learningRate=5e-3, epochs=2, evalEverySteps=48
        )
        await client.adapters.create("untrained", base_model=models.SMOLLM2)
        untrained = await upload_version(
            platform, "untrained", untrained_lora(model, tmp_path / "untrained"), create=False
        )

        examples = []
        async for record in client.datasets.preview(
            orders.name, split=dataset_pb2.DATASET_SPLIT_TRAIN, limit=3
        ):
            examples += [
                {"role": m.role, "content": m.content}
                for m in record.messages
                if m.role != "system"
            ]
        task_job = await evaluate(
            client,
            candidates=[
                {"name": "base"},
                {"name": "few-shot", "fewShot": examples},
                {"name": "trained", "adapter": trained},
                {"name": "untrained", "adapter": untrained},
            ],
            dataset=orders.name,
            maxItems=24,
            sampling={"maxTokens": 48},
            graders=[{"type": "exact_match"}, {"type": "json_valid"}],
            gate={"metric": "exact_match", "minImprovement": 0.2},
        )
        print(table(task_job))
        results = {r.candidate: r for r in task_job.results}
        found = scores(task_job)
        assert found["trained"]["exact_match"].comparison.verdict == BETTER, table(task_job)
        assert results["trained"].gate_passed, table(task_job)
        assert not results["untrained"].gate_passed, table(task_job)
        assert results["untrained"].gate_reasons[0].startswith("exact_match: no significant")
        assert found["few-shot"]["exact_match"].count == 24  # the prompting baseline, reported
        assert results["few-shot"].HasField("gate_passed")

        regression = await evaluate(
            client,
            candidates=[
                {"name": "base"},
                {"name": "trained", "adapter": trained},
                {"name": "over-trained", "adapter": over},
            ],
            dataset=suite.name,
            split="DATASET_SPLIT_TRAIN",
            sampling={"maxTokens": 24},
            graders=[
                {"name": "general", "type": "string_check", "operation": "like", "normalise": True},
                {"type": "kl_from_base"},
            ],
        )
        print(table(regression))
        found = scores(regression)
        general_base = found["base"]["general"]
        assert general_base.count == 43 and general_base.mean >= 0.25, table(regression)
        lost = found["over-trained"]["general"].comparison
        assert lost.verdict == WORSE and lost.p_value < 0.01, table(regression)
        # KL from the base model, per token, on the suite's prompts: reported for each adapter,
        # and larger for the one trained harder.
        kl = {name: found[name]["kl_from_base"] for name in ("trained", "over-trained")}
        assert all(k.count == 43 and k.lower_is_better for k in kl.values())
        assert 0 < kl["trained"].mean < kl["over-trained"].mean, table(regression)
