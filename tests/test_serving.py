"""The OpenAI-compatible server: the official `openai` client against live uvicorn servers on 127.0.0.1, serving the
shipped 4-layer base model, checked against `generation.generate` run directly (a seeded request gives exactly the
text `generate` gives with that seed); and the pure pieces (batch selection, stream hold-back, keys, rate limits,
redaction)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
from dataclasses import replace

import httpx
import openai
import pytest
import torch

from conftest import live_server, read_jsonl
from instructgpt.generation import SamplingParams, generate
from instructgpt.modeling import load_model, save_model, sequence_logprobs
from instructgpt.prompting import encode_response, render_prompt
from instructgpt.reward import RewardNorm, init_reward_head, last_token_rewards
from instructgpt.serving import cli
from instructgpt.serving.app import create_app, load_server
from instructgpt.serving.config import Limits, ServeConfig, ServeConfigError
from instructgpt.serving.engine import (BatchingEngine, EngineClosed, Job, JobCancelled, TorchRunner,
                                        emittable_length, select_batch)
from instructgpt.serving.security import KeySourceError, RateLimiter, ReloadingKeys, api_keys, load_api_keys, redact
from instructgpt.tasks import make_tasks

MODEL = "builtin:base"
NAME = "base"  # the served name: the model directory's basename
KEY_A = "sk-alice-" + "a1" * 12
KEY_B = "sk-bob-" + "b2" * 12


def live(server, **uvicorn_kwargs):
    """Serve the model server's app live (see conftest.live_server); yields the base URL."""
    return live_server(create_app(server), **uvicorn_kwargs)


def client(url: str, key: str = "no-key-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def audit_rows(server) -> list[dict]:
    return read_jsonl(server.cfg.audit_log)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every test of this module, as the server shares its CPU


@pytest.fixture(scope="module")
def ref():
    """The same model, loaded here, to compute what the server should answer."""
    return load_model(MODEL)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """No API keys (loopback only), no reward model, prompt logging off."""
    d = tmp_path_factory.mktemp("open")
    cfg = ServeConfig(model=MODEL, device="cpu", batch_wait_ms=30, audit_log=str(d / "audit.jsonl"),
                      limits=Limits(max_request_bytes=20_000))
    server = load_server(cfg)
    with live(server) as url:
        yield server, url
    server.close()


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> str:
    """A reward model as `instructgpt rm` saves one: the base trunk, a fresh scalar head, a normalisation."""
    out = str(tmp_path_factory.mktemp("rm") / "model")
    model, tok = load_model(MODEL, model_class="sequence_classification")
    torch.manual_seed(1)
    init_reward_head(model.score)
    save_model(model, tok, out)
    RewardNorm(bias=0.25, gain=3.0).save(out)
    return out


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, reward_dir):
    """Two API keys from a file (one named), a reward model for best_of, prompt logging on."""
    d = tmp_path_factory.mktemp("keyed")
    (d / "keys.txt").write_text(f"# keys\nalice:{KEY_A}\n\n{KEY_B}\n")
    cfg = ServeConfig(model=MODEL, reward_model=reward_dir, device="cpu", audit_log=str(d / "audit.jsonl"),
                      log_prompts=True)
    server = load_server(cfg, load_api_keys(str(d / "keys.txt"), None))
    with live(server) as url:
        yield server, url
    server.close()


@pytest.fixture()
def engine_steps(monkeypatch) -> list[tuple[list[int], list[bool]]]:
    """Every step the engine samples, recorded in order as (lengths, ended): each row's length so far and whether
    it ended (EOS or a stop)."""
    import instructgpt.serving.engine as engine_mod

    steps, real = [], engine_mod.sample

    def recording(*a, **kw):
        out = real(*a, **kw)
        steps.append((out.lengths.tolist(), out.ended.tolist()))
        return out

    monkeypatch.setattr(engine_mod, "sample", recording)
    return steps


def prompt_of(tok, instruction: str) -> str:
    return render_prompt(tok, instruction)


# --------------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_select_batch_groups_compatible_jobs_and_runs_seeded_ones_alone():
    a = SamplingParams(temperature=1.0, n=2)
    jobs = [Job([1], a), Job([2], SamplingParams(temperature=0.5)), Job([3], a),
            Job([4], replace(a, seed=1)), Job([5], replace(a, n=1, max_new_tokens=100, stop=("x",), logprobs=2))]
    # max_tokens (within its factor-of-two class: 64 and 100), stop, n and logprobs are per row: the last job
    # batches with the first
    assert select_batch(jobs, 8) == [jobs[0], jobs[2], jobs[4]]
    assert select_batch(jobs, 4) == [jobs[0], jobs[2]]
    assert select_batch(jobs[3:], 8) == [jobs[3]]  # a seed runs alone
    big = [Job([1], replace(a, n=10)), Job([2], a)]
    assert select_batch(big, 8) == [big[0]]  # never split, never joined
    greedy = [Job([1], SamplingParams(temperature=0, top_p=0.5)), Job([2], SamplingParams(temperature=0, top_k=3))]
    assert select_batch(greedy, 8) == greedy  # top-p/top-k do not matter when greedy


