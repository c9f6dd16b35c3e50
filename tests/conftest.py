"""Shared fixtures and helpers: a tiny random GPT-2 and tokenizer built in-process (offline, seconds), JSONL files,
ranking data sets, saved weights, a live server and a killed training run."""

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



# Architectures beyond GPT-2 and Llama that a user brings, each with what sets it apart: sliding-window attention
# (Mistral), sliding and global layers with query/key norms (Gemma 3), a fused query-key-value projection (Phi-3), a
# mixture of experts (Mixtral), multi-query attention (GPT-BigCode), attention and MLP off one residual (GPT-J,
# Falcon), learned positions with their own offset (OPT), an MLP that adds the residual itself and ALiBi (BLOOM)
ARCHS = ("qwen3", "mistral", "gemma3_text", "phi3", "mixtral", "gpt_bigcode", "gptj", "falcon", "opt", "bloom")


def tiny_arch(arch: str, tok, head: str = "causal_lm"):
    """A random two-layer, 32-wide model of transformers model type `arch` over `tok`'s vocabulary, eval mode: a causal
    LM, or (`head` "seq_cls") a one-label sequence classifier, as a reward or value model is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = dict(vocab_size=len(tok), num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
              num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    kw.update({"qwen3": dict(head_dim=8), "mistral": dict(sliding_window=6),
               "gemma3_text": dict(head_dim=8, sliding_window=6), "mixtral": dict(num_local_experts=4,
                                                                                 num_experts_per_tok=2),
               "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, multi_query=True),
               "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256), "opt": dict(ffn_dim=64),
               "falcon": dict(parallel_attn=True), "bloom": dict(n_layer=2, n_head=4)}.get(arch, {}))
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    return auto.from_config(AutoConfig.for_model(arch, **kw)).eval()


# Chat templates of two shapes real models have. Gemma-style: no system role (its raise_exception), the assistant
# as "model"
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}{% if add_generation_prompt %}<turn>model\n"
    "{% endif %}")
# Like Qwen3's: the answer after the last user turn opens with an empty thinking block that earlier answers drop, so
# one rendering of a conversation with two answers is not the first answer's context
HISTORY_REWRITING_TEMPLATE = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' and loop.index0 > "
    "ns.last %}<think></think>{% endif %}{{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture()
def tiny(tiny_model_dir):
    from instructgpt.modeling import load_model

    return load_model(tiny_model_dir)


def write_jsonl(path, rows) -> str:
    """One line per row: a dict as JSON, a string as it is (for malformed lines); returns the path as a string."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def fruit_over_animal_rankings(n: int, seed: int) -> list[dict]:
    """K = 3 to 5 responses per prompt, shuffled: the good ones mention fruit, the bad ones animals, tied within each
    group (ranks 1 and 2). A surface feature a tiny reward model learns in seconds."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(3, 5)
        good = [rng.choice(["apple", "pear", "plum"]) + " " + rng.choice(["one", "two"]) for _ in range(k // 2 + 1)]
        bad = [rng.choice(["cat", "dog", "bird"]) + " " + rng.choice(["one", "two"]) for _ in range(k - len(good))]
        resp = good + bad
        ranks = [1] * len(good) + [2] * len(bad)  # ties within each group
        order = list(range(k))
        rng.shuffle(order)
        rows.append({"prompt": f"what is {i}", "responses": [resp[o] for o in order], "ranks": [ranks[o] for o in order]})
    return rows


def fruit_pairs_over_other_pairs_rankings(n: int, seed: int) -> list[dict]:
    """Four two-word responses per prompt, in a fixed order: two of fruit words (rank 1) above two of animal, colour or
    number words (rank 2). A reward a tiny RM learns and a tiny policy can chase."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = [" ".join(rng.choice(["apple", "pear", "plum"]) for _ in range(2)) for _ in range(2)]
        bad = [" ".join(rng.choice(["cat", "dog", "bird", "red", "two"]) for _ in range(2)) for _ in range(2)]
        rows.append({"prompt": f"what is {i}", "responses": good + bad, "ranks": [1, 1, 2, 2]})
    return rows


def ppo_inputs_in(d, policy_dir: str, n_rankings: int) -> dict:
    """What a PPO run on the tiny model needs, built in directory `d`: a reward model trained on `n_rankings`
    rankings, 64 prompts and a small pretraining text."""
    from instructgpt.config import load_config
    from instructgpt.rm import RMConfig
    from instructgpt.rm import train as rm_train
    tr = write_jsonl(d / "rank.jsonl", fruit_pairs_over_other_pairs_rankings(n_rankings, 0))
    rm_train(load_config(RMConfig, None, [f"model.name_or_path={policy_dir}", f"data.train={tr}",
                                          f"out_dir={d / 'rm'}", "train.batch_size=8", "train.lr=3e-3",
                                          "data.eval_size=0", "normalize.demonstrations=null"]))
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"what is {i}"} for i in range(64)])
    ptx = d / "ptx.txt"
    ptx.write_text("\n".join(f"the {w} is {c} and the cat is one." for w in ("apple", "pear", "plum", "dog")
                             for c in ("red", "blue", "green")) * 20)
    return {"policy": policy_dir, "rm": str(d / "rm"), "prompts": prompts, "ptx": str(ptx)}


@pytest.fixture(scope="module")
def one_torch_thread():
    """A server and its test share the process: one intra-op thread each keeps them from stalling a busy CPU."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def saved_weights(run_dir) -> dict:
    """The tensors of the model a stage saved under `run_dir` (its model/model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def wait_for_checkpoint(proc, out_dir, step: int, timeout: float) -> bool:
    """Poll `out_dir`'s checkpoint until it has reached `step` (True), `proc` has exited or `timeout` seconds passed
    (False)."""
    import time

    state = os.path.join(out_dir, "checkpoint", "trainer_state.json")
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            with open(state, encoding="utf-8") as fh:
                if json.load(fh)["step"] >= step:
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return False


def sigkill_after_checkpoint(cmd: list[str], out_dir, step: int, timeout: float = 120.0, env=None,
                             group: bool = False) -> None:
    """Start a training command, wait until its checkpoint under `out_dir` has reached `step` (at most `timeout`
    seconds, or until it exits), then SIGKILL it; asserts it died of the signal before finishing (no DONE.json).
    `group`: the command is a launcher with processes of its own (accelerate launch, torchrun): the signal goes to
    them all at once, as when a machine dies. Its workers are found as its descendants: torch elastic starts each in a
    session of its own, out of the launcher's process group, and a worker that outlived its launcher would finish the
    run on its own."""
    import signal
    import subprocess

    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=group)
    wait_for_checkpoint(proc, out_dir, step, timeout)  # a run that ended or stalled fails the asserts below
    workers = psutil.Process(proc.pid).children(recursive=True) if group else []
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    for w in workers:
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"still running after SIGKILL: {alive}"
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(out_dir, "DONE.json"))


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
