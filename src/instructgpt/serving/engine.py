"""Dynamic batching: requests that arrive together are generated together, in one `generation.sample` call.

One worker thread owns the model. Requests become :class:`Job` s (one prompt, ``params.n`` samples) in a queue; the
worker takes the oldest job and runs every queued job whose sampling parameters can share a `sample` call
(:func:`batch_key`: the same scalars, and max_tokens in the same factor-of-two class) in one left-padded batch of up
to ``max_batch_size`` rows. A batch runs to its end: a request that arrives meanwhile waits for it (rows do not join
a running batch), which is why a batch's length is kept close to that of each request in it.

When to start (`_take_batch`): clients that send their next request when their last one is answered arrive in
waves, one per batch. The worker counts the last wave (the previous batch's rows plus those that queued, with the
same parameters, while it ran) and starts as soon as the batch holds as many rows (or is full); else once its oldest
request has waited ``batch_wait_s``, or a quarter of the previous batch's run time if that is longer, counted from
when that batch ended if later. A lone client so never waits, and a wave is not split into a batch and its
stragglers (which would cost a whole extra batch).

What `sample` takes as one scalar for the whole batch (temperature, top-p, top-k,
penalties) must match; what differs per row is handled in the `stop_check` hook, which `sample` calls after every
token for every live row: each row's own ``max_tokens``, its own stop strings, streaming its text as it grows, and
cancellation (a client that went away).

Seeds: `sample` draws every row from one `torch.Generator`, so a row's sample depends on its batch neighbours. A
request with a ``seed`` is therefore run in a batch of its own (its n samples together), seeded with it: the same
seed gives the same text as ``instructgpt generate --seed`` on that prompt, whatever else the server is doing.
Requests without a seed are batched freely, from a generator seeded fresh for every batch.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Optional, Sequence

import torch

from instructgpt.batching import left_pad
from instructgpt.generation import Completion, SamplingParams, _first_stop, eos_ids, is_greedy, sample

STOP_KEEP_ALL = 1 << 62  # what our stop_check returns to end a row without cutting its text
# A batch short of its wave waits for the rest up to this fraction of the previous batch's run time (or batch_wait_s,
# if longer): cheaper than running the stragglers as a batch of their own afterwards.
WAVE_WAIT_FRACTION = 0.25


class EngineBusy(RuntimeError):
    """The queue holds as many rows as allowed; the client should retry later."""


class EngineClosed(RuntimeError):
    pass


class JobCancelled(RuntimeError):
    pass


class Answer(Future):
    """A `Future` that notes when it was answered: a closed-loop client's next request arrives after that, so the
    engine can tell a wave's stragglers (queued before) from its clients coming back (queued after)."""

    answered_at: Optional[float] = None

    def set_result(self, result) -> None:
        self.answered_at = time.monotonic()
        super().set_result(result)

    def set_exception(self, exception) -> None:
        self.answered_at = time.monotonic()
        super().set_exception(exception)