def test_emittable_length_holds_back_partial_stops_and_characters():
    assert emittable_length("hello wor", ["world"]) == 6
    assert emittable_length("hello wor", []) == 9
    assert emittable_length("aab", ["abx", "bz"]) == 1  # "ab" could still become "abx"
    assert emittable_length("abc\ufffd", []) == 3  # a cut UTF-8 sequence is not final yet
    assert emittable_length("", ["x"]) == 0


def test_redaction_of_emails_phones_and_card_numbers():
    text = ("Mail jane.doe+x@mail.example.co.uk or call +1 (555) 123-4567 / 020 7946 0958 / 555.123.4567; card "
            "4111 1111 1111 1111, 4111-1111-1111-1111 or 4111111111111111.")
    assert redact(text) == ("Mail [EMAIL] or call [PHONE] / [PHONE] / [PHONE]; card [CARD], [CARD] or [CARD].")
    ordinary = "add 3 plus 4; sort 12 5 33 8; the year 1599; version 2.0.1; reverse 48213"
    assert redact(ordinary) == ordinary


def test_api_keys_are_hashed_named_and_validated(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# comment\nalice:{KEY_A}\n\n{KEY_B}\n")
    store = load_api_keys(str(f), f" carol:{'c' * 20} , {'d' * 20}")
    bob = "key-" + hashlib.sha256(KEY_B.encode()).hexdigest()[:8]
    assert set(store.digests) == {"alice", bob, "carol", "key-" + hashlib.sha256(b"d" * 20).hexdigest()[:8]}
    assert KEY_A not in repr(store.digests) and all(len(d) == 32 for d in store.digests.values())
    assert store.identify(KEY_A) == "alice" and store.identify(KEY_B) == bob and store.identify("c" * 20) == "carol"
    assert store.identify(KEY_A + "x") is None and store.identify("") is None and store.identify(None) is None
    assert load_api_keys(None, None) is None and load_api_keys(None, "") is None
    f.write_text("alice:short\n")
    with pytest.raises(KeySourceError, match="line 1: key too short"):
        load_api_keys(str(f), None)
    f.write_text(f"alice:{KEY_A}\nalice:{KEY_B}\n")
    with pytest.raises(KeySourceError, match="line 2: duplicate key name 'alice'"):
        load_api_keys(str(f), None)


def test_a_key_file_is_read_again_when_it_changes_and_kept_when_it_breaks(tmp_path):
    f, logs = tmp_path / "keys.txt", []
    key_c = "c" * 20
    f.write_text(f"alice:{KEY_A}\n{KEY_B}\n")
    keys = ReloadingKeys(str(f), f"env:{'e' * 20}", log=logs.append)
    assert keys.identify(KEY_A) == "alice" and len(keys) == 3 and logs == []

    def rewrite(text: str | None, tick: int) -> None:  # a distinct mtime each time, as a real edit a moment later has
        if text is None:
            f.unlink()
            return
        f.write_text(text)
        os.utime(f, ns=(tick * 10**9, tick * 10**9))
    rewrite(f"{KEY_B}\ncarol:{key_c}\n", 1)  # alice revoked, carol added
    assert keys.identify(KEY_A) is None and keys.identify(key_c) == "carol" and keys.identify("e" * 20) == "env"
    assert logs == [f"{f} changed: 3 API key(s) now"]
    rewrite(f"{KEY_B}\ncarol:short\n", 2)  # half-edited: a bad line keeps the keys as they were
    assert keys.identify(key_c) == "carol" and "line 2: key too short" in logs[-1] and "keeping the 3" in logs[-1]
    rewrite(None, 3)  # gone: kept too
    assert keys.identify(key_c) == "carol" and "cannot read the API key file" in logs[-1] and len(logs) == 3
    assert keys.identify(KEY_B) and len(logs) == 3  # one message per change, not per request
    rewrite(f"{KEY_A}\n", 4)
    assert keys.identify(key_c) is None and keys.identify(KEY_A) and len(keys) == 2
    assert isinstance(api_keys(str(f), None), ReloadingKeys) and api_keys(None, None) is None
    assert not isinstance(api_keys(None, f"{'e' * 20}"), ReloadingKeys)  # the environment cannot change underfoot


def test_rate_limiter_is_a_token_bucket_per_key():
    now = [100.0]
    rl = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(rl.allow("a")[0] for _ in range(60))
    ok, retry = rl.allow("a")
    assert not ok and retry == pytest.approx(1.0)
    assert rl.allow("b")[0]  # another key has its own bucket
    now[0] += 1.0
    assert rl.allow("a")[0] and not rl.allow("a")[0]
    now[0] += 3600
    assert sum(rl.allow("a")[0] for _ in range(100)) == 60  # refills to the burst size, no more


# --------------------------------------------------------------------------------------------------------------------
# The engine


def test_engine_rows_keep_their_own_max_tokens_stop_and_stream(ref):
    model, tok = ref
    engine = BatchingEngine(TorchRunner(model, tok), max_batch_size=8, batch_wait_s=0.2)
    ids = tok(prompt_of(tok, "spell the word cat"), add_special_tokens=False)["input_ids"]
    g = SamplingParams(temperature=0, max_new_tokens=14, stop_at_eos=False)
    long, short = Job(ids, g), Job(ids, replace(g, max_new_tokens=8))  # within 2x: the same batch
    for j in (long, short):
        engine.submit(j)
    engine.start()  # both were queued: one batch
    L, S = long.future.result(30)[0], short.future.result(30)[0]
    assert engine.stats.batches == 1 and list(engine.stats.recent_batch_rows) == [2]
    assert len(L.token_ids) == 14 and L.finish_reason == "length"
    assert S.token_ids == L.token_ids[:8] and S.finish_reason == "length" and len(S.logprobs) == 8

    stop = L.text[5:9]
    assert len(stop) == 4 and L.text.find(stop) > 0
    deltas: list[str] = []
    stopped = Job(ids, replace(g, stop=(stop,)), on_text=lambda j, d: deltas.append(d))
    engine.submit(stopped)
    C = stopped.future.result(30)[0]
    assert C.text == L.text[: L.text.find(stop)] and C.finish_reason == "stop"
    assert "".join(deltas) == C.text and len(deltas) > 1  # streamed piece by piece, no part of the stop string

    cancelled = Job(ids, g)
    cancelled.on_text = lambda j, d: cancelled.cancelled.set()  # the client goes away after the first text
    engine.submit(cancelled)
    X = cancelled.future.result(30)[0]
    assert X.finish_reason == "cancelled" and len(X.token_ids) < 14
    gone = Job(ids, g)
    gone.cancelled.set()
    engine.submit(gone)
    with pytest.raises(JobCancelled):
        gone.future.result(30)
    engine.close()


def test_waves_of_closed_loop_clients_are_not_split_into_batch_and_stragglers():
    class SlowRunner:  # stands in for the model: 50 ms a batch, then its answers one by one, as clients come back
        batches: list[int] = []
        started: list[float] = []

        def run(self, jobs):
            self.batches.append(sum(j.rows for j in jobs))
            self.started.append(time.monotonic())
            time.sleep(0.05)
            for j in jobs:
                j.future.set_result([])
                time.sleep(0.001)  # lets the answered client send its next request before the batch ends

    runner = SlowRunner()
    # a deadline far longer than a wave: a wave that waited for it instead of starting when its last client came
    # back would show in the gaps between batches, and a client slowed by a busy machine cannot miss it
    engine = BatchingEngine(runner, max_batch_size=32, batch_wait_s=5.0).start()
    ready, stop = threading.Barrier(8), threading.Event()

    def client(i):  # sends its next request when the last one is answered, until the test has seen enough
        ready.wait()
        while not stop.is_set():
            try:
                engine.submit(Job([i], SamplingParams())).result(30)
            except EngineClosed:
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(runner.batches) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    engine.close()
    for t in threads:
        t.join()
    # the start may split (the engine takes whatever came first); from the third batch on, every batch is the
    # whole wave of 8 clients, never a batch and its stragglers
    assert runner.batches[2:6] == [8, 8, 8, 8], runner.batches
    # clients coming back before their batch has ended are the next wave, not stragglers of this one: counting
    # them would make every wave wait out its deadline
    gaps = [b - a for a, b in zip(runner.started[2:6], runner.started[3:6])]
    assert max(gaps) < engine.batch_wait_s / 5, (gaps, runner.batches)


def test_a_short_request_never_runs_for_as_long_as_a_long_one():
    """A batch runs as many steps as its longest request allows: requests share one only when their max_tokens are
    within a factor of two, so 16-token requests queued with a 480-token one run at most 31 steps, not 480."""
    class StepRunner:  # stands in for the model: 1 ms a step, as many steps as the batch's longest request
        batches: list[tuple[list[int], int]] = []

        def run(self, jobs):
            steps = max(j.params.max_new_tokens for j in jobs)
            self.batches.append((sorted(j.params.max_new_tokens for j in jobs), steps))
            time.sleep(steps / 1000)
            for j in jobs:
                j.future.set_result([])

    runner = StepRunner()
    engine = BatchingEngine(runner, max_batch_size=32, batch_wait_s=0.0)
    lengths = [480, 16, 20, 16, 300, 31, 32]
    jobs = [Job([i], SamplingParams(max_new_tokens=n)) for i, n in enumerate(lengths)]
    for j in jobs:
        engine.submit(j)
    engine.start()
    for j in jobs:
        j.future.result(10)
    engine.close()
    assert runner.batches == [([300, 480], 480), ([16, 16, 20, 31], 31), ([32], 32)]
    assert select_batch(jobs, 32) == [jobs[0], jobs[4]]  # the oldest and those of its length class


# --------------------------------------------------------------------------------------------------------------------
# Through HTTP with the official client


def test_models_and_health(open_server):
    server, url = open_server
    c = client(url)
    assert [m.id for m in c.models.list().data] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_completions_with_a_seed_equal_generate(open_server, ref):
    server, url = open_server
    model, tok = ref
    c = client(url)
    prompt = prompt_of(tok, "add 3 plus 4")
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, n=3, seed=11, temperature=0.8, top_p=0.95)
    want = generate(model, tok, [prompt], SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95, n=3,
                                                         seed=11))[0]
    assert [ch.text for ch in r.choices] == [w.text for w in want]
    assert [ch.finish_reason for ch in r.choices] == [w.finish_reason for w in want]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len({w.text for w in want}) == 3
    assert r.object == "text_completion" and r.model == NAME
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # a list of prompts: choices prompt-major, each prompt's samples as if alone with that seed
    second = prompt_of(tok, "reverse the word dog")
    r = c.completions.create(model=NAME, prompt=[prompt, second], max_tokens=6, n=2, seed=4)
    p = SamplingParams(max_new_tokens=6, n=2, seed=4)
    want = generate(model, tok, [prompt], p)[0] + generate(model, tok, [second], p)[0]
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == [w.text for w in want]


