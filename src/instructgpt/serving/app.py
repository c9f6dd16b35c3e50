"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health, and its
OpenAPI schema at /openapi.json.

Every /v1 request goes through `_endpoint`: API key -> rate limit -> bounded body -> JSON -> schema -> handler, and
leaves one audit-log record. Errors are OpenAI's error JSON with OpenAI's status codes; anything unexpected is a 500
with a generic message (the traceback goes to the server's stderr), never a crash and never internals in the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoConfig

from instructgpt import __version__
from instructgpt.best_of import best_indices, mean_logprob, reward_scores
from instructgpt.generation import Completion, SamplingParams
from instructgpt.modeling import context_length, load_model, load_tokenizer, pick_device, resolve_path
from instructgpt.prompting import render_prompt
from instructgpt.reward import RewardModel
from instructgpt.serving import schemas as S
from instructgpt.serving.config import Limits, ServeConfig
from instructgpt.serving.engine import (BatchingEngine, EngineBusy, EngineClosed, Job, JobCancelled, TorchRunner,
                                        batch_key)
from instructgpt.serving.security import AuditLog, KeyStore, RateLimiter, ReloadingKeys, bearer_token

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_TOP_P = 1e-6  # top_p=0 keeps only the most likely token (filter_logits would otherwise drop every token)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        # a message quoting the request (a model id) may hold a lone surrogate, which UTF-8 cannot encode
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse(S.error_body(message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Server:
    """Everything a request needs: the engine and tokenizer, the served name, and the access-control pieces."""

    cfg: ServeConfig
    engine: BatchingEngine
    tokenizer: object
    model_name: str
    context_length: int
    vocab_size: int
    keys: Optional[KeyStore | ReloadingKeys] = None  # a key file is re-read when it changes
    limiter: Optional[RateLimiter] = None
    audit: Optional[AuditLog] = None
    reward: Optional[object] = None  # instructgpt.reward.RewardModel
    created: int = field(default_factory=lambda: int(time.time()))
    rm_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def limits(self) -> Limits:
        return self.cfg.limits

    def close(self) -> None:
        self.engine.close()
        if self.audit is not None:
            self.audit.close()


def load_server(cfg: ServeConfig, keys: Optional[KeyStore | ReloadingKeys] = None) -> Server:
    """Load the model (and reward model), start the engine, open the audit log."""
    cfg.validate(have_keys=keys is not None)
    device = pick_device(cfg.device)
    if cfg.engine == "vllm":
        from instructgpt.serving.vllm_engine import VLLMRunner, one_batch_key  # vllm: an optional package

        path = resolve_path(cfg.model)
        tokenizer = load_tokenizer(path)
        runner = VLLMRunner(path)
        ctx, vocab, key_fn = context_length(AutoConfig.from_pretrained(path), tokenizer), len(tokenizer), one_batch_key
    else:
        model, tokenizer = load_model(cfg.model)
        model.to(device)
        # the worker decodes with its own copy: a fast tokenizer must not be used by two threads at once
        runner = TorchRunner(model, copy.deepcopy(tokenizer))
        ctx = context_length(model.config, tokenizer)
        vocab, key_fn = min(len(tokenizer), model.get_input_embeddings().weight.shape[0]), batch_key
    reward = None
    if cfg.reward_model:
        reward = RewardModel.load(cfg.reward_model)
        reward.model.to(device)
    engine = BatchingEngine(runner, cfg.max_batch_size, cfg.batch_wait_ms / 1000.0, cfg.max_pending_rows,
                            key_fn).start()
    return Server(cfg, engine, tokenizer, cfg.resolved_model_name(), ctx, vocab, keys,
                  RateLimiter(cfg.rate_limit) if cfg.rate_limit > 0 else None,
                  AuditLog(cfg.audit_log) if cfg.audit_log else None, reward)


# --------------------------------------------------------------------------------------------------------------------
# Request plumbing: auth, limits, body, audit


@dataclass
class RequestRecord:
    """What the audit log gets for one request."""

    endpoint: str
    request_id: str = field(default_factory=lambda: secrets.token_hex(12))
    key_id: Optional[str] = None
    model: Optional[str] = None
    status: int = 200
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    prompt: Optional[list] = None  # only with --log-prompts (redacted when written)
    completions: Optional[list] = None
    t0: float = field(default_factory=time.perf_counter)

    def as_row(self) -> dict:
        row = {"request_id": self.request_id, "key_id": self.key_id, "endpoint": self.endpoint, "model": self.model,
               "status": self.status, "stream": self.stream, "prompt_tokens": self.prompt_tokens,
               "completion_tokens": self.completion_tokens,
               "latency_ms": round((time.perf_counter() - self.t0) * 1000, 1)}
        for k in ("error", "prompt", "completions"):
            if getattr(self, k) is not None:
                row[k] = getattr(self, k)
        return row


def audit(server: Server, rec: RequestRecord) -> None:
    if server.audit is not None:
        server.audit.write(rec.as_row())


def authorize(server: Server, request: Request, rec: RequestRecord) -> None:
    """401 without a valid key (when keys are configured); 429 past the key's rate limit."""
    if server.keys is None:
        rec.key_id = "local"  # no key source: loopback only, every client shares one rate-limit bucket
    else:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise ApiError(401, "You didn't provide an API key. Provide it as a Bearer token in the Authorization "
                                "header.", code="invalid_api_key")
        rec.key_id = server.keys.identify(token)
        if rec.key_id is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if server.limiter is not None:
        ok, retry_after = server.limiter.allow(rec.key_id)
        if not ok:
            raise ApiError(429, f"Rate limit reached for {rec.key_id}: {server.cfg.rate_limit:g} requests per "
                                f"minute. Retry in {retry_after:.1f}s.", type_="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid("invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"request body too large (limit {limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _lone_surrogate(obj, loc: tuple = ()) -> Optional[tuple]:
    """The location of the first string (key or value) in decoded JSON holding a lone surrogate, which JSON's \\u
    escapes can spell but no UTF-8 text (nor a tokenizer) can hold; None when there is none."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return loc
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        where = loc + (k.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(k, str) else k,)
        if isinstance(k, str) and _lone_surrogate(k) is not None:
            return where
        found = _lone_surrogate(v, where)
        if found is not None:
            return found
    return None


# pydantic's type errors, as OpenAI names the type it expected
_TYPE_ERRORS = {"int_type": "an integer", "float_type": "a decimal", "bool_type": "a boolean",
                "string_type": "a string", "list_type": "an array", "dict_type": "an object",
                "model_type": "an object", "model_attributes_type": "an object"}


def _at(obj, loc: tuple):
    """The value at a pydantic error location in the decoded JSON (its union-branch labels skipped), or None."""
    for k in loc:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and 0 <= k < len(obj):
            obj = obj[k]
    return obj


def _json_type(v) -> str:
    return ("a boolean" if isinstance(v, bool) else "an integer" if isinstance(v, int) else "a decimal"
            if isinstance(v, float) else "a string" if isinstance(v, str) else "an array" if isinstance(v, list)
            else "an object" if isinstance(v, dict) else "null")


def parse_request(model_cls: type[BaseModel], body: bytes) -> BaseModel:
    """JSON -> pydantic model; any problem is a 400 naming the parameter."""
    try:
        obj = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                      "your HTTP library correctly.)")
    if not isinstance(obj, dict):
        raise invalid("the request body must be a JSON object")
    bad = _lone_surrogate(obj)
    if bad is not None:
        raise invalid(f"Invalid value for '{'.'.join(map(str, bad)) or 'body'}': a lone UTF-16 surrogate "
                      "('\\ud800'..'\\udfff' unpaired) is not text", param=str(bad[0]) if bad else None)
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        param = str(err["loc"][0]) if err["loc"] else None
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise invalid(f"Unrecognized request argument supplied: {where}", param=param)
        if err["type"] in _TYPE_ERRORS:
            raise invalid(f"Invalid type for '{where}': expected {_TYPE_ERRORS[err['type']]}, but got "
                          f"{_json_type(_at(obj, err['loc']))} instead.", param=param, code="invalid_type")
        raise invalid(f"Invalid value for '{where}': {err['msg']}", param=param)
    except RecursionError:
        raise invalid("the request is nested too deeply")


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[Response], timeout_s: Optional[float] = None,
                              poll_s: float = 0.1) -> Response:
    """`work`'s response, unless the client goes away first, or `timeout_s` passes: then `work` is cancelled (its
    jobs with it: see `results_of`) and ClientDisconnected raised, or a 504, so an abandoned or overdue request stops
    costing tokens at the engine's next step. The body has been read by then, so the connection's next message can
    only be its end. A streaming response is returned at once, and its stream watches the client itself."""
    task = asyncio.ensure_future(work)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ApiError):
            await task

    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                await cancel()
                raise ClientDisconnected()
            if deadline is not None and time.monotonic() > deadline:
                await cancel()
                raise ApiError(504, f"the request was not answered within the server's limit of {timeout_s:g} s",
                               type_="server_error", code="timeout")
    finally:
        if not task.done():
            task.cancel()


async def _endpoint(server: Server, request: Request, endpoint: str,
                    handler: Callable[[Server, bytes, RequestRecord], Awaitable[Response]],
                    post: bool = True) -> Response:
    rec = RequestRecord(endpoint)
    try:
        authorize(server, request, rec)
        body = await read_body(request, server.limits.max_request_bytes) if post else b""
        response = await unless_disconnected(request, handler(server, body, rec), server.cfg.request_timeout_s) \
            if post else await handler(server, body, rec)
    except ClientDisconnected:
        rec.status, rec.error = 499, "client disconnected"  # nginx's code: nobody is left to answer
        response = Response(status_code=499)
    except ApiError as e:
        rec.status, rec.error = e.status, e.message
        response = e.response()
    except Exception:
        traceback.print_exc(file=sys.stderr)
        rec.status, rec.error = 500, "internal error"
        response = ApiError(500, "The server had an error while processing your request.", type_="server_error")\
            .response()
    response.headers["x-request-id"] = rec.request_id
    if not isinstance(response, StreamingResponse):  # a stream writes its record when it ends
        audit(server, rec)
    return response


# --------------------------------------------------------------------------------------------------------------------
# Request -> jobs


def check_model(server: Server, model: str, rec: RequestRecord) -> None:
    if model != server.model_name:
        raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    rec.model = model


def bounded(value: int, limit: int, param: str) -> int:
    if value > limit:
        raise invalid(f"'{param}' must be at most {limit} on this server, got {value}", param=param)
    return value


def stop_strings(stop, limits: Limits) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop:
        raise invalid(f"'stop' takes at most {limits.max_stop} sequences", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise invalid(f"each stop sequence must be at most {limits.max_stop_chars} characters", param="stop")
    return tuple(s for s in stops if s)


def check_unsupported(req) -> None:
    if req.logit_bias:
        raise invalid("logit_bias is not supported", param="logit_bias")


def encode_text(server: Server, text: str) -> list[int]:
    ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:  # an empty prompt: start from the beginning-of-text token, as OpenAI does
        tok = server.tokenizer
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    return ids


def completion_prompts(server: Server, prompt) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) per prompt: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid("'prompt' must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if len(prompt) > server.limits.max_prompts:
        raise invalid(f"at most {server.limits.max_prompts} prompts per request", param="prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(encode_text(server, p))
            texts.append(p)
        else:
            if not p or any(not 0 <= t < server.vocab_size for t in p):
                raise invalid(f"token-id prompts must be non-empty lists of ids in [0, {server.vocab_size})",
                              param="prompt")
            ids.append(list(p))
            texts.append(server.tokenizer.decode(list(p), skip_special_tokens=False))
    return ids, texts


def check_context(server: Server, prompt_len: int, max_tokens: int, param: str) -> None:
    if prompt_len + max_tokens > server.context_length:
        raise invalid(f"This model's maximum context length is {server.context_length} tokens, however you requested "
                      f"{prompt_len + max_tokens} tokens ({prompt_len} in your prompt; {max_tokens} for the "
                      "completion). Please reduce your prompt; or completion length.", param=param,
                      code="context_length_exceeded")


def sampling_params(req, max_tokens: int, rows: int, stops: tuple[str, ...], logprobs: int) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else max(req.top_p, MIN_TOP_P)
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=req.top_k or 0,
                          n=rows, stop=stops, frequency_penalty=req.frequency_penalty or 0.0,
                          presence_penalty=req.presence_penalty or 0.0, seed=req.seed, logprobs=logprobs)


def submit(server: Server, jobs: Sequence[Job]) -> None:
    try:
        for job in jobs:
            server.engine.submit(job)
    except (EngineBusy, EngineClosed) as e:
        for job in jobs:
            job.cancelled.set()
        raise ApiError(503, str(e), type_="server_error", code="server_overloaded")


async def results_of(jobs: Sequence[Job]) -> list[list[Completion]]:
    waits = [asyncio.wrap_future(j.future) for j in jobs]
    try:
        # shielded: cancelling this wait must not cancel the engine's own futures, which it sets when a batch ends
        return list(await asyncio.gather(*(asyncio.shield(w) for w in waits)))
    except asyncio.CancelledError:  # the client went away: the engine ends these rows at its next token
        for job, w in zip(jobs, waits):
            job.cancelled.set()
            w.add_done_callback(lambda f: f.cancelled() or f.exception())  # its JobCancelled is expected
        raise
    except (EngineClosed, JobCancelled) as e:
        raise ApiError(503, str(e) or "the request was cancelled", type_="server_error")


async def keep_best(server: Server, prompt_text: str, comps: list[Completion], n: int) -> list[Completion]:
    """best_of: the n completions the reward model (else the mean log-prob) ranks highest, best first."""
    if server.reward is not None:
        def score():
            with server.rm_lock:
                return reward_scores(server.reward, prompt_text, [c.text for c in comps])
        scores = await asyncio.to_thread(score)
    else:
        scores = [mean_logprob(c) for c in comps]
    return [comps[i] for i in best_indices(scores, n)]


# --------------------------------------------------------------------------------------------------------------------
# Streaming


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class StreamFormat:
    """How one endpoint writes its chunks."""

    chat: bool
    id_: str
    created: int
    model: str

    def chunk(self, choices: list, usage_: Optional[dict] = None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse(S.envelope(kind, self.id_, self.created, self.model, choices, usage_))

    def first(self, index: int) -> Optional[str]:
        return self.chunk([S.chat_delta(index, {"role": "assistant", "content": ""})]) if self.chat else None

    def text(self, index: int, delta: str, entry: Optional[S.TokenLogprob] = None, offset: int = 0) -> str:
        if self.chat:
            lp = S.chat_logprobs([entry]) if entry is not None else None
            return self.chunk([S.chat_delta(index, {"content": delta}, logprobs=lp)])
        lp = S.completion_logprobs([entry], offset) if entry is not None else None
        return self.chunk([S.completion_choice(index, delta, None, lp)])

    def final(self, index: int, finish_reason: str) -> str:
        if self.chat:
            return self.chunk([S.chat_delta(index, {}, finish_reason)])
        return self.chunk([S.completion_choice(index, "", finish_reason)])


def attach_stream(jobs: Sequence[Job], n: int, loop: asyncio.AbstractEventLoop, live: bool) -> asyncio.Queue:
    """A queue the engine thread feeds: ("text", choice index, delta) while generating, ("done", prompt index, future)
    when a job ends. With `live` False (log-probs asked for) text comes only with "done"."""
    queue: asyncio.Queue = asyncio.Queue()

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    for i, job in enumerate(jobs):
        if live:
            job.on_text = lambda j, delta, i=i: post(("text", i * n + j, delta))
        job.future.add_done_callback(lambda f, i=i: post(("done", i, f)))
    return queue


async def stream_events(server: Server, rec: RequestRecord, jobs: Sequence[Job], queue: asyncio.Queue,
                        fmt: StreamFormat, n: int, top_k: Optional[int], prompt_texts: Sequence[str],
                        include_usage: bool, as_ids: bool):
    """Server-sent events: chunks as text arrives, one final chunk per choice, usage if asked, `data: [DONE]`."""
    try:
        for index in range(len(jobs) * n):
            first = fmt.first(index)
            if first:
                yield first
        remaining = len(jobs)
        while remaining:
            kind, a, b = await queue.get()
            if kind == "text":
                yield fmt.text(a, b)
                continue
            remaining -= 1
            comps: list[Completion] = b.result()
            rec.completion_tokens += sum(len(c.token_ids) for c in comps)
            if server.cfg.log_prompts:
                rec.completions = (rec.completions or []) + [c.text for c in comps]
            for j, c in enumerate(comps):
                index = a * n + j
                if top_k is not None:  # log-probs: token-aligned chunks, sent once the completion is done
                    offset = len(prompt_texts[a])
                    for e in S.logprob_entries(server.tokenizer, c, top_k, as_ids):
                        yield fmt.text(index, e.text, e, offset)
                        offset += len(e.text)
                yield fmt.final(index, c.finish_reason)
        if include_usage:
            yield fmt.chunk([], S.usage(rec.prompt_tokens, rec.completion_tokens))
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        rec.error = "client disconnected"
        raise
    except Exception:
        traceback.print_exc(file=sys.stderr)
        rec.error = "internal error during the stream"
        yield sse(S.error_body("The server had an error while processing your request.", "server_error"))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            if not job.future.done():
                job.cancelled.set()  # the engine ends these rows at its next token
        audit(server, rec)


def stream_response(server: Server, rec: RequestRecord, req, jobs: Sequence[Job], chat: bool, n: int,
                    top_k: Optional[int], prompt_texts: Sequence[str], id_: str, created: int) -> StreamingResponse:
    rec.stream = True
    queue = attach_stream(jobs, n, asyncio.get_running_loop(), live=top_k is None)
    submit(server, jobs)
    fmt = StreamFormat(chat, id_, created, server.model_name)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = stream_events(server, rec, jobs, queue, fmt, n, top_k, prompt_texts, include_usage,
                           bool(req.return_tokens_as_token_ids))
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------------------------------------------------
# Handlers


async def list_models(server: Server, body: bytes, rec: RequestRecord) -> Response:
    return JSONResponse({"object": "list", "data": [model_card(server)]})


def model_card(server: Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "instructgpt"}


async def completions(server: Server, body: bytes, rec: RequestRecord) -> Response:
    req = parse_request(S.CompletionRequest, body)
    check_model(server, req.model, rec)
    check_unsupported(req)
    lim = server.limits
    if req.suffix:
        raise invalid("suffix is not supported", param="suffix")
    n = bounded(req.n or 1, lim.max_n, "n")
    best_of = bounded(req.best_of or n, lim.max_best_of, "best_of")
    if best_of < n:
        raise invalid("best_of must be greater than or equal to n", param="best_of")
    if req.stream and best_of > n:
        raise invalid("best_of cannot be used with stream", param="best_of")
    if req.echo and req.logprobs is not None:
        raise invalid("echo with logprobs is not supported", param="echo")
    top_k = None if req.logprobs is None else bounded(req.logprobs, lim.max_completion_logprobs, "logprobs")
    stops = stop_strings(req.stop, lim)
    # OpenAI's default of 16, unless this server allows fewer: a request that asks nothing is never refused for it
    max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, lim.max_tokens) if req.max_tokens is None else \
        bounded(req.max_tokens, lim.max_tokens, "max_tokens")
    ids, texts = completion_prompts(server, req.prompt)
    if len(ids) * best_of > lim.max_rows:
        raise invalid(f"prompts x best_of (or n) must be at most {lim.max_rows}", param="n")
    for p in ids:
        check_context(server, len(p), max_tokens, "prompt")
    rec.prompt_tokens = sum(len(p) for p in ids)
    if server.cfg.log_prompts:
        rec.prompt = texts
    params = sampling_params(req, max_tokens, best_of, stops, top_k or 0)
    jobs = [Job(p, params) for p in ids]
    id_, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        return stream_response(server, rec, req, jobs, False, n, top_k, texts, id_, created)
    submit(server, jobs)
    results = await results_of(jobs)
    rec.completion_tokens = sum(len(c.token_ids) for comps in results for c in comps)
    choices = []
    for i, comps in enumerate(results):
        if best_of > n:
            comps = await keep_best(server, texts[i], comps, n)
        for j, c in enumerate(comps):
            lp = None
            if top_k is not None:
                entries = S.logprob_entries(server.tokenizer, c, top_k, bool(req.return_tokens_as_token_ids))
                lp = S.completion_logprobs(entries, len(texts[i]))
            text = texts[i] + c.text if req.echo else c.text
            choices.append(S.completion_choice(i * n + j, text, c.finish_reason, lp))
    if server.cfg.log_prompts:
        rec.completions = [c["text"] for c in choices]
    return JSONResponse(S.envelope("text_completion", id_, created, server.model_name, choices,
                                   S.usage(rec.prompt_tokens, rec.completion_tokens)))


def chat_messages(req: S.ChatRequest, limits: Limits) -> list[dict]:
    if len(req.messages) > limits.max_messages:
        raise invalid(f"at most {limits.max_messages} messages per request", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        try:
            content = m.text()
        except ValueError as e:
            raise invalid(f"messages[{i}]: {e}", param="messages")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


async def chat_completions(server: Server, body: bytes, rec: RequestRecord) -> Response:
    req = parse_request(S.ChatRequest, body)
    check_model(server, req.model, rec)
    check_unsupported(req)
    lim = server.limits
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise invalid("only response_format {'type': 'text'} is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("logprobs must be true when top_logprobs is set", param="top_logprobs")
    top_k = None
    if req.logprobs:
        top_k = bounded(req.top_logprobs or 0, lim.max_top_logprobs, "top_logprobs")
    n = bounded(req.n or 1, lim.max_n, "n")
    stops = stop_strings(req.stop, lim)
    messages = chat_messages(req, lim)
    try:
        prompt_text = render_prompt(server.tokenizer, messages)
    except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
        raise invalid(f"the messages cannot be rendered with the model's chat template: {e}", param="messages")
    ids = encode_text(server, prompt_text)
    asked = req.max_completion_tokens or req.max_tokens
    if asked is None:  # OpenAI's chat default: as much as the context allows (within our bound)
        max_tokens = min(lim.max_tokens, server.context_length - len(ids))
        if max_tokens < 1:
            check_context(server, len(ids), 1, "messages")
    else:
        max_tokens = bounded(asked, lim.max_tokens, "max_completion_tokens" if req.max_completion_tokens
                             else "max_tokens")
    check_context(server, len(ids), max_tokens, "messages")
    rec.prompt_tokens = len(ids)
    if server.cfg.log_prompts:
        rec.prompt = [m["content"] for m in messages]
    jobs = [Job(ids, sampling_params(req, max_tokens, n, stops, top_k or 0))]
    id_, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        return stream_response(server, rec, req, jobs, True, n, top_k, [""], id_, created)
    submit(server, jobs)
    comps = (await results_of(jobs))[0]
    rec.completion_tokens = sum(len(c.token_ids) for c in comps)
    if server.cfg.log_prompts:
        rec.completions = [c.text for c in comps]
    as_ids = bool(req.return_tokens_as_token_ids)
    choices = [S.chat_choice(j, c.text, c.finish_reason,
                             S.chat_logprobs(S.logprob_entries(server.tokenizer, c, top_k, as_ids))
                             if top_k is not None else None) for j, c in enumerate(comps)]
    return JSONResponse(S.envelope("chat.completion", id_, created, server.model_name, choices,
                                   S.usage(rec.prompt_tokens, rec.completion_tokens)))


# --------------------------------------------------------------------------------------------------------------------
# The OpenAPI schema (GET /openapi.json). The /v1 routes read their bodies themselves (the key and the size limit are
# checked before any JSON is parsed), so FastAPI cannot infer their request and response schemas from the handlers'
# signatures: they are declared here, from the pydantic models in schemas.py, with every status a route can answer.

_ERRORS = {
    400: "Invalid request (OpenAI's invalid_request_error): the body is not a JSON object, a parameter is unknown, "
         "of the wrong type (code invalid_type: a string for max_tokens, a boolean for n ...), out of its range, or "
         "beyond this server's limits (max_tokens, n, best_of, prompts, stop sequences, the context length: code "
         "context_length_exceeded)",
    401: "No API key, or one this server does not know (code invalid_api_key)",
    404: "No such model (code model_not_found)",
    413: "The request body is larger than this server accepts",
    429: "The key's rate limit is reached (code rate_limit_exceeded); the Retry-After header says when to retry",
    500: "An unexpected error while serving the request; the message is generic",
    503: "The server is at capacity (code server_overloaded) or shutting down; retry shortly",
    504: "The request was not answered within the server's time limit (code timeout)",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


def _route_doc(server: Server, ok: dict, body: Optional[type[BaseModel]] = None, model_param: bool = False) -> dict:
    """`openapi_extra` for a /v1 route: its request body, its 200 and the errors this server's settings allow."""
    statuses = [500]
    if server.keys is not None:
        statuses.append(401)
    if server.limiter is not None:
        statuses.append(429)
    if body is not None or model_param:
        statuses.append(404)
    if body is not None:
        statuses += [400, 413, 503] + ([504] if server.cfg.request_timeout_s is not None else [])
    responses = {"200": ok}
    for status in sorted(statuses):
        doc = {"description": _ERRORS[status], "content": _json("ErrorResponse")}
        if status == 429:
            doc["headers"] = {"Retry-After": {"description": "seconds until the next request is allowed",
                                              "schema": {"type": "integer", "minimum": 1}}}
        responses[str(status)] = doc
    extra: dict = {"responses": responses}
    if model_param:
        extra["parameters"] = [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": [server.model_name]}}]
    if body is not None:
        extra["requestBody"] = {"required": True, "content": _json(body.__name__)}
    if server.keys is not None:
        extra["security"] = [{"bearer": []}]
    return extra


def _completion_ok(name: str, chunk: str) -> dict:
    # an event stream's `schema` describes one event (as schemathesis reads OpenAPI 3.1): its data is a JSON chunk,
    # an error object if the stream fails midway, or the final [DONE]
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}}}}
    return {"description": f"The completion; with `stream: true`, server-sent events instead: `data: <{chunk} JSON>` "
                           "per event, ended by `data: [DONE]`",
            "content": {**_json(name), "text/event-stream": {"schema": event}}}


