"""An evaluation run: the items of a pinned dataset, answered by every candidate through
InferenceService (the engines, chat templates and adapter routing of production), graded, and
summarised against the baseline.

Items are a dataset's records read through DatasetService: the turns before the last assistant
turn are the input, the last assistant turn's text the reference. A candidate is the base model
or an adapter (`adapters/x@alias`, `adapters/x/versions/n`), optionally with a system prompt and
example turns put before each item's turns (a prompting baseline). Sampling is greedy unless the
run says otherwise, so reruns on the same versions give the same answers.

A candidate or a judge may also be an external OpenAI-compatible endpoint, called with the
official `openai` client (which retries throttling and server errors itself).

A generation that fails after retries, like an item a grader cannot grade, is a fault: counted,
and failing the run above `max_error_rate`, never scored as a wrong answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tunefleet.core.errors import relayed
from tunefleet.core.graders import Grader, GraderError, Item
from tunefleet.evaluation.judges import PairwiseJudge, ScoreJudge, pairwise_score, parse_choice
from tunefleet.evaluation.likelihood import KlFromBase, Perplexity
from tunefleet.evaluation.report import (
    EvaluationFailed,
    Gate,
    GateVerdict,
    GraderSummary,
    judge_gate,
    summarise,
    summarise_pairwise,
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
# Judges answer greedily, with room to explain before their verdict.
JUDGE_SAMPLING = inference_pb2.SamplingParams(max_tokens=512, temperature=0.0)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat completions API."""

    base_url: str
    model: str
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Candidate:
    name: str
    adapter: str = ""  # empty: the base model
    system_prompt: str = ""
    few_shot: tuple[common_pb2.ChatMessage, ...] = ()
    endpoint: Endpoint | None = None  # answers instead of InferenceService


class GenerationError(Exception):
    """A model did not answer (after retries); the message says why."""


@dataclass(frozen=True)
class Answer:
    text: str
    version: str = ""  # the adapter version that answered; empty for the base model, endpoints
    token_ids: tuple[int, ...] = ()  # InferenceService's answers only


AnyGrader = Grader | ScoreJudge | PairwiseJudge | Perplexity | KlFromBase


@dataclass(frozen=True)
class EvalItem(Item):
    messages: tuple[common_pb2.ChatMessage, ...] = ()


@dataclass
class ItemResult:
    index: int
    candidate: str
    output: str | None  # None: the generation failed
    scores: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # grader -> why it could not grade
    judgements: dict[str, str] = field(default_factory=dict)  # what judges replied
    # Pairwise judges: the choice with the candidate first and with the baseline first.
    choices: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


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
            records = await self._records(dataset, split, len(items), page)
            items += [_item(record) for record in records]
            if len(records) < page:
                break
        return items

    async def item(
        self, dataset: str, split: dataset_pb2.DatasetSplit.ValueType, index: int
    ) -> EvalItem:
        """The item at `index` of the split."""
        records = await self._records(dataset, split, index, 1)
        if not records:
            raise EvaluationFailed(f"{dataset} has no item {index} any more")
        return _item(records[0])

    async def _records(
        self, dataset: str, split: dataset_pb2.DatasetSplit.ValueType, offset: int, limit: int
    ) -> list[dataset_pb2.DatasetRecord]:
        request = dataset_service_pb2.PreviewDatasetRecordsRequest(
            name=dataset, split=split, offset=offset, limit=limit
        )
        try:
            return [
                record
                async for record in self.stub.PreviewDatasetRecords(
                    request, timeout=self.call_seconds, metadata=self.metadata
                )
            ]
        except grpc.aio.AioRpcError as error:
            raise relayed(error, self.service) from None


def _item(record: dataset_pb2.DatasetRecord) -> EvalItem:
    messages = list(record.messages)
    if not messages or messages[-1].role != "assistant" or messages[-1].tool_calls:
        raise EvaluationFailed(
            f"record {record.index} does not end with an assistant's text answer to compare with"
        )
    return EvalItem(
        id=str(record.index),
        reference=messages[-1].content,
        cluster=record.cluster,
        messages=tuple(messages[:-1]),
    )