def test_stop_sequences_cut_the_text(open_server, ref):
    server, url = open_server
    model, tok = ref
    c = client(url)
    prompt = prompt_of(tok, "sort the numbers 3 1 2")
    full = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, seed=5).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(full) > 12 and full.find(stop) > 0
    cut = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, seed=5, stop=["\x00never", stop]).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, seed=5, stop=stop, echo=True)
    assert r.choices[0].text == prompt + cut.text


def test_chat_completions_render_messages_with_the_template(open_server, ref):
    server, url = open_server
    model, tok = ref
    c = client(url)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "reverse the word cat"}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, n=2, seed=3)
    want = generate(model, tok, [render_prompt(tok, msgs)], SamplingParams(max_new_tokens=16, n=2, seed=3))[0]
    assert [ch.message.content for ch in r.choices] == [w.text for w in want]
    assert [ch.finish_reason for ch in r.choices] == [w.finish_reason for w in want]
    assert all(ch.message.role == "assistant" for ch in r.choices) and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"])
    # "developer" is the system role by its new name; content may come as text parts
    same = [{"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "reverse the word "},
                                         {"type": "text", "text": "cat"}]}]
    r2 = c.chat.completions.create(model=NAME, messages=same, max_tokens=16, n=2, seed=3)
    assert [ch.message.content for ch in r2.choices] == [w.text for w in want]