@dataclass
class Job:
    """One prompt of a request and its `params.n` samples; the future resolves to their `Completion`s."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Optional[Callable[[int, str], None]] = None  # streaming: (sample index, text delta), from the worker
    future: Answer = field(default_factory=Answer)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.params.n


def length_class(max_new_tokens: int) -> int:
    """Requests share a batch only when their max_tokens are in the same class (1, 2-3, 4-7, ... 256-511): a batch
    runs for as many steps as its longest request allows and answers all its rows at its end, so a 16-token request
    batched with a 512-token one would be answered after 512 steps."""
    return max(1, max_new_tokens).bit_length()


def batch_key(params: SamplingParams) -> Optional[Hashable]:
    """What must be equal for two jobs to share a `sample` call; None: the job runs alone (it has a seed)."""
    if params.seed is not None:
        return None
    length = length_class(params.max_new_tokens)
    if is_greedy(params.temperature):  # greedy: top-p/top-k do not matter
        return ("greedy", params.frequency_penalty, params.presence_penalty, params.stop_at_eos, length)
    return (params.temperature, params.top_p, params.top_k, params.frequency_penalty, params.presence_penalty,
            params.stop_at_eos, length)


def select_batch(pending: Sequence[Job], max_rows: int,
                 key_fn: Callable[[SamplingParams], Optional[Hashable]] = batch_key) -> list[Job]:
    """The oldest job plus the later ones compatible with it, oldest first, while the rows fit in `max_rows`.

    A job with key None runs alone; so does a job with more rows than `max_rows` (it is never split).
    """
    if not pending:
        return []
    first = pending[0]
    key = key_fn(first.params)
    batch, rows = [first], first.rows
    if key is None:
        return batch
    for job in pending[1:]:
        if rows >= max_rows:
            break
        if job.rows + rows <= max_rows and key_fn(job.params) == key:
            batch.append(job)
            rows += job.rows
    return batch


def emittable_length(text: str, stops: Sequence[str]) -> int:
    """How much of a growing completion is final: all but a trailing partial character (U+FFFD from a cut UTF-8
    sequence) and the longest tail that could still become a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), hold, -1):
            if text.endswith(s[:k], 0, n):
                hold = k
                break
    return n - hold


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that ``"".join(pieces) == decode(ids)``; a token that ends mid-character
    adds "" and the character goes to the token that completes it."""
    pieces, done = [], ""
    for j in range(len(ids)):
        cur = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True)
        if cur.endswith("\ufffd") or not cur.startswith(done):
            pieces.append("")
            continue
        pieces.append(cur[len(done):])
        done = cur
    full = tokenizer.decode(list(ids), skip_special_tokens=True)
    if pieces and full.startswith(done):
        pieces[-1] += full[len(done):]
    return pieces


class TorchRunner:
    """Runs a batch of compatible jobs through our KV-cache sampler (`generation.sample`)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def run(self, jobs: Sequence[Job]) -> None:
        rows = [(job, j) for job in jobs for j in range(job.params.n)]
        first = jobs[0].params
        # the scalars shared by the batch come from the first job (batch_key made them equal); per-row limits are
        # enforced in check(); the batch runs as long as its longest request allows
        params = replace(first, n=1, stop=(), max_new_tokens=max(j.params.max_new_tokens for j in jobs),
                         logprobs=max(j.params.logprobs for j in jobs))
        seed = first.seed if len(jobs) == 1 and first.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        ids, mask = left_pad([job.prompt_ids for job, _ in rows], self.pad, self.device)  # (B, P)
        reason: dict[int, str] = {}  # row -> why check() ended it: "length" or "cancelled"
        emitted = [""] * len(rows)  # text already streamed, per row

        def cancelled_rows() -> list[int]:  # a cancelled job's rows end at the next token, whatever else runs
            ended = [r for r, (job, _) in enumerate(rows) if job.cancelled.is_set()]
            for r in ended:
                reason.setdefault(r, "cancelled")
            return ended

        def check(row: int, new_ids: list[int]) -> Optional[int]:
            job, j = rows[row]
            text = self.decode(new_ids) if (job.params.stop or job.on_text) else ""
            if job.params.stop:
                cut = _first_stop(text, job.params.stop)
                if cut is not None:
                    return cut
            if job.on_text is not None:
                m = emittable_length(text, job.params.stop)
                if m > len(emitted[row]) and text.startswith(emitted[row]):
                    job.on_text(j, text[len(emitted[row]): m])
                    emitted[row] = text[:m]
            if len(new_ids) >= job.params.max_new_tokens:
                reason[row] = "length"
                return STOP_KEEP_ALL
            return None

        # the per-row hook costs a host sync per row and token: only when some row needs it
        per_row = any(j.params.stop or j.on_text is not None or j.params.max_new_tokens < params.max_new_tokens
                      for j in jobs)
        out = sample(self.model, ids, mask, params, self.eos, self.pad, gen, check if per_row else None,
                     cancelled_rows)
        results: dict[int, list[Completion]] = {id(job): [] for job in jobs}
        lengths, tokens, ended = out.lengths.tolist(), out.tokens.cpu(), out.ended.tolist()  # one copy, not per row
        logprobs = out.logprobs.cpu()
        top_ids = out.top_ids.cpu() if out.top_ids is not None else None
        top_lps = out.top_logprobs.cpu() if out.top_logprobs is not None else None
        for r, (job, j) in enumerate(rows):
            n = lengths[r]
            toks = tokens[r, :n].tolist()
            text = self.decode(toks)
            finish = "stop" if ended[r] else "length"
            cut = out.stop_cut[r]
            if reason.get(r) == "length":
                finish = "length"
            elif reason.get(r) == "cancelled":
                finish = "cancelled"
            elif cut is not None:
                text, finish = text[:cut], "stop"
            tops = None
            if job.params.logprobs:
                k = job.params.logprobs
                tops = [dict(zip(top_ids[r, t, :k].tolist(), top_lps[r, t, :k].tolist())) for t in range(n)]
            if job.on_text is not None and text.startswith(emitted[r]) and len(text) > len(emitted[r]):
                job.on_text(j, text[len(emitted[r]):])
            results[id(job)].append(Completion(text, toks, logprobs[r, :n].tolist(), finish, len(job.prompt_ids), tops))
        for job in jobs:
            job.future.set_result(results[id(job)])


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    recent_batch_rows: deque = field(default_factory=lambda: deque(maxlen=1000))  # rows of the last batches


