"""``instructgpt serve --model DIR [--reward-model DIR] [--host 127.0.0.1] [--port 8000] [--api-keys FILE]``.

An OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, /health; its schema at /openapi.json).
API keys come from ``--api-keys FILE`` (one per line, optionally ``name:key``; re-read when it changes, so keys are
added and revoked without a restart) and/or ``INSTRUCTGPT_API_KEYS`` (comma-separated); with neither, requests need
no key and the server only binds to a loopback address. Every setting is a key of :class:`ServeConfig`
(``limits.max_rows=128``), also read from ``--config FILE.yaml``; the flags set the same keys.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from instructgpt.config import (ConfigError, add_alias, add_config_arguments, command_error, config_from_args,
                                parse_command_line)
from instructgpt.serving.app import create_app, load_server
from instructgpt.serving.config import ServeConfig
from instructgpt.serving.security import ENV_KEYS, KeySourceError, api_keys
from instructgpt.serving.vllm_engine import INSTALL_HINT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructgpt serve", description="Serve a model with an OpenAI-compatible API.")
    add_config_arguments(p, example="port=8080 limits.max_tokens=256")

    def flag(*names, key=None, **kw):
        add_alias(p, ServeConfig, *names, key=key or names[0][2:].replace("-", "_"), **kw)

    flag("--model", help="model directory, hub id or builtin:base")
    flag("--model-name", help="the model id clients use (default: the model directory's name)")
    flag("--reward-model", help="reward model (an `instructgpt rm` out_dir or its model/): best_of keeps the samples "
                                "it scores highest")
    flag("--host", help="address to bind (127.0.0.1: this machine only)")
    flag("--port")
    flag("--api-keys", metavar="FILE", help=f"API keys, one per line, optionally name:key (also: {ENV_KEYS})")
    flag("--engine", help="ours: the built-in batched sampler (CPU or GPU); vllm: vLLM (needs it installed, CUDA)")
    flag("--device", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    flag("--threads", help="torch CPU threads (0: torch's choice). 1 avoids thread stalls on a shared, busy CPU")
    flag("--max-batch-size", help="sequences per generation batch")
    flag("--batch-wait-ms", help="how long a request waits for others to batch with")
    flag("--max-pending-rows", help="queued rows beyond this are refused (503)")
    flag("--rate-limit", help="requests per minute per API key (bursts up to as many); 0 = off")
    flag("--audit-log", metavar="FILE", help="JSONL audit log")
    flag("--no-audit-log", key="audit_log", action="store_const", const=None, help="do not write an audit log")
    flag("--log-prompts",
         help="also log prompts and completions in the audit log (emails, phone and card numbers redacted)")
    flag("--ssl-certfile", help="serve HTTPS with this certificate (PEM) ...")
    flag("--ssl-keyfile", help="... and this private key")
    flag("--max-connections", help="connections beyond this get 503")
    flag("--max-tokens", key="limits.max_tokens", help="the largest max_tokens a request may ask")
    flag("--max-n", key="limits.max_n")
    flag("--max-best-of", key="limits.max_best_of")
    flag("--max-request-bytes", key="limits.max_request_bytes")
    flag("--request-timeout", key="request_timeout_s", metavar="SECONDS",
         help="cancel a non-streaming request not answered within this many seconds (504); default: none")
    return p


def tls_kwargs(cfg: ServeConfig) -> dict:
    """uvicorn's TLS arguments: HTTPS when a certificate and key are given."""
    return {"ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile} if cfg.ssl_certfile else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(ServeConfig, args)
        keys = api_keys(cfg.api_keys, os.environ.get(ENV_KEYS))
        cfg.validate(have_keys=keys is not None)
        if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{INSTALL_HINT} (it is not installed here)")
    except (KeySourceError, ConfigError) as e:
        return command_error("serve", e)
    if cfg.api_keys and os.stat(cfg.api_keys).st_mode & 0o077:
        print(f"instructgpt serve: warning: {cfg.api_keys} is readable by other users (chmod 600 it)",
              file=sys.stderr)
    import uvicorn

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    server = load_server(cfg, keys)
    scheme = "https" if cfg.ssl_certfile else "http"
    access = f"{len(keys)} API key(s)" if keys is not None else "no API keys (loopback only)"
    print(f"instructgpt serve: {server.model_name} at {scheme}://{cfg.host}:{cfg.port}/v1 with {access}; "
          f"audit log: {cfg.audit_log or 'off'}", file=sys.stderr)
    try:
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, limit_concurrency=cfg.max_connections,
                    server_header=False, access_log=False, log_level="info", **tls_kwargs(cfg))
    finally:
        server.close()
    return 0
