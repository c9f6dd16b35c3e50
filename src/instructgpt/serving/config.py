"""The server's typed configuration: ``instructgpt serve [--config FILE.yaml] [key=value ...]`` (its flags set the
same keys), with cross-field checks in `validate()`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from instructgpt.config import ConfigError
from instructgpt.modeling import pick_device, resolve_path
from instructgpt.serving.security import is_loopback


class ServeConfigError(ConfigError):
    pass


@dataclass
class Limits:
    """Bounds on what one request may ask for (each a 400 when exceeded; the body size a 413)."""

    max_request_bytes: int = 1_000_000
    max_tokens: int = 512  # per completion; also the chat default when max_tokens is not given (context permitting)
    max_n: int = 16
    max_best_of: int = 16
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_rows: int = 64  # sequences one request may generate: prompts * max(n, best_of)
    max_messages: int = 256
    max_stop: int = 4  # OpenAI's limit
    max_stop_chars: int = 256
    max_completion_logprobs: int = 5  # OpenAI's limit for /v1/completions `logprobs`
    max_top_logprobs: int = 20  # OpenAI's limit for chat `top_logprobs`


@dataclass
class ServeConfig:
    model: Optional[str] = None  # model directory, hub id, .gguf file or builtin:base
    model_name: Optional[str] = None  # the id clients send as `model`; default: the model directory's basename
    reward_model: Optional[str] = None  # best_of keeps the samples it scores highest
    engine: Literal["ours", "vllm"] = "ours"  # "ours" (generation.sample, CPU or GPU) or "vllm"
    device: str = "auto"  # auto: cuda when available
    host: str = "127.0.0.1"
    port: int = 8000
    # API keys, one per line, optionally name:key (re-read when the file changes); also INSTRUCTGPT_API_KEYS
    api_keys: Optional[str] = None
    threads: int = 0  # torch CPU threads; 0: torch's choice
    max_batch_size: int = 32  # rows (sequences) per generation batch
    batch_wait_ms: float = 20.0  # the longest a request waits for others to batch with (see engine.py)
    max_pending_rows: int = 1024  # queued rows beyond this: 503
    rate_limit: float = 600.0  # requests per minute per key (bursts up to that many); 0 = off
    audit_log: Optional[str] = "serve_audit.jsonl"  # None = off
    log_prompts: bool = False  # also log (redacted) prompts and completions
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    max_connections: int = 512  # uvicorn's limit_concurrency: beyond it new connections get 503
    request_timeout_s: Optional[float] = None  # a non-streaming request still unanswered after this is cancelled: 504
    limits: Limits = field(default_factory=Limits)

    def validate(self, have_keys: Optional[bool] = None) -> None:
        """The settings' own checks; with `have_keys` (whether any API key is configured), the binding's too."""
        if not self.model:
            raise ServeConfigError("model: required (--model DIR or model=DIR)")
        if self.engine not in ("ours", "vllm"):
            raise ServeConfigError(f"--engine must be 'ours' or 'vllm', got {self.engine!r}")
        if have_keys is False and not is_loopback(self.host):
            raise ServeConfigError(
                f"refusing to serve on {self.host} without API keys: give --api-keys FILE or set "
                "INSTRUCTGPT_API_KEYS, or bind to 127.0.0.1")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ServeConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for p in (self.ssl_certfile, self.ssl_keyfile):
            if p and not os.path.isfile(p):
                raise ServeConfigError(f"{p}: no such file")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ServeConfigError(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}")
        if self.max_batch_size < 1 or self.batch_wait_ms < 0 or self.rate_limit < 0:
            raise ServeConfigError("--max-batch-size must be >= 1, --batch-wait-ms and --rate-limit >= 0")
        if self.limits.max_rows < max(self.limits.max_n, self.limits.max_best_of):
            raise ServeConfigError("limits: max_rows must be >= max_n and max_best_of")
        try:
            pick_device(self.device)
        except ValueError as e:
            raise ServeConfigError(f"--{e}") from None

    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        path = resolve_path(self.model).rstrip("/\\")  # builtin:base -> .../assets/base
        return os.path.basename(path) if os.path.isdir(path) else self.model
