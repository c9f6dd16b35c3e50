"""OpenAI's wire format: request models (pydantic) and the response/chunk dicts we send back.

Requests are strict about unknown fields (OpenAI answers them with 400 too) but accept a few harmless bookkeeping
fields (``user``, ``metadata`` ...) and ignore them. ``top_k`` is an extension (as in vLLM), sent with the official
client through ``extra_body``. Ranges OpenAI documents are checked here; the server's own bounds (`Limits`) in app.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from instructgpt.generation import Completion
from instructgpt.serving.engine import token_pieces


class _Request(BaseModel):
    # strict, as OpenAI's types are: "16" is no integer, true no number, "yes" no boolean (an integer is a number)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[StrictBool] = None  # "yes" or 1 is no boolean here either


class _Sampling(_Request):
    model: StrictStr
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    n: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)  # torch.Generator.manual_seed's range
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None  # only empty/null accepted
    user: Optional[str] = None
    return_tokens_as_token_ids: Optional[bool] = None  # extension (as in vLLM): logprobs tokens as "token_id:N"


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[int] = Field(None, ge=1)
    best_of: Optional[int] = Field(None, ge=1)
    logprobs: Optional[int] = Field(None, ge=0)
    echo: Optional[bool] = None
    suffix: Optional[str] = None  # only null accepted


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: Optional[StrictStr] = None


# fields the SDK puts on assistant messages it returned; accepted back when empty
NULLABLE_MESSAGE_FIELDS = ("refusal", "annotations", "audio", "function_call", "tool_calls")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[StrictStr, list[ContentPart]]] = None
    name: Optional[StrictStr] = None
    refusal: Optional[Any] = None
    annotations: Optional[Any] = None
    audio: Optional[Any] = None
    function_call: Optional[Any] = None
    tool_calls: Optional[Any] = None

    @model_validator(mode="after")
    def _no_tools(self):
        for f in NULLABLE_MESSAGE_FIELDS:
            if getattr(self, f) not in (None, [], ""):
                raise ValueError(f"'{f}' is not supported")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text":
                raise ValueError(f"content parts of type {p.type!r} are not supported (text only)")
            if p.text is None:
                raise ValueError("a content part of type 'text' needs its 'text'")
            parts.append(p.text)
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0)
    response_format: Optional[dict[str, Any]] = None  # only {"type": "text"}
    # bookkeeping fields the official client may send; accepted and ignored
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None


# --------------------------------------------------------------------------------------------------------------------
# Responses: what the OpenAPI schema (GET /openapi.json) says the builders below return. These models only document;
# the tests validate real responses against the schema built from them.


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(_Doc):
    error: ErrorDetail


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Doc):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Doc):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Literal["stop", "length"]


class CompletionResponse(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: None
    usage: Usage


class ChatTopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Doc):
    content: list[ChatTokenLogprob]
    refusal: None


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: None
    usage: Usage


class CompletionChunkChoice(_Doc):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]  # null until the choice's last chunk


class CompletionChunk(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    system_fingerprint: None
    usage: Usage = None  # only in the last chunk (no choices), with stream_options.include_usage


class ChatDelta(_Doc):
    role: Literal["assistant"] = None  # only in each choice's first chunk
    content: str = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionChunk(_Doc):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: None
    usage: Usage = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Doc):
    status: Literal["ok"]


REQUEST_MODELS = (CompletionRequest, ChatRequest)
RESPONSE_MODELS = (ErrorResponse, CompletionResponse, ChatCompletionResponse, CompletionChunk, ChatCompletionChunk,
                   ModelList, ModelCard, Health)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class TokenLogprob:
    token: str  # how the token is shown: its text, or "token_id:N" when asked
    text: str  # the text this token adds to the completion
    logprob: float
    top: list[tuple[str, float]]  # most likely alternatives (shown the same way), best first


def logprob_entries(tokenizer, c: Completion, top_k: int, as_ids: bool = False) -> list[TokenLogprob]:
    """Per-token log-probs of the tokens that make up `c.text`: the ones after a stop string or the final EOS (which
    add no text) are left out, and the last one's text is clipped where a stop string cut the completion."""
    def show(tid: int) -> str:
        return f"token_id:{tid}" if as_ids else tokenizer.decode([tid], skip_special_tokens=False)

    pieces = token_pieces(tokenizer, c.token_ids)
    out, offset = [], 0
    for t, piece in enumerate(pieces):
        if offset >= len(c.text):
            break
        piece = piece[: len(c.text) - offset]
        top = []
        if top_k and c.top_logprobs:
            top = [(show(tid), lp) for tid, lp in list(c.top_logprobs[t].items())[:top_k]]
        out.append(TokenLogprob(f"token_id:{c.token_ids[t]}" if as_ids else piece, piece, c.logprobs[t], top))
        offset += len(piece)
    return out


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int) -> dict:
    """/v1/completions `logprobs`: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    offsets, pos = [], text_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.text)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _lp(token: str, logprob: float, text: Optional[str] = None) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list((token if text is None else text).encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """/v1/chat/completions `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{**_lp(e.token, e.logprob, e.text), "top_logprobs": [_lp(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: Optional[str] = None, logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(kind: str, id_: str, created: int, model: str, choices: list, usage_: Optional[dict] = None) -> dict:
    """A response or stream chunk; kind is text_completion, chat.completion or chat.completion.chunk."""
    body = {"id": id_, "object": kind, "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}
    if usage_ is not None:
        body["usage"] = usage_
    return body