def test_streaming_equals_the_whole_response(open_server, ref):
    server, url = open_server
    model, tok = ref
    c = client(url)
    prompt = prompt_of(tok, "count the letter a in banana")
    whole = c.completions.create(model=NAME, prompt=prompt, max_tokens=20, n=2, seed=9)
    parts: dict[int, list[str]] = {0: [], 1: []}
    finish, usage = {}, None
    for chunk in c.completions.create(model=NAME, prompt=prompt, max_tokens=20, n=2, seed=9, stream=True,
                                      stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            parts[ch.index].append(ch.text)
            if ch.finish_reason:
                assert ch.index not in finish
                finish[ch.index] = ch.finish_reason
    assert ["".join(parts[i]) for i in (0, 1)] == [ch.text for ch in whole.choices]
    assert finish == {i: ch.finish_reason for i, ch in enumerate(whole.choices)}
    assert sum(bool(p) for p in parts[0]) > 1  # in pieces, not in one chunk
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                              whole.usage.completion_tokens)

    # chat, with a stop string that spans tokens: nothing of it may leak into the stream
    msgs = [{"role": "user", "content": "write a line about the sea"}]
    full = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=30, seed=2).choices[0].message.content
    stop = full[len(full) // 2 - 2: len(full) // 2 + 2]
    assert len(stop) == 4 and full.find(stop) > 0
    roles, content, reasons = [], [], []
    for chunk in c.chat.completions.create(model=NAME, messages=msgs, max_tokens=30, seed=2, stop=stop, stream=True):
        for ch in chunk.choices:
            roles += [ch.delta.role] if ch.delta.role else []
            content += [ch.delta.content] if ch.delta.content else []
            reasons += [ch.finish_reason] if ch.finish_reason else []
    assert roles == ["assistant"] and reasons == ["stop"] and "".join(content) == full[: full.find(stop)]

    # the raw event stream ends with `data: [DONE]`
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": prompt, "max_tokens": 4, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_logprobs(open_server, ref):
    server, url = open_server
    model, tok = ref
    c = client(url)
    prompt = prompt_of(tok, "what is the plural of fox")
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, seed=2, logprobs=3)
    want = generate(model, tok, [prompt], SamplingParams(max_new_tokens=10, seed=2, logprobs=3))[0][0]
    ch = r.choices[0]
    lp = ch.logprobs
    assert "".join(lp.tokens) == ch.text == want.text and len(lp.tokens) >= 1
    assert lp.token_logprobs == pytest.approx(want.logprobs[: len(lp.tokens)], abs=1e-6)
    assert lp.text_offset[0] == len(prompt)
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    for tops, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        values = list(tops.values())
        assert 1 <= len(values) <= 3 and values == sorted(values, reverse=True) and values[0] >= chosen - 1e-6
    ids = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, seed=2, logprobs=1,
                               extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.tokens
    assert ids == [f"token_id:{t}" for t in want.token_ids[: len(ids)]]

    # streamed: token-aligned chunks carrying the same numbers
    streamed = []
    for chunk in c.completions.create(model=NAME, prompt=prompt, max_tokens=10, seed=2, logprobs=3, stream=True):
        for s in chunk.choices:
            if s.logprobs:
                streamed += s.logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-9)

    msgs = [{"role": "user", "content": "spell the word dog"}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, seed=6, logprobs=True, top_logprobs=2)
    want = generate(model, tok, [render_prompt(tok, msgs)], SamplingParams(max_new_tokens=8, seed=6, logprobs=2))[0][0]
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content == want.text
    assert [e.logprob for e in content] == pytest.approx(want.logprobs[: len(content)], abs=1e-6)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= max(e.logprob, e.top_logprobs[1].logprob)
               - 1e-6 and e.bytes == list(e.token.encode()) for e in content)