class Generator(Peer):
    """Answers through InferenceService, or through a candidate's own OpenAI-compatible
    endpoint."""

    stub_class = inference_service_pb2_grpc.InferenceServiceStub
    service = "InferenceService"
    call_seconds = 600.0
    attempts = 3

    def __init__(self, endpoint: str = "", token: str = "") -> None:
        super().__init__(endpoint, token)
        self._clients: dict[tuple[str, str], Any] = {}

    async def answer(
        self, candidate: Candidate, item: EvalItem, sampling: inference_pb2.SamplingParams
    ) -> Answer:
        turns = _turns(candidate, item)
        if candidate.endpoint is not None:
            return Answer(await self._external(candidate.endpoint, turns, sampling))
        request = inference_service_pb2.GenerateRequest(
            adapter=candidate.adapter,
            chat=inference_pb2.ChatInput(messages=turns),
            sampling=sampling,
        )
        response = await self._call("Generate", request)
        return Answer(str(response.text), str(response.adapter_version), tuple(response.token_ids))

    async def score(
        self, candidate: Candidate, item: EvalItem, completion: str | Sequence[int]
    ) -> list[float]:
        """The log-probability of each token of `completion` (a text, or token ids) as the
        candidate's answer."""
        if candidate.endpoint is not None:
            raise GenerationError("an external endpoint gives no log-probabilities")
        request = inference_service_pb2.ScoreCompletionRequest(
            adapter=candidate.adapter,
            chat=inference_pb2.ChatInput(messages=_turns(candidate, item)),
        )
        if isinstance(completion, str):
            request.completion = completion
        else:
            request.completion_token_ids.extend(completion)
        response = await self._call("ScoreCompletion", request)
        return list(response.token_logprobs)

    async def _call(self, method: str, request: Any) -> Any:
        """A call to InferenceService, retried while it is unavailable or busy."""
        for attempt in range(self.attempts):
            try:
                return await getattr(self.stub, method)(
                    request, timeout=self.call_seconds, metadata=self.metadata
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRIED or attempt == self.attempts - 1:
                    raise GenerationError(f"{error.code().name}: {error.details()}") from None
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def _external(
        self,
        endpoint: Endpoint,
        turns: list[common_pb2.ChatMessage],
        sampling: inference_pb2.SamplingParams,
    ) -> str:
        import openai

        key = (endpoint.base_url, endpoint.api_key)
        if key not in self._clients:
            self._clients[key] = openai.AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=endpoint.api_key or "none",  # the client insists on one
                max_retries=self.attempts - 1,
                timeout=self.call_seconds,
            )
        options: dict[str, Any] = {"temperature": 0.0}
        if sampling.max_tokens:
            options["max_tokens"] = sampling.max_tokens
        if sampling.HasField("temperature"):
            options["temperature"] = sampling.temperature
        if sampling.HasField("top_p"):
            options["top_p"] = sampling.top_p
        if sampling.HasField("seed"):
            options["seed"] = sampling.seed
        if sampling.stop:
            options["stop"] = list(sampling.stop)
        try:
            response = await self._clients[key].chat.completions.create(
                model=endpoint.model,
                messages=[{"role": t.role, "content": t.content} for t in turns],
                **options,
            )
        except openai.APIError as error:
            raise GenerationError(f"{endpoint.base_url}: {error}") from None
        choices = getattr(response, "choices", None)
        if not choices or not isinstance(choices[0].message.content, str):
            raise GenerationError(f"{endpoint.base_url}: the reply has no text answer")
        return choices[0].message.content

    async def ask(self, judge: Candidate, prompt: str) -> str:
        """A judge's reply to one prompt, greedy."""
        item = EvalItem(id="judge", messages=(common_pb2.ChatMessage(role="user", content=prompt),))
        return (await self.answer(judge, item, JUDGE_SAMPLING)).text

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        await super().close()


def _turns(candidate: Candidate, item: EvalItem) -> list[common_pb2.ChatMessage]:
    """The candidate's system prompt, the item's own system turns, the candidate's example
    turns, then the rest of the item's turns (system turns stay first, where chat templates
    expect them)."""
    messages = list(item.messages)
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    system = (
        [common_pb2.ChatMessage(role="system", content=candidate.system_prompt)]
        if candidate.system_prompt
        else []
    )
    return [*system, *messages[:lead], *candidate.few_shot, *messages[lead:]]


