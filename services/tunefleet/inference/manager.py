"""InferenceService's core: checks a generation request, routes it to the version it names,
streams the engine's output, and records the response, with per-adapter metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from tunefleet.core import names
from tunefleet.core.chat import parse_tool_calls, render, tool_use_problem
from tunefleet.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TunefleetError,
    Unavailable,
)
from tunefleet.core.tasks import cancel
from tunefleet.inference.adapters import AdapterPool, ServedVersion
from tunefleet.inference.engine import (
    AdapterNotLoaded,
    Engine,
    EngineClosed,
    Finish,
    GenerationRequest,
    Sampling,
    ScoringNotSupported,
    TokenScore,
)
from tunefleet.inference.feedback import Feedback, FeedbackRow, ResponseLog
from tunefleet.inference.metrics import UNRESOLVED, InferenceMetrics, version_labels
from tunefleet.storage.pagination import (
    Page,
    check_page_size,
    decode_page_token,
    encode_page_token,
)
from tunefleet.v1 import common_pb2, inference_pb2, inference_service_pb2

MAX_STOP_STRINGS = 8
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
FINISH = {
    Finish.STOP: inference_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
}


@dataclass
class Piece:
    """A piece of a response as the servicer sends it."""

    response_id: str
    text: str
    adapter_version: str
    finish_reason: int = inference_pb2.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # On the last piece of a request that offered tools: the calls its text makes.
    tool_calls: tuple[common_pb2.ToolCall, ...] = ()
    content: str | None = None  # then: the text before the first call
    token_ids: tuple[int, ...] = ()  # generated since the previous piece
    eos_token: int | None = None  # on the last piece: the end-of-sequence token that ended it


class InferenceManager:
    """Serves requests with `engines[0]` (for the base model and every adapter it accepts) and
    the engines after it (adapters the first refuses)."""

    def __init__(
        self,
        engines: list[Engine],
        pool: AdapterPool,
        responses: ResponseLog,
        metrics: InferenceMetrics,
        max_tokens_limit: int,
        max_prompt_tokens: int = 0,
        aliases: list[str] = [],  # noqa: B006 (never mutated)
    ) -> None:
        self.engines, self.engine, self.pool = engines, engines[0], pool
        self.responses, self.metrics = responses, metrics
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens
        self._tool_problem: str | None = None  # why tools cannot be offered ('' if they can)
        self.aliases = aliases
        self._follow: asyncio.Task[None] | None = None
        self.longest_token = 0  # characters: what bounds a prompt's size before tokenising it

    async def start(self) -> None:
        """Start the engines, route the configured aliases, follow alias moves."""
        for engine in self.engines:
            await engine.start()
        self.longest_token = await asyncio.to_thread(longest_token, self.engine.tokenizer)
        await self.responses.start()
        # Follow first, then route: a move made while the aliases are routed is not missed.
        self._follow = asyncio.create_task(self.pool.follow(), name="alias-follower")
        await self.pool.following.wait()
        for alias in self.aliases:
            await self.pool.route(alias)

    async def stop(self) -> None:
        if self._follow is not None:
            await cancel(self._follow)
        await self.pool.close()
        await self.responses.close()
        for engine in self.engines:
            await engine.close()

    # --- what is served -----------------------------------------------------------------------

    def served_page(self, page_size: int, page_token: str) -> Page[ServedVersion]:
        """The loaded versions, by version name, a page at a time."""
        size = check_page_size(page_size)
        served = sorted(self.pool.served.values(), key=lambda v: (v.version, v.serving_name))
        start = 0
        if page_token:
            last = tuple(decode_page_token(page_token, "served"))
            start = next(
                (i for i, v in enumerate(served) if (v.version, v.serving_name) > last),
                len(served),
            )
        page = served[start : start + size]
        token = ""
        if start + size < len(served):
            token = encode_page_token([page[-1].version, page[-1].serving_name], "served")
        return Page(page, token)

    async def load(self, reference: str, pin: bool) -> ServedVersion:
        """Load a version, or route an alias (to its version, loaded); `pin` keeps it loaded."""
        if names.version_ref(reference, "adapter").alias is None:
            return await self.pool.load(reference, pin=pin)
        served = await self.pool.route(reference)
        served.pinned |= pin
        return served

    async def unload(self, reference: str) -> tuple[ServedVersion, list[str]]:
        """Unload a version (every copy), or the version an alias is routed to; what it was and
        the aliases routed to it, as they were before it unloads."""
        if names.version_ref(reference, "adapter").alias is not None:
            routed = self.pool.routes.get(reference)
            if routed is None:
                raise InvalidArgument("adapter", f"{reference} is not routed here")
            found = [routed]
        else:
            found = self.pool.find(reference)
            if not found:
                raise NotFound(f"{reference} is not loaded on this server")
        for served in found:
            served.pinned = False
        aliases = self.pool.aliases_of(found[-1])
        await asyncio.gather(*(self.pool.unload(served) for served in found))
        return found[-1], aliases

    async def create_feedback(self, feedback: Feedback, request_id: str) -> FeedbackRow:
        row, created = await self.responses.create_feedback(feedback, request_id)
        if created:
            # A version this replica never served: its other series appear at zero now.
            self.metrics.version_seen(row.adapter_version)
            labels = version_labels(row.adapter_version)
            self.metrics.feedback_score.labels(*labels).observe((row.rating + 1) / 2)
            sign = "negative" if row.rating < 0 else "positive" if row.rating > 0 else "neutral"
            corrected = "true" if row.corrected_text else "false"
            self.metrics.feedback.labels(*labels, sign, corrected).inc()
        return row

    # --- generation ----------------------------------------------------------------------------

    async def generate(
        self, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[Piece]:
        """Stream one response. Every request is counted once in the requests metric, with its
        outcome: ok, cancelled (the client left), invalid (its fault) or error."""
        started = time.perf_counter()
        labels, outcome, served = UNRESOLVED, "error", None
        prompt_ids: list[int] = []
        text, finish, tokens, first, cached = [], Finish.STOP, 0, None, 0
        self.metrics.in_flight.inc()
        try:
            sampling = self._sampling(request.sampling)
            self._check_size(request, sampling)
            served = await self.pool.acquire(request.adapter, request.routing_key)
            version = served.version if served is not None else ""
            labels = version_labels(version)
            engine = served.engine if served is not None and served.engine else self.engine
            prompt_ids = await self._prompt(request, sampling, engine)
            response_id = uuid.uuid4().hex
            yield Piece(response_id, "", version)
            generation = GenerationRequest(
                prompt_ids, served.serving_name if served else None, sampling
            )
            try:
                async for output in engine.generate(generation):
                    if first is None and (output.token_ids or output.finish):
                        first = time.perf_counter()
                        self.metrics.time_to_first_token.labels(*labels).observe(first - started)
                    text.append(output.text)
                    cached += output.cached_tokens
                    if output.finish is not None:
                        finish, tokens = output.finish, output.completion_tokens
                        piece = Piece(
                            response_id,
                            output.text,
                            version,
                            FINISH[output.finish],
                            len(prompt_ids),
                            tokens,
                            token_ids=output.token_ids,
                            eos_token=output.eos_token,
                        )
                        yield _with_tool_calls(piece, request, "".join(text))
                    elif output.text or output.token_ids:
                        yield Piece(response_id, output.text, version, token_ids=output.token_ids)
            except AdapterNotLoaded as error:  # the pool's promise broken: refuse, never guess
                raise Unavailable(str(error), reason="ADAPTER_NOT_LOADED") from error
            except EngineClosed as error:
                raise Unavailable(str(error), reason="ENGINE_CLOSED") from error
            outcome = "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except TunefleetError as error:
            if error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                outcome = "invalid"
            elif labels is UNRESOLVED and "adapter_version" in error.metadata:
                refused = error.metadata["adapter_version"]  # refused, not loaded
                self.metrics.version_seen(refused)
                labels = version_labels(refused)
            raise
        finally:
            self.metrics.in_flight.dec()
            self.pool.release(served)
            ended = time.perf_counter()
            self.metrics.requests.labels(*labels, outcome).inc()
            if labels is not UNRESOLVED:
                self.metrics.prompt_tokens.labels(*labels).inc(len(prompt_ids))
                self.metrics.cached_prompt_tokens.labels(*labels).inc(cached)
                self.metrics.generated_tokens.labels(*labels).inc(tokens)
                self.metrics.latency.labels(*labels).observe(ended - started)
            if first is not None:
                self.metrics.queue_time.labels(*labels).observe(first - started)
                if tokens > 1:
                    per_token = (ended - first) / (tokens - 1)
                    self.metrics.time_per_output_token.labels(*labels).observe(per_token)
            if outcome == "ok":
                document = json_format.MessageToDict(request, preserving_proto_field_name=True)
                self.responses.record(response_id, version, document, "".join(text), finish.value)

    async def score(
        self, request: inference_service_pb2.ScoreCompletionRequest
    ) -> inference_service_pb2.ScoreCompletionResponse:
        """The log-probability of each token of the request's completion after its input (and of
        the input's own tokens with `score_input`), under the adapter it names (held, like a
        generation's, until the engine has answered)."""
        if request.completion and request.completion_token_ids:
            raise InvalidArgument("completion", "give a completion or its token ids, not both")
        if not (request.completion or request.completion_token_ids or request.score_input):
            raise InvalidArgument(
                "completion", "a completion or its completion_token_ids are required"
            )
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be 0 to {MAX_TOP_LOGPROBS}")
        served = await self.pool.acquire(request.adapter, split=False)  # the alias's own version
        try:
            engine = served.engine if served is not None and served.engine else self.engine
            context = engine.context_length or self.engine.context_length
            prompt_ids = await asyncio.to_thread(self._tokenise, request)
            tokenizer = engine.tokenizer or self.engine.tokenizer
            completion_ids = _token_ids(
                request.completion_token_ids, len(tokenizer), "completion_token_ids"
            )
            if request.completion:
                completion_ids = (
                    await asyncio.to_thread(tokenizer, request.completion, add_special_tokens=False)
                ).input_ids
                if not completion_ids:
                    raise InvalidArgument("completion", "has no tokens")
            ids = prompt_ids + completion_ids
            if context and len(ids) > context:
                raise InvalidArgument(
                    "completion",
                    f"input and completion are {len(ids)} tokens: more than the model's "
                    f"context of {context}",
                    reason="PROMPT_TOO_LONG",
                )
            start = 1 if request.score_input else len(prompt_ids)
            if start >= len(ids):
                raise InvalidArgument("input", "one token, and no completion: nothing to score")
            try:
                scores = await self._score(engine, served, ids, start, request.top_logprobs)
            except AdapterNotLoaded as error:
                raise Unavailable(str(error), reason="ADAPTER_NOT_LOADED") from error
            except EngineClosed as error:
                raise Unavailable(str(error), reason="ENGINE_CLOSED") from error
            except ScoringNotSupported as error:
                raise FailedPrecondition(str(error), reason="SCORING_NOT_SUPPORTED") from error
            scored = await asyncio.to_thread(_scored_tokens, tokenizer, ids, start, scores)
            if request.score_input:
                first = inference_pb2.ScoredToken(token_id=ids[0], text=_text(tokenizer, ids[0]))
                scored.insert(0, first)
            cut = len(prompt_ids) if request.score_input else 0
            return inference_service_pb2.ScoreCompletionResponse(
                adapter_version=served.version if served is not None else "",
                token_ids=completion_ids,
                token_logprobs=[s.logprob for s in scores[len(scores) - len(completion_ids) :]],
                prompt_tokens=len(prompt_ids),
                tokens=scored[cut:],
                input_tokens=scored[:cut],
            )
        finally:
            self.pool.release(served)

    async def _score(
        self, engine: Engine, served: ServedVersion | None, ids: list[int], start: int, top: int
    ) -> list[TokenScore]:
        """Scores from the engine serving the version; the base model's from the first engine
        that scores (vLLM refuses: the PEFT engine beside it holds the same weights)."""
        if served is not None:
            return await engine.score(ids, start, served.serving_name, top)
        refusal = None
        for candidate in self.engines:
            try:
                return await candidate.score(ids, start, None, top)
            except ScoringNotSupported as error:
                refusal = refusal or error
        assert refusal is not None
        raise refusal

    def _sampling(self, params: inference_pb2.SamplingParams) -> Sampling:
        max_tokens = params.max_tokens or min(256, self.max_tokens_limit)
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise InvalidArgument("sampling.max_tokens", f"must be 1 to {self.max_tokens_limit}")
        temperature = params.temperature if params.HasField("temperature") else 0.0
        if not 0.0 <= temperature <= 2.0:
            raise InvalidArgument("sampling.temperature", "must be 0 to 2")
        top_p = params.top_p if params.HasField("top_p") else 1.0
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("sampling.top_p", "must be in (0, 1]")
        if len(params.stop) > MAX_STOP_STRINGS or any(not s for s in params.stop):
            raise InvalidArgument(
                "sampling.stop", f"at most {MAX_STOP_STRINGS} non-empty stop strings"
            )
        seed = params.seed if params.HasField("seed") else None
        return Sampling(max_tokens, temperature, top_p, tuple(params.stop), seed)

    def _budget(self, sampling: Sampling, context: int) -> tuple[int | None, str]:
        """The most tokens a prompt may have, and the limits that set it."""
        budget, limits = [], []
        if context:
            if sampling.max_tokens >= context:
                raise InvalidArgument(
                    "sampling.max_tokens",
                    f"{sampling.max_tokens} leaves no room for a prompt in the model's context "
                    f"of {context} tokens",
                )
            budget.append(context - sampling.max_tokens)
            limits.append(f"the model's context of {context} tokens less max_tokens")
        if self.max_prompt_tokens:
            budget.append(self.max_prompt_tokens)
            limits.append(f"max_prompt_tokens {self.max_prompt_tokens}")
        return (min(budget) if budget else None), " and ".join(limits)

    def _check_size(
        self, request: inference_service_pb2.GenerateRequest, sampling: Sampling
    ) -> None:
        """Refuse a prompt too long to fit the budget before anything costly (finding the
        adapter, tokenising): no token is longer than `longest_token` characters, so a prompt
        of more characters than budget times that has more tokens than the budget."""
        budget, limits = self._budget(sampling, self.engine.context_length)
        if budget is None or not self.longest_token:
            return
        which = request.WhichOneof("input")
        if which == "chat":
            size = sum(len(m.role) + len(m.content) for m in request.chat.messages)
        elif which == "prompt_token_ids":
            size = len(request.prompt_token_ids.ids) * self.longest_token
        else:
            size = len(request.prompt)
        if size > budget * self.longest_token:
            raise InvalidArgument(
                "input",
                f"the prompt is {size} characters: more than the {budget} tokens that fit "
                f"({limits}) can hold",
                reason="PROMPT_TOO_LONG",
            )

    async def _prompt(
        self,
        request: inference_service_pb2.GenerateRequest,
        sampling: Sampling,
        engine: Engine,
    ) -> list[int]:
        """The prompt's token ids (tokenised off the event loop), within the prompt budget:
        the configured limit and the model's context less the tokens asked for."""
        budget, limits = self._budget(sampling, engine.context_length or self.engine.context_length)
        ids = await asyncio.to_thread(self._tokenise, request)
        if budget is not None and len(ids) > budget:
            raise InvalidArgument(
                "input",
                f"the prompt has {len(ids)} tokens; at most {budget} fit ({limits})",
                reason="PROMPT_TOO_LONG",
            )
        return ids

    def _tokenise(
        self,
        request: inference_service_pb2.GenerateRequest
        | inference_service_pb2.ScoreCompletionRequest,
    ) -> list[int]:
        """The input's token ids: a prompt tokenised, a chat rendered and tokenised, or token ids
        checked against the vocabulary; never none."""
        which = request.WhichOneof("input")
        tokenizer = self.engine.tokenizer
        ids: list[int]
        if which == "prompt_token_ids":
            ids = _token_ids(request.prompt_token_ids.ids, len(tokenizer), "prompt_token_ids.ids")
        elif which == "prompt" and request.prompt:
            ids = tokenizer(request.prompt, add_special_tokens=False).input_ids
        elif which == "chat" and request.chat.messages:
            ids = self._render(request.chat, tokenizer)
        else:
            raise InvalidArgument("input", "a prompt, chat messages or token ids are required")
        if not ids:
            raise InvalidArgument("input", "the prompt has no tokens")
        return ids

    def _render(self, chat: inference_pb2.ChatInput, tokenizer: Any) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition(
                "the base model has no chat template: send a prompt", reason="NO_CHAT_TEMPLATE"
            )
        tools = _tools(chat.tools)
        if tools:
            if self._tool_problem is None:
                self._tool_problem = tool_use_problem(tokenizer) or ""
            if self._tool_problem:
                raise FailedPrecondition(
                    f"chat.tools: the base model cannot be offered tools: {self._tool_problem}",
                    reason="TOOLS_NOT_SUPPORTED",
                )
        messages = [_message(m, f"chat.messages[{i}]") for i, m in enumerate(chat.messages)]
        text = render(tokenizer, messages, generation_prompt=True, tools=tools)
        return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_ids(ids: Sequence[int], vocabulary: int, field: str) -> list[int]:
    for index, token in enumerate(ids):
        if not 0 <= token < vocabulary:
            raise InvalidArgument(
                f"{field}[{index}]",
                f"{token} is not a token id of the model (0 to {vocabulary - 1})",
            )
    return list(ids)


