"""Shared fixtures: a tiny random GPT-2 and tokenizer built in-process (offline, seconds)."""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager

import pytest

WORDS = ("apple pear plum cat dog bird red blue green one two three four five six seven eight nine ten "
         "reverse spell sort add the word number list of and is what plus minus count letters in").split()


def tiny_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".")
        out.append(f"### Instruction:\n{rng.choice(WORDS)} {rng.randint(0, 99)}\n\n### Response:\n{rng.randint(0, 99)}")
    return out


def build_tiny(out_dir: str, n_layer: int = 2, n_embd: int = 32, vocab: int = 300, seed: int = 0) -> str:
    import torch
    from instructgpt.pretrain import InitConfig, init_model, train_tokenizer

    tok = train_tokenizer(tiny_corpus(), vocab_size=vocab, max_chars=10**6)
    torch.manual_seed(seed)
    model = init_model(tok, InitConfig(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=256), dropout=0.0)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture()
def tiny(tiny_model_dir):
    from instructgpt.modeling import load_model

    return load_model(tiny_model_dir)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture()
def mlp_forwards(monkeypatch):
    """Counts of the tiny GPT-2's MLP forwards: `all`, and `train` (in train mode with gradients on, as
    checkpointed blocks run). A checkpointed block replayed in the backward calls `forward` again, which module hooks
    do not see, so the count goes through the class's `forward`."""
    import torch
    from transformers.models.gpt2 import modeling_gpt2

    counts, forward = {"all": 0, "train": 0}, modeling_gpt2.GPT2MLP.forward

    def counted(self, *args, **kwargs):
        counts["all"] += 1
        counts["train"] += self.training and torch.is_grad_enabled()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt2.GPT2MLP, "forward", counted)
    return counts


@pytest.fixture()
def demos_file(tmp_path) -> str:
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": f"add {a} plus {b}", "response": str(a + b)})
    return write_jsonl(tmp_path / "demos.jsonl", rows)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def live_server(app, **uvicorn_kwargs):
    """Serve the ASGI `app` with uvicorn on 127.0.0.1 at a free port, in a thread; yields the base URL (https when
    `ssl_certfile` is given)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_kwargs))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    scheme = "https" if uvicorn_kwargs.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
