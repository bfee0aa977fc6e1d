"""The request bodies of the inference endpoints as OpenAI documents them, checked with pydantic.
Parameters tunefleet cannot honour are refused by name rather than ignored (a server that ignores
`n` or `logit_bias` answers something else than what was asked); unknown extras are ignored, as
OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunefleet.openai_front.errors import OpenAIError, bad_request

# The protobuf integer fields the values go into.
INT32 = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0, le=INT32)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # The end user: requests of one user land on one side of an alias's canary.
    user: str | None = Field(default=None, max_length=256)

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise bad_request("n", "only n=1 is supported: send one request per completion")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(name, "is not supported (only 0)", "unsupported_parameter")
        if self.logit_bias:
            raise bad_request("logit_bias", "is not supported", "unsupported_parameter")

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32)
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | str | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request(
                "tool_choice",
                "only 'auto' and 'none' are supported: the model chooses whether to call",
                "unsupported_parameter",
            )
        if self.logprobs:
            raise bad_request(
                "logprobs",
                "chat completions do not return log-probabilities here: use /v1/completions "
                "with logprobs (and echo for the prompt's)",
                "unsupported_parameter",
            )
        if self.response_format and self.response_format.get("type") != "text":
            raise bad_request(
                "response_format", "only {'type': 'text'} is supported", "unsupported_parameter"
            )
        if self.max_tokens == 0:
            raise bad_request("max_tokens", "must be at least 1")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Body):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise bad_request("suffix", "is not supported (no insertion)", "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise bad_request("best_of", "only best_of=1 is supported", "unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens", "0 is only meaningful with echo")
        if self.stream and (self.logprobs is not None or self.echo):
            raise bad_request("stream", "streamed completions do not return echo or logprobs here")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text or token id list each."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


def parse(body: Any, cls: type[_Body]) -> Any:
    """The body as `cls`, or 400 naming the first parameter at fault."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        parsed = cls.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        location = [str(part) for part in first["loc"]]
        raise bad_request(location[0] if location else "body", first["msg"]) from None
    parsed.refuse_unsupported()
    return parsed