def _bound(prop: dict, **constraints) -> None:
    """Add constraints to a property's non-null alternatives (pydantic writes Optional[X] as anyOf [X, null])."""
    for alt in prop.get("anyOf", [prop]):
        if alt.get("type") != "null":
            alt.update(constraints)


def _server_bounds(defs: dict, server: Server) -> None:
    """The request schemas as this server checks them: the served model, its limits (`Limits`), its vocabulary, and
    the values it accepts only empty. Cross-field rules (best_of >= n, prompts x best_of <= max_rows, the context
    length) stay in prose: a request that breaks them is a 400."""
    lim = server.limits
    stop = {"anyOf": [{"type": "string", "maxLength": lim.max_stop_chars},
                      {"type": "array", "maxItems": lim.max_stop,
                       "items": {"type": "string", "maxLength": lim.max_stop_chars}},
                      {"type": "null"}], "default": None, "title": "Stop"}
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                            "maximum": server.vocab_size - 1}}
    for name in ("CompletionRequest", "ChatRequest"):
        props = defs[name]["properties"]
        props["model"] = {"type": "string", "enum": [server.model_name], "title": "Model"}  # any other: 404
        props["stop"] = copy.deepcopy(stop)
        _bound(props["n"], maximum=lim.max_n)
        _bound(props["max_tokens"], maximum=lim.max_tokens)
        _bound(props["logit_bias"], maxProperties=0)
    props = defs["CompletionRequest"]["properties"]
    props["max_tokens"]["default"] = min(COMPLETIONS_DEFAULT_MAX_TOKENS, lim.max_tokens)
    _bound(props["best_of"], maximum=lim.max_best_of)
    _bound(props["logprobs"], maximum=lim.max_completion_logprobs)
    _bound(props["suffix"], maxLength=0)
    props["prompt"] = {"anyOf": [{"type": "string"},
                                 {"type": "array", "minItems": 1, "maxItems": lim.max_prompts,
                                  "items": {"type": "string"}},
                                 token_ids,
                                 {"type": "array", "minItems": 1, "maxItems": lim.max_prompts, "items": token_ids}],
                       "title": "Prompt"}
    props = defs["ChatRequest"]["properties"]
    _bound(props["max_completion_tokens"], maximum=lim.max_tokens)
    _bound(props["top_logprobs"], maximum=lim.max_top_logprobs)
    props["messages"]["maxItems"] = lim.max_messages
    _bound(props["response_format"], required=["type"], properties={"type": {"const": "text"}})
    message = defs["ChatMessage"]["properties"]
    for f in S.NULLABLE_MESSAGE_FIELDS:
        message[f] = {"enum": [None, [], ""], "default": None, "title": message[f].get("title", f)}
    part = defs["ContentPart"]
    part["properties"]["type"] = {"const": "text", "title": "Type"}
    part["properties"]["text"] = {"type": "string", "title": "Text"}
    part["required"] = ["type", "text"]