def _text(tokenizer: Any, token_id: int) -> str:
    text: str = tokenizer.decode([token_id])
    return text


def _scored_tokens(
    tokenizer: Any, ids: list[int], start: int, scores: list[TokenScore]
) -> list[inference_pb2.ScoredToken]:
    """`ids[start:]` with their scores and the texts of them and their alternatives."""
    return [
        inference_pb2.ScoredToken(
            token_id=token,
            text=_text(tokenizer, token),
            logprob=score.logprob,
            top_logprobs=[
                inference_pb2.TokenLogprob(token_id=other, text=_text(tokenizer, other), logprob=lp)
                for other, lp in score.top
            ],
        )
        for token, score in zip(ids[start:], scores, strict=True)
    ]


def _json_object(text: str, field: str, default: dict[str, Any] | None = None) -> Any:
    if not text and default is not None:
        return default
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidArgument(field, "is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def _tools(tools: Any) -> list[dict[str, Any]]:
    """The offered tools in the form chat templates read; bad ones refused naming the field."""
    out, seen = [], set()
    for index, tool in enumerate(tools):
        field = f"chat.tools[{index}]"
        if not tool.name:
            raise InvalidArgument(f"{field}.name", "is required")
        if tool.name in seen:
            raise InvalidArgument(f"{field}.name", f"{tool.name!r} is offered twice")
        seen.add(tool.name)
        parameters = _json_object(tool.parameters, f"{field}.parameters", {"type": "object"})
        out.append({"name": tool.name, "description": tool.description, "parameters": parameters})
    return out


def _message(message: common_pb2.ChatMessage, field: str) -> dict[str, Any]:
    """A chat turn in tunefleet's canonical form (`tunefleet.core.chat`)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id or f"call_{index}",
                "name": call.name,
                "arguments": _json_object(
                    call.arguments, f"{field}.tool_calls[{index}].arguments", {}
                ),
            }
            for index, call in enumerate(message.tool_calls)
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _with_tool_calls(piece: Piece, request: Any, text: str) -> Piece:
    """The last piece of a request that offered tools, with the calls its whole text makes."""
    if request.WhichOneof("input") != "chat" or not request.chat.tools:
        return piece
    parsed = parse_tool_calls(text, {tool.name for tool in request.chat.tools})
    if parsed is None or not parsed[1]:
        return piece
    content, calls = parsed
    piece.content = content
    piece.tool_calls = tuple(
        common_pb2.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=c.name, arguments=c.arguments)
        for c in calls
    )
    if piece.finish_reason == inference_pb2.FINISH_REASON_STOP:
        piece.finish_reason = inference_pb2.FINISH_REASON_TOOL_CALLS
    return piece


def longest_token(tokenizer: Any) -> int:
    """An upper bound on the prompt characters one token covers: the longest vocabulary entry.
    An entry spells what it covers with at least one character per character (byte-level BPE
    one per byte, SentencePiece `▁` for a space, byte fallback `<0x0A>` six for one byte);
    only tokenizers that drop text (whitespace-splitting WordPiece, not an LLM's) escape it."""
    return max(len(token) for token in tokenizer.get_vocab())