def best_of_request(url: str, ref, key: str = "no-key-needed"):
    """n=2 of best_of=5 for one seeded prompt, and the 5 samples `generate` draws with that seed: (prompt, the
    response, the samples)."""
    model, tok = ref
    prompt = prompt_of(tok, "add 2 plus 2")
    r = client(url, key).completions.create(model=NAME, prompt=prompt, max_tokens=8, n=2, best_of=5, seed=13)
    return prompt, r, generate(model, tok, [prompt], SamplingParams(max_new_tokens=8, n=5, seed=13))[0]


def test_best_of_keeps_the_samples_the_reward_model_scores_highest(keyed_server, ref, reward_dir):
    server, url = keyed_server
    prompt, r, samples = best_of_request(url, ref, KEY_A)
    # the RM's reward of each sample, computed here one at a time: head at the last token, then the normalisation
    rm, rm_tok = load_model(reward_dir, model_class="sequence_classification")
    norm = RewardNorm.load(reward_dir)
    scores = []
    for s in samples:
        x = torch.tensor([rm_tok(prompt, add_special_tokens=False)["input_ids"] + encode_response(rm_tok, s.text)])
        with torch.no_grad():
            scores.append(float(norm.apply(last_token_rewards(rm, x, torch.ones_like(x)))[0]))
    order = sorted(range(5), key=lambda i: -scores[i])[:2]
    assert order != [0, 1] and len(set(scores)) == 5  # the choice is not simply the first samples
    assert [ch.text for ch in r.choices] == [samples[i].text for i in order]
    assert r.usage.completion_tokens == sum(len(s.token_ids) for s in samples)  # all best_of samples count


def test_best_of_without_a_reward_model_ranks_by_mean_logprob(open_server, ref):
    server, url = open_server
    _, r, samples = best_of_request(url, ref)
    mean = [sum(s.logprobs) / len(s.logprobs) for s in samples]
    order = sorted(range(5), key=lambda i: -mean[i])[:2]
    assert order != [0, 1]
    assert [ch.text for ch in r.choices] == [samples[i].text for i in order]