class Models:
    """The generator's calls (answers, judges, scores), at most `limit` at once."""

    def __init__(self, generator: Generator, limit: asyncio.Semaphore) -> None:
        self.generator, self.limit = generator, limit

    async def ask(self, judge: Candidate, prompt: str) -> str:
        async with self.limit:
            return await self.generator.ask(judge, prompt)

    async def answer(
        self, candidate: Candidate, item: EvalItem, sampling: inference_pb2.SamplingParams
    ) -> Answer:
        async with self.limit:
            return await self.generator.answer(candidate, item, sampling)

    async def score(
        self, candidate: Candidate, item: EvalItem, completion: str | Sequence[int]
    ) -> list[float]:
        async with self.limit:
            return await self.generator.score(candidate, item, completion)


async def run(
    items: Sequence[EvalItem],
    candidates: Sequence[Candidate],
    graders: Sequence[AnyGrader],
    generator: Generator,
    sampling: inference_pb2.SamplingParams,
    baseline: str,
    gate: Gate | None = None,
    concurrency: int = 8,
    max_error_rate: float = 0.02,
    known: Mapping[tuple[str, int], str] | None = None,
    record: Callable[[ItemResult], Awaitable[None]] | None = None,
    pinned: Callable[[str, str], Awaitable[None]] | None = None,
) -> Outcome:
    """Answer every item with every candidate (at most `concurrency` model calls at once, the
    judges' included), grade, and summarise against `baseline`; EvaluationFailed when faults
    pass `max_error_rate`. `known` answers (by candidate and item, from an interrupted run) are
    graded, not asked for again; `record` is called with each result as it is graded.

    A candidate naming an alias answers its first item alone; the version that answered it then
    answers every other item (`pinned` is told, with the candidate's name), so an alias moved
    during the run cannot mix two versions' answers."""
    names = [c.name for c in candidates]
    if baseline not in names:
        raise ValueError(f"the baseline {baseline!r} is not a candidate")
    known = dict(known or {})
    # The versions that answered each candidate: one, or the run is refused.
    versions: dict[str, set[str]] = {c.name: set() for c in candidates}
    if items:
        candidates = await asyncio.gather(
            *(_pin(c, items[0], generator, sampling, known, versions, pinned) for c in candidates)
        )
    models = Models(generator, asyncio.Semaphore(concurrency))
    # The baseline's answers, which pairwise judges wait for (None: it has none).
    baseline_answers = [asyncio.get_running_loop().create_future() for _ in items]

    async def answer(candidate: Candidate, index: int, item: EvalItem) -> ItemResult:
        output = known.get((candidate.name, index))
        failure = ""
        if output is None:
            try:
                found = await models.answer(candidate, item, sampling)
                output = found.text
                versions[candidate.name].add(found.version)
            except GenerationError as error:
                failure = str(error)
        return ItemResult(index, candidate.name, output, errors={"": failure})

    async def one(candidate: Candidate, index: int, item: EvalItem) -> ItemResult:
        result: ItemResult | None = None
        try:
            result = await answer(candidate, index, item)
        finally:
            if candidate.name == baseline and not baseline_answers[index].done():
                baseline_answers[index].set_result(result.output if result else None)
        failure = result.errors.pop("")
        for grader in graders:
            if grader.pairwise and candidate.name == baseline:
                continue  # the baseline is what the others are compared with
            result.scores[grader.name] = None
            if result.output is None:
                result.errors[grader.name] = failure
                continue
            try:
                other = await baseline_answers[index] if grader.pairwise else None
                result.scores[grader.name] = await _grade(
                    grader, models, candidate, item, result, other
                )
            except (GraderError, GenerationError) as error:
                result.errors[grader.name] = str(error)
        if record is not None:
            await record(result)
        return result

    results = await asyncio.gather(
        *(one(c, i, item) for c in candidates for i, item in enumerate(items))
    )
    for candidate in candidates:
        if len(versions[candidate.name]) > 1:  # an alias that could not be pinned, and moved
            found = ", ".join(sorted(versions[candidate.name]))
            raise EvaluationFailed(
                f"{candidate.adapter} moved during the evaluation: {candidate.name} was answered "
                f"by {found}"
            )
    clusters = None
    if any(item.cluster for item in items):  # an item without one is a cluster of its own
        clusters = [item.cluster or f"item {index}" for index, item in enumerate(items)]
    try:
        summary = summarise(
            _by_grader(results, candidates, [g for g in graders if not g.pairwise], len(items)),
            {g.name: g.binary for g in graders},
            baseline,
            clusters,
            max_error_rate,
            {g.name for g in graders if g.lower_is_better},
        )
        for grader in (g for g in graders if g.pairwise):
            for candidate in (c for c in candidates if c.name != baseline):
                mine = sorted(
                    (r for r in results if r.candidate == candidate.name), key=lambda r: r.index
                )
                summary[candidate.name][grader.name] = summarise_pairwise(
                    [r.choices.get(grader.name, (None, None)) for r in mine],
                    f"{grader.name} of {candidate.name}",
                    clusters,
                    max_error_rate,
                )
    except EvaluationFailed as error:
        first = next(r for r in results if r.errors)  # a fault, for the reader to start from
        why = next(iter(first.errors.values()))
        raise EvaluationFailed(f"{error}; item {first.index} of {first.candidate}: {why}") from None
    gates = {name: judge_gate(gate, summary[name]) for name in names if gate and name != baseline}
    return Outcome(list(results), summary, gates)


