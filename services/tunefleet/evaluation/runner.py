"""An evaluation run: the items of a pinned dataset, answered by every candidate through
InferenceService (the engines, chat templates and adapter routing of production), graded, and
summarised against the baseline.

Items are a dataset's records read through DatasetService: the turns before the last assistant
turn are the input, the last assistant turn's text the reference. A candidate is the base model
or an adapter (`adapters/x@alias`, `adapters/x/versions/n`), optionally with a system prompt and
example turns put before each item's turns (a prompting baseline). Sampling is greedy unless the
run says otherwise, so reruns on the same versions give the same answers.

A generation that fails after retries, like an item a grader cannot grade, is a fault: counted,
and failing the run above `max_error_rate`, never scored as a wrong answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from tunefleet.core.errors import relayed
from tunefleet.evaluation.graders import Grader, GraderError, Item
from tunefleet.evaluation.report import (
    EvaluationFailed,
    Gate,
    GateVerdict,
    GraderSummary,
    judge_gate,
    summarise,
)
from tunefleet.runtime.peers import DatasetServicePeer, Peer
from tunefleet.v1 import (
    common_pb2,
    dataset_pb2,
    dataset_service_pb2,
    inference_pb2,
    inference_service_pb2,
    inference_service_pb2_grpc,
)

RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
PAGE = 500


@dataclass(frozen=True)
class Candidate:
    name: str
    adapter: str = ""  # empty: the base model
    system_prompt: str = ""
    few_shot: tuple[common_pb2.ChatMessage, ...] = ()


@dataclass(frozen=True)
class EvalItem(Item):
    messages: tuple[common_pb2.ChatMessage, ...] = ()


@dataclass
class ItemResult:
    index: int
    candidate: str
    output: str | None  # None: the generation failed
    scores: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # grader (or "generation") -> why


@dataclass
class Outcome:
    items: list[ItemResult]
    summary: dict[str, dict[str, GraderSummary]]
    gates: dict[str, GateVerdict]


class DatasetReader(DatasetServicePeer):
    """The datasets a job names (`dataset`) and their items."""

    async def items(
        self, dataset: str, split: dataset_pb2.DatasetSplit.ValueType, limit: int = 0
    ) -> list[EvalItem]:
        """The dataset's records as items, in order; `limit` 0 reads them all."""
        items: list[EvalItem] = []
        while not limit or len(items) < limit:
            page = PAGE if not limit else min(PAGE, limit - len(items))
            request = dataset_service_pb2.PreviewDatasetRecordsRequest(
                name=dataset, split=split, offset=len(items), limit=page
            )
            try:
                records = [
                    r
                    async for r in self.stub.PreviewDatasetRecords(
                        request, timeout=self.call_seconds, metadata=self.metadata
                    )
                ]
            except grpc.aio.AioRpcError as error:
                raise relayed(error, self.service) from None
            items += [_item(record) for record in records]
            if len(records) < page:
                break
        return items


def _item(record: dataset_pb2.DatasetRecord) -> EvalItem:
    messages = list(record.messages)
    if not messages or messages[-1].role != "assistant" or messages[-1].tool_calls:
        raise EvaluationFailed(
            f"record {record.index} does not end with an assistant's text answer to compare with"
        )
    return EvalItem(
        id=str(record.index), reference=messages[-1].content, messages=tuple(messages[:-1])
    )


class Generator(Peer):
    stub_class = inference_service_pb2_grpc.InferenceServiceStub
    service = "InferenceService"
    call_seconds = 600.0
    attempts = 3

    async def answer(
        self, candidate: Candidate, item: EvalItem, sampling: inference_pb2.SamplingParams
    ) -> str:
        turns = list(candidate.few_shot) + list(item.messages)
        if candidate.system_prompt:
            turns.insert(0, common_pb2.ChatMessage(role="system", content=candidate.system_prompt))
        request = inference_service_pb2.GenerateRequest(
            adapter=candidate.adapter,
            chat=inference_pb2.ChatInput(messages=turns),
            sampling=sampling,
        )
        for attempt in range(self.attempts):
            try:
                response = await self.stub.Generate(
                    request, timeout=self.call_seconds, metadata=self.metadata
                )
                return str(response.text)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRIED or attempt == self.attempts - 1:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


async def run(
    items: Sequence[EvalItem],
    candidates: Sequence[Candidate],
    graders: Sequence[Grader],
    generator: Generator,
    sampling: inference_pb2.SamplingParams,
    baseline: str,
    gate: Gate | None = None,
    concurrency: int = 8,
    max_error_rate: float = 0.02,
    known: Mapping[tuple[str, int], str] | None = None,
    record: Callable[[ItemResult], Awaitable[None]] | None = None,
) -> Outcome:
    """Answer every item with every candidate (at most `concurrency` requests at once), grade,
    and summarise against `baseline`; EvaluationFailed when faults pass `max_error_rate`.
    `known` answers (by candidate and item, from an interrupted run) are graded, not asked for
    again; `record` is called with each result as it is graded."""
    names = [c.name for c in candidates]
    if baseline not in names:
        raise ValueError(f"the baseline {baseline!r} is not a candidate")
    limit = asyncio.Semaphore(concurrency)

    async def one(candidate: Candidate, index: int, item: EvalItem) -> ItemResult:
        output = (known or {}).get((candidate.name, index))
        failure = ""
        if output is None:
            async with limit:
                try:
                    output = await generator.answer(candidate, item, sampling)
                except grpc.aio.AioRpcError as error:
                    failure = f"{error.code().name}: {error.details()}"
        result = ItemResult(index, candidate.name, output)
        for grader in graders:
            if output is None:
                result.scores[grader.name] = None
                result.errors[grader.name] = failure
                continue
            try:
                result.scores[grader.name] = grader.score(output, item)
            except GraderError as error:
                result.scores[grader.name] = None
                result.errors[grader.name] = str(error)
        if record is not None:
            await record(result)
        return result

    results = await asyncio.gather(
        *(one(c, i, item) for c in candidates for i, item in enumerate(items))
    )
    scores: dict[str, dict[str, list[float | None]]] = {
        c.name: {g.name: [None] * len(items) for g in graders} for c in candidates
    }
    for result in results:
        for name, value in result.scores.items():
            scores[result.candidate][name][result.index] = value
    clusters = [item.cluster for item in items] if any(i.cluster for i in items) else None
    binary = {g.name: g.binary for g in graders}
    try:
        summary = summarise(scores, binary, baseline, clusters, max_error_rate)
    except EvaluationFailed as error:
        first = next(r for r in results if r.errors)  # a fault, for the reader to start from
        why = next(iter(first.errors.values()))
        raise EvaluationFailed(f"{error}; item {first.index} of {first.candidate}: {why}") from None
    gates = {name: judge_gate(gate, summary[name]) for name in names if gate and name != baseline}
    return Outcome(list(results), summary, gates)