def test_api_keys_missing_wrong_and_right(keyed_server):
    server, url = keyed_server
    body = {"model": NAME, "prompt": "hello", "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Basic {KEY_A}"})
    assert r.status_code == 401
    for wrong in ("sk-wrong-" + "x" * 24, KEY_A[:-1], KEY_A + "1"):
        with pytest.raises(openai.AuthenticationError):
            client(url, wrong).models.list()
    assert client(url, KEY_A).models.list().data[0].id == NAME
    assert client(url, KEY_B).completions.create(model=NAME, prompt="hello", max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(url + "/health").status_code == 200  # health needs no key
    rows = audit_rows(server)
    assert [r["key_id"] for r in rows if r["status"] == 401][-5:] == [None] * 5
    bob = "key-" + hashlib.sha256(KEY_B.encode()).hexdigest()[:8]
    assert rows[-1]["key_id"] == bob and rows[-2]["key_id"] == "alice"
    assert KEY_A not in open(server.cfg.audit_log).read()


def test_a_key_removed_from_the_file_is_refused_at_the_next_request(keyed_server, tmp_path):
    server, _ = keyed_server
    f = tmp_path / "keys.txt"
    f.write_text(f"alice:{KEY_A}\nbob:{KEY_B}\n")
    watched = replace(server, keys=ReloadingKeys(str(f), log=lambda msg: None), audit=None)
    with live(watched) as url:
        assert client(url, KEY_A).models.list().data[0].id == NAME
        f.write_text(f"bob:{KEY_B}\n")  # alice's key revoked while the server runs
        with pytest.raises(openai.AuthenticationError):
            client(url, KEY_A).models.list()
        assert client(url, KEY_B).models.list().data[0].id == NAME


def test_rate_limit_per_key(keyed_server):
    server, _ = keyed_server
    limited = replace(server, limiter=RateLimiter(3), audit=None)  # same engine, 3 requests a minute per key
    with live(limited) as url:
        alice = client(url, KEY_A)
        for _ in range(3):
            alice.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            alice.models.list()
        assert 18 <= int(e.value.response.headers["retry-after"]) <= 20  # ~20 s until a token refills
        assert e.value.body["code"] == "rate_limit_exceeded"
        assert client(url, KEY_B).models.list().data[0].id == NAME  # bob has his own bucket


def test_invalid_requests_get_openai_errors_and_the_server_stays_up(open_server, ref):
    server, url = open_server
    model, tok = ref
    ok = {"model": NAME, "prompt": "hello", "max_tokens": 2}
    long_prompt = " ".join(["word"] * 300)
    cases = [  # (changes to a valid request, status, param)
        ({"temperature": 3}, 400, "temperature"), ({"top_p": -0.1}, 400, "top_p"), ({"n": 0}, 400, "n"),
        ({"n": 17}, 400, "n"), ({"max_tokens": 100_000}, 400, "max_tokens"), ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": 3, "best_of": 2}, 400, "best_of"), ({"best_of": 3, "stream": True}, 400, "best_of"),
        ({"logprobs": 6}, 400, "logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": []}, 400, "prompt"), ({"prompt": [[-1, 5]]}, 400, "prompt"), ({"prompt": [10**9]}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"), ({"prompt": [{"a": 1}]}, 400, "prompt"), ({"seed": 2**70}, 400, "seed"),
        ({"frequency_penalty": 2.5}, 400, "frequency_penalty"), ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
        ({"suffix": "x"}, 400, "suffix"), ({"tools": []}, 400, "tools"), ({"model": 7}, 400, "model"),
        ({"prompt": long_prompt, "max_tokens": 300}, 400, "prompt"), ({"model": "gpt-4o"}, 404, "model"),
        ({"prompt": ["x"] * 40}, 400, "prompt"), ({"n": 16, "prompt": ["a", "b", "c", "d", "e"]}, 400, "n"),
    ]
    for change, status, param in cases:
        r = httpx.post(url + "/v1/completions", json={**ok, **change}, timeout=30)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), change
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    too_long = httpx.post(url + "/v1/completions", json={**ok, "prompt": long_prompt, "max_tokens": 300}).json()
    assert too_long["error"]["code"] == "context_length_exceeded" and "maximum context length is 512" in \
        too_long["error"]["message"]
    chat_ok = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    chat_cases = [
        ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages"),
        ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"), ({"max_completion_tokens": 10**6},
                                                                            "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": long_prompt * 2}]}, "messages"), ({"functions": []}, "functions"),
    ]
    for change, param in chat_cases:
        r = httpx.post(url + "/v1/chat/completions", json={**chat_ok, **change}, timeout=30)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), change
    raw = [(b"{not json", 400), (b"[1, 2]", 400), (b'{"model": "base", "prompt": "x", "temperature": NaN}', 400),
           (b"[" * 19_000, 400), (b"x" * 30_000, 413), ("\u00e9".encode("latin-1"), 400)]
    for body, status in raw:
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and "error" in r.json()
    assert httpx.get(url + "/v1/nowhere").json()["error"]["message"] == "Not Found"
    assert httpx.delete(url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model=NAME, prompt="hi", n=0)
    # still serving
    assert httpx.get(url + "/health").status_code == 200
    assert client(url).completions.create(model=NAME, prompt="hello", max_tokens=3).choices[0].text


def test_32_concurrent_requests_are_batched_and_none_is_lost_or_mixed_up(open_server, ref):
    server, url = open_server
    model, tok = ref
    prompts = [prompt_of(tok, t.prompt) for t in make_tasks("heldout", 32, seed=1)]
    max_tokens = [4 + i % 9 for i in range(32)]
    ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(i):
        return await ac.completions.create(model=NAME, prompt=prompts[i], max_tokens=max_tokens[i], logprobs=0,
                                           extra_body={"return_tokens_as_token_ids": True})

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await ac.close()

    batches_before = server.engine.stats.batches
    results = asyncio.run(all_of_them())
    batches = server.engine.stats.batches - batches_before
    assert batches < 32 and max(list(server.engine.stats.recent_batch_rows)[-batches:]) > 1
    assert len({r.id for r in results}) == 32
    for i, r in enumerate(results):
        ch = r.choices[0]
        ids = [int(t.split(":")[1]) for t in ch.logprobs.tokens]
        assert 1 <= r.usage.completion_tokens <= max_tokens[i]
        if ch.finish_reason == "length":
            assert r.usage.completion_tokens == max_tokens[i]
        assert tok.decode(ids, skip_special_tokens=True) == ch.text
        # the log-probs the server reported are those of *this* prompt followed by these tokens
        p_ids = tok(prompts[i], add_special_tokens=False)["input_ids"]
        x = torch.tensor([p_ids + ids])
        with torch.no_grad():
            recomputed = sequence_logprobs(model, x, torch.ones_like(x))[0, len(p_ids) - 1:]
        assert recomputed.tolist() == pytest.approx(ch.logprobs.token_logprobs, abs=2e-4)