async def _pin(
    candidate: Candidate,
    first: EvalItem,
    generator: Generator,
    sampling: inference_pb2.SamplingParams,
    known: dict[tuple[str, int], str],
    versions: dict[str, set[str]],
    pinned: Callable[[str, str], Awaitable[None]] | None,
) -> Candidate:
    """The candidate with its alias replaced by the version that answers its first item (that
    answer kept in `known`); as it is when it names no alias or the first item got no answer
    (its faults are counted as the run goes)."""
    if "@" not in candidate.adapter or candidate.endpoint is not None:
        return candidate
    try:
        found = await generator.answer(candidate, first, sampling)
    except GenerationError:
        return candidate
    versions[candidate.name].add(found.version)
    if not found.version:
        return candidate
    if pinned is not None:
        await pinned(candidate.name, found.version)
    known.setdefault((candidate.name, 0), found.text)
    return dataclasses.replace(candidate, adapter=found.version)


async def _grade(
    grader: AnyGrader,
    models: Models,
    candidate: Candidate,
    item: EvalItem,
    result: ItemResult,
    baseline_output: str | None,
) -> float:
    """One grader's score of one answer (judges' replies kept on `result`)."""
    output = result.output
    assert output is not None
    if isinstance(grader, Grader):
        return grader.score(output, item)
    if isinstance(grader, Perplexity):
        return await grader.grade(models.score, candidate, item)
    if isinstance(grader, KlFromBase):
        return await grader.grade(models.score, models.answer, candidate, item, result.index)
    if isinstance(grader, ScoreJudge):
        score, reply = await grader.grade(models.ask, item, output)
        result.judgements[grader.name] = reply
        return score
    if baseline_output is None:
        raise GraderError("the baseline has no answer to compare with")
    replies = await asyncio.gather(
        grader.ask_order(models.ask, item, output, baseline_output),
        grader.ask_order(models.ask, item, baseline_output, output),
        return_exceptions=True,  # both calls end before the item does
    )
    failed = [r for r in replies if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    first, second = str(replies[0]), str(replies[1])
    result.judgements[f"{grader.name}/candidate_first"] = first
    result.judgements[f"{grader.name}/baseline_first"] = second
    result.choices[grader.name] = (_choice(first), _choice(second))
    return pairwise_score(parse_choice(first), parse_choice(second))  # GraderError: no verdict


def _choice(reply: str) -> str | None:
    try:
        return parse_choice(reply)
    except GraderError:
        return None


def _by_grader(
    results: Sequence[ItemResult],
    candidates: Sequence[Candidate],
    graders: Sequence[AnyGrader],
    count: int,
) -> dict[str, dict[str, list[float | None]]]:
    """`scores[candidate][grader]` item by item."""
    scores: dict[str, dict[str, list[float | None]]] = {
        c.name: {g.name: [None] * count for g in graders} for c in candidates
    }
    for result in results:
        for name, value in result.scores.items():
            if name in scores[result.candidate]:
                scores[result.candidate][name][result.index] = value
    return scores