class BatchingEngine:
    """The queue and the worker thread in front of a runner (`TorchRunner`, or the vLLM one)."""

    def __init__(self, runner, max_batch_size: int = 32, batch_wait_s: float = 0.02, max_pending_rows: int = 1024,
                 key_fn: Callable[[SamplingParams], Optional[Hashable]] = batch_key):
        self.runner, self.key_fn = runner, key_fn
        self.max_batch_size, self.batch_wait_s, self.max_pending_rows = max_batch_size, batch_wait_s, max_pending_rows
        self.stats = EngineStats()
        # the last wave: the batch key, and its rows plus those of that key that queued while it ran (the clients
        # in that wave); a batch of that key starts at once when it is this large
        self._wave: tuple[Optional[Hashable], int] = (None, 1)
        self._idle_since = 0.0  # when the previous batch ended
        self._last_batch_s = 0.0  # how long it ran
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="instructgpt-engine", daemon=True)

    def start(self) -> "BatchingEngine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job.future.set_exception(EngineClosed("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if sum(j.rows for j in self._pending) + job.rows > self.max_pending_rows:
                raise EngineBusy("the server is at capacity; retry shortly")
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            while True:
                batch = select_batch(self._pending, self.max_batch_size, self.key_fn)
                key = self.key_fn(batch[0].params)
                target = self._wave[1] if key == self._wave[0] else 1
                if key is None or sum(j.rows for j in batch) >= min(self.max_batch_size, target):
                    break
                wait = max(self.batch_wait_s, WAVE_WAIT_FRACTION * self._last_batch_s)
                left = max(self._pending[0].arrived, self._idle_since) + wait - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    job.future.set_exception(JobCancelled("cancelled"))
                else:
                    live.append(job)
            if not live:
                continue
            rows = sum(j.rows for j in live)
            self.stats.batches += 1  # counted before running: a client that has its answer sees its batch here
            self.stats.rows += rows
            self.stats.recent_batch_rows.append(rows)
            started = time.monotonic()
            try:
                self.runner.run(live)
            except Exception as e:  # a failed batch fails its requests, never the worker
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
            key = self.key_fn(live[0].params)
            # the runner answers its jobs one by one, and a client may send its next request before the batch ends:
            # only what queued before the first answer belongs to this wave
            first_answer = min((j.future.answered_at for j in live if j.future.answered_at is not None),
                               default=time.monotonic())
            with self._cond:
                queued = sum(j.rows for j in self._pending
                             if self.key_fn(j.params) == key and j.arrived < first_answer)
            self._wave = (key, rows + queued)
            self._idle_since = time.monotonic()
            self._last_batch_s = self._idle_since - started