def test_audit_log_redacts_pii_and_logs_no_prompts_by_default(open_server, keyed_server):
    pii = "call me at +1 (555) 123-4567 or mail jane.doe@example.com; card 4111 1111 1111 1111"
    server, url = open_server
    client(url).completions.create(model=NAME, prompt=pii, max_tokens=2)
    row = audit_rows(server)[-1]
    assert "prompt" not in row and "completions" not in row and row["prompt_tokens"] > 0
    assert "jane.doe" not in open(server.cfg.audit_log).read()

    server, url = keyed_server
    r = client(url, KEY_A).chat.completions.create(model=NAME, messages=[{"role": "user", "content": pii}],
                                                   max_tokens=3)
    row = audit_rows(server)[-1]
    assert row["prompt"] == ["call me at [PHONE] or mail [EMAIL]; card [CARD]"]
    assert row["completions"] == [redact(r.choices[0].message.content)]
    assert (row["key_id"], row["endpoint"], row["status"], row["model"]) == ("alice", "/v1/chat/completions", 200,
                                                                             NAME)
    assert row["prompt_tokens"] == r.usage.prompt_tokens and row["completion_tokens"] == r.usage.completion_tokens
    assert row["latency_ms"] > 0 and row["time"].endswith("+00:00") and len(row["request_id"]) == 24
    text = open(server.cfg.audit_log).read()
    assert "jane.doe" not in text and "4111" not in text and "123-4567" not in text
    assert oct(os.stat(server.cfg.audit_log).st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------------------------------------------------
# The command


def test_cli_refuses_unsafe_setups_before_loading_anything(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("INSTRUCTGPT_API_KEYS", raising=False)
    assert cli.main(["--model", MODEL, "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err
    monkeypatch.setenv("INSTRUCTGPT_API_KEYS", "short")
    assert cli.main(["--model", MODEL]) == 2
    assert "INSTRUCTGPT_API_KEYS, item 1: key too short" in capsys.readouterr().err
    monkeypatch.setenv("INSTRUCTGPT_API_KEYS", KEY_A)
    assert cli.main(["--model", MODEL, "--ssl-certfile", str(tmp_path / "cert.pem")]) == 2
    assert "TLS needs both" in capsys.readouterr().err
    assert cli.main(["--model", MODEL, "--device", "gpu0"]) == 2
    assert "--device: " in capsys.readouterr().err
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "vllm" else real(name))
    assert cli.main(["--model", MODEL, "--engine", "vllm"]) == 2
    assert "pip install vllm" in capsys.readouterr().err


def test_serve_command_end_to_end(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    audit = tmp_path / "audit.jsonl"
    env = {**os.environ, "INSTRUCTGPT_API_KEYS": f"ci:{KEY_A}"}
    proc = subprocess.Popen([sys.executable, "-m", "instructgpt.cli", "serve", "--model", MODEL, "--port", str(port),
                             "--model-name", "policy", "--audit-log", str(audit), "--max-tokens", "8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        c = client(url, KEY_A)
        assert c.completions.create(model="policy", prompt="To be", max_tokens=8).choices[0].text
        with pytest.raises(openai.BadRequestError, match="at most 8"):
            c.completions.create(model="policy", prompt="To be", max_tokens=9)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (so the exit status says how it ended)
    assert proc.returncode in (0, -signal.SIGTERM) and "Finished server process" in err.decode(), err.decode()
    assert "policy at http://127.0.0.1" in err.decode()
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["key_id"], r["status"]) for r in rows] == [("ci", 200), ("ci", 400)]


def test_tls(open_server, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl (to make a self-signed certificate) is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server, _ = open_server
    cfg = replace(server.cfg, ssl_certfile=str(cert), ssl_keyfile=str(key))
    with live(replace(server, audit=None), **cli.tls_kwargs(cfg)) as url:
        assert url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(url + "/health", verify=ctx).json() == {"status": "ok"}
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https://", "http://") + "/health")
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(verify=ctx)) as c:  # closed: no keep-alive delays the shutdown
            assert c.models.list().data[0].id == NAME


def test_vllm_runner_maps_requests_and_outputs(monkeypatch):
    """Against a stand-in with vLLM's interface (vLLM itself needs a CUDA machine)."""
    from instructgpt.serving.vllm_engine import VLLMRunner

    seen = {}

    class StubLLM:
        def __init__(self, model, **kw):
            seen["model"] = model

        def generate(self, prompts, params, use_tqdm):
            seen["prompts"], seen["params"] = prompts, [p.kw for p in params]
            lp = types.SimpleNamespace
            out = types.SimpleNamespace(text="hi", token_ids=[7, 8], finish_reason="stop",
                                        logprobs=[{7: lp(logprob=-0.5), 3: lp(logprob=-0.1), 4: lp(logprob=-2.0)},
                                                  {8: lp(logprob=-1.5)}])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    class StubParams:
        def __init__(self, **kw):
            self.kw = kw

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=StubLLM, SamplingParams=StubParams))
    runner = VLLMRunner("/models/policy")
    job = Job([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.7, stop=("###",), logprobs=2, seed=4))
    deltas = []
    job.on_text = lambda j, d: deltas.append((j, d))
    runner.run([job])
    (c,) = job.future.result(1)
    assert seen["model"] == "/models/policy" and seen["prompts"] == [{"prompt_token_ids": [1, 2, 3]}]
    assert seen["params"] == [dict(n=1, temperature=0.7, top_p=1.0, max_tokens=5, frequency_penalty=0.0,
                                   presence_penalty=0.0, seed=4, logprobs=2, stop=["###"])]
    assert (c.text, c.token_ids, c.logprobs, c.finish_reason, c.prompt_tokens) == ("hi", [7, 8], [-0.5, -1.5], "stop",
                                                                                   3)
    assert c.top_logprobs == [{3: -0.1, 7: -0.5}, {8: -1.5}] and deltas == [(0, "hi")]


def test_tiny_temperatures_decode_greedily_and_lone_surrogates_are_400(open_server, ref):
    """A positive temperature too small to divide by (1e-39 overflows the logits to inf) is greedy decoding, as in
    vLLM; a lone UTF-16 surrogate, which JSON can escape but no text holds, is a 400 naming the field, also in the
    model id of the URL."""
    server, url = open_server
    model, tok = ref
    greedy = client(url).completions.create(model=NAME, prompt="the king", max_tokens=6, temperature=0)
    for t in (1e-39, 2.2e-308, 1e-6):
        r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "the king", "max_tokens": 6,
                                                       "temperature": t}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.choices[0].text, t
    bodies = [('{"model": "base", "prompt": "hi \\ud800", "max_tokens": 2}', "/v1/completions", "prompt"),
              ('{"model": "base\\udfff", "prompt": "hi", "max_tokens": 2}', "/v1/completions", "model"),
              ('{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions",
               "messages"),
              ('{"model": "base", "prompt": "hi", "stop": ["\\udc00x"]}', "/v1/completions", "stop")]
    for body, path, param in bodies:
        r = httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
        assert "surrogate" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/models/base%ED%A0%80")  # the surrogate's UTF-8-style bytes in the path
    assert r.status_code in (400, 404) and "error" in r.json()
    assert httpx.get(url + "/health").status_code == 200


def test_types_are_strict_as_openai_s(open_server):
    """A string for a number, a boolean for an integer, a string for a boolean: 400 invalid_type naming the
    parameter, as OpenAI answers; an integer where a decimal goes is a number and accepted."""
    server, url = open_server
    ok = {"model": NAME, "prompt": "hello", "max_tokens": 2}
    lax = [("max_tokens", "16", "a string"), ("n", True, "a boolean"), ("temperature", "0.5", "a string"),
           ("stream", "yes", "a string"), ("seed", "12", "a string"), ("logprobs", True, "a boolean"),
           ("top_p", [1], "an array")]
    for param, value, got in lax:
        r = httpx.post(url + "/v1/completions", json={**ok, param: value}, timeout=30)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (400, param, "invalid_type"), param
        assert err["message"].startswith(f"Invalid type for '{param}'") and f"got {got} instead" in err["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2, "logprobs": "true"}, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_type")
    r = httpx.post(url + "/v1/completions", json={**ok, "temperature": 1, "top_p": 1, "frequency_penalty": 0})
    assert r.status_code == 200


def test_a_client_that_disconnects_frees_its_rows_at_the_next_step(open_server, engine_steps):
    """A non-streaming request whose client goes away is cancelled: its rows end at the engine's next step instead
    of generating all of max_tokens, and the audit log records 499; the server goes on answering."""
    server, url = open_server
    ran = engine_steps
    body = {"model": NAME, "prompt": "the king", "max_tokens": 480, "temperature": 0}
    full = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    assert full["choices"][0]["finish_reason"] == "length"  # the whole 480 when nobody leaves
    n_audit = len(audit_rows(server))
    ran.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)  # the client gives up and closes
    deadline = time.monotonic() + 60
    while not ran and time.monotonic() < deadline:
        time.sleep(0.05)
    (lengths, ended), = ran
    assert lengths[0] < 480 and not ended[0]  # cut off where it was, before max_tokens, and not by EOS
    while len(audit_rows(server)) == n_audit and time.monotonic() < deadline:
        time.sleep(0.05)
    assert audit_rows(server)[-1]["status"] == 499 and audit_rows(server)[-1]["error"] == "client disconnected"
    assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_request_timeout_cancels_an_overdue_request_with_504(tmp_path, engine_steps):
    """--request-timeout: a request still unanswered after it is a 504 (code timeout), and its rows leave the batch
    at the next step; a request answered in time is unaffected; a timeout that is not positive is refused."""
    ran = engine_steps
    cfg = ServeConfig(model=MODEL, device="cpu", audit_log=None, request_timeout_s=0.2)
    server = load_server(cfg)
    try:
        with live(server) as url:
            body = {"model": NAME, "prompt": "the king", "max_tokens": 480, "temperature": 0}
            t0 = time.monotonic()
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert (r.status_code, r.json()["error"]["code"]) == (504, "timeout") and time.monotonic() - t0 < 30
            deadline = time.monotonic() + 60
            while not ran and time.monotonic() < deadline:
                time.sleep(0.05)
            lengths, _ = ran[0]
            assert lengths[0] < 480  # cut off (greedy from this prompt runs all 480 without EOS: the test above)
            assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
    finally:
        server.close()
    with pytest.raises(ServeConfigError, match="--request-timeout must be > 0"):
        ServeConfig(model=MODEL, request_timeout_s=0).validate(have_keys=False)