def openapi_schema(app: FastAPI, server: Server) -> dict:
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in S.REQUEST_MODELS]
                                     + [(m, "serialization") for m in S.RESPONSE_MODELS],
                                     ref_template="#/components/schemas/{model}")
        _server_bounds(defs["$defs"], server)
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs["$defs"])
        if server.keys is not None:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(server: Server) -> FastAPI:
    # the schema at /openapi.json, as OpenAI-compatible servers serve it, behind the API key like /v1 (it names the
    # served model and the server's limits); no docs pages (they load scripts from a CDN)
    app = FastAPI(title="instructgpt", version=__version__,
                  description="An OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.openapi = lambda: openapi_schema(app, server)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request):
        async def schema(server: Server, body: bytes, rec: RequestRecord) -> Response:
            return JSONResponse(app.openapi())
        return await _endpoint(server, request, "/openapi.json", schema, post=False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown routes, wrong methods
        # exc.headers carries a 405's Allow header, which HTTP requires
        return ApiError(exc.status_code, str(exc.detail), type_="invalid_request_error", headers=exc.headers)\
            .response()

    @app.get("/health", response_model=S.Health)
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", openapi_extra=_route_doc(server, {"description": "The served model",
                                                              "content": _json("ModelList")}))
    async def models(request: Request):
        return await _endpoint(server, request, "/v1/models", list_models, post=False)

    # the model id is read from the path here, not as a handler argument: FastAPI would document a 422 for it,
    # which a string path parameter never gets
    @app.get("/v1/models/{model_id:path}", openapi_extra=_route_doc(server, {"description": "The model",
                                                                             "content": _json("ModelCard")},
                                                                    model_param=True))
    async def model(request: Request):
        model_id = request.path_params["model_id"]

        async def one(server: Server, body: bytes, rec: RequestRecord) -> Response:
            check_model(server, model_id, rec)
            return JSONResponse(model_card(server))
        return await _endpoint(server, request, "/v1/models/{model}", one, post=False)

    @app.post("/v1/completions", openapi_extra=_route_doc(server, _completion_ok("CompletionResponse",
                                                                                 "CompletionChunk"),
                                                          S.CompletionRequest))
    async def completions_route(request: Request):
        return await _endpoint(server, request, "/v1/completions", completions)

    @app.post("/v1/chat/completions", openapi_extra=_route_doc(server, _completion_ok("ChatCompletionResponse",
                                                                                      "ChatCompletionChunk"),
                                                               S.ChatRequest))
    async def chat_route(request: Request):
        return await _endpoint(server, request, "/v1/chat/completions", chat_completions)

    return app
