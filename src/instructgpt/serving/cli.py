"""``instructgpt serve --model DIR [--reward-model DIR] [--host 127.0.0.1] [--port 8000] [--api-keys FILE]``.

An OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, /health). API keys come from
``--api-keys FILE`` (one per line, optionally ``name:key``; re-read when it changes, so keys are added and revoked
without a restart) and/or ``INSTRUCTGPT_API_KEYS`` (comma-separated); with neither, requests need no key and the
server only binds to a loopback address.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from instructgpt.serving.config import Limits, ServeConfig, ServeConfigError
from instructgpt.serving.security import ENV_KEYS, KeySourceError, api_keys


def build_parser() -> argparse.ArgumentParser:
    d, lim = ServeConfig(model=""), Limits()
    p = argparse.ArgumentParser(prog="instructgpt serve", description="Serve a model with an OpenAI-compatible API.")
    p.add_argument("--model", required=True, help="model directory, hub id or builtin:base")
    p.add_argument("--model-name", help="the model id clients use (default: the model directory's name)")
    p.add_argument("--reward-model", help="reward model (an `instructgpt rm` out_dir or its model/): best_of keeps "
                                          "the samples it scores highest")
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-keys", metavar="FILE", help=f"API keys, one per line, optionally name:key (also: {ENV_KEYS})")
    p.add_argument("--engine", choices=("ours", "vllm"), default=d.engine,
                   help="ours: the built-in batched sampler (CPU or GPU); vllm: vLLM (needs it installed, CUDA)")
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice). 1 avoids thread stalls on a shared, busy CPU")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="sequences per generation batch")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a request waits for others to batch with")
    p.add_argument("--rate-limit", type=float, default=d.rate_limit,
                   help="requests per minute per API key (bursts up to as many); 0 = off")
    p.add_argument("--audit-log", default=d.audit_log, metavar="FILE", help="JSONL audit log (default %(default)s)")
    p.add_argument("--no-audit-log", action="store_true", help="do not write an audit log")
    p.add_argument("--log-prompts", action="store_true",
                   help="also log prompts and completions in the audit log (emails, phone and card numbers redacted)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM) ...")
    p.add_argument("--ssl-keyfile", help="... and this private key")
    p.add_argument("--max-tokens", type=int, default=lim.max_tokens, help="the largest max_tokens a request may ask")
    p.add_argument("--max-n", type=int, default=lim.max_n)
    p.add_argument("--max-best-of", type=int, default=lim.max_best_of)
    p.add_argument("--max-request-bytes", type=int, default=lim.max_request_bytes)
    p.add_argument("--request-timeout", type=float, metavar="SECONDS",
                   help="cancel a non-streaming request not answered within this many seconds (504); default: none")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    limits = Limits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens, max_n=args.max_n,
                    max_best_of=args.max_best_of)
    return ServeConfig(model=args.model, model_name=args.model_name, reward_model=args.reward_model,
                       engine=args.engine, device=args.device, host=args.host, port=args.port,
                       max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                       rate_limit=args.rate_limit, audit_log=None if args.no_audit_log else args.audit_log,
                       log_prompts=args.log_prompts, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                       request_timeout_s=args.request_timeout, limits=limits)


def tls_kwargs(cfg: ServeConfig) -> dict:
    """uvicorn's TLS arguments: HTTPS when a certificate and key are given."""
    return {"ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile} if cfg.ssl_certfile else {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    try:
        keys = api_keys(args.api_keys, os.environ.get(ENV_KEYS))
        cfg.validate(have_keys=keys is not None)
        if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            from instructgpt.serving.vllm_engine import INSTALL_HINT

            raise ServeConfigError(f"{INSTALL_HINT} (it is not installed here)")
    except (KeySourceError, ServeConfigError) as e:
        print(f"instructgpt serve: error: {e}", file=sys.stderr)
        return 2
    if args.api_keys and os.stat(args.api_keys).st_mode & 0o077:
        print(f"instructgpt serve: warning: {args.api_keys} is readable by other users (chmod 600 it)",
              file=sys.stderr)
    import torch
    import uvicorn

    from instructgpt.serving.app import create_app, load_server

    if args.threads > 0:
        torch.set_num_threads(args.threads)

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
