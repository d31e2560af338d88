"""Request and response bodies of the OpenAI API routes served on the device, written from
the OpenAI API reference (Completions, Chat Completions, Models).

Requests forbid unknown fields, as OpenAI does, so a typo is an error rather than a silent
default. Fields clients commonly send that this server does not act on are accepted only at
their neutral value (n=1, no logprobs, penalties 0), so nothing is silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 200_000
MAX_STOPS = 4  # OpenAI's limit
MAX_MESSAGES = 512

Stop = str | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOPS)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Accepted at their neutral values only: this server has one choice and no penalties.
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, value: Stop) -> Stop:
        if value == "":
            raise ValueError("a stop string must not be empty")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """`POST /v1/completions`. One prompt (a string, or a list holding one string)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(...)
    max_tokens: int | None = Field(16, ge=1, le=32_768)  # OpenAI's default for completions
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_size(cls, value: str | list[str]) -> str | list[str]:
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("the prompt is empty")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=64)] = Field(...)
    name: str | None = Field(None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content_size(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        text = value if isinstance(value, str) else "".join(p.text for p in value)
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"a message is longer than {MAX_PROMPT_CHARS} characters")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`. Text messages only (no tools, images or audio)."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    logprobs: Literal[False] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses ----------------------------------------------------------------------------

Source = Literal["local", "coordinator"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str
    # Where the text was produced: this device, or the coordinator's LLM after escalation.
    cotune_source: Source
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cotune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
