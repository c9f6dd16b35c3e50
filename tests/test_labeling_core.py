"""The labeling app without HTTP: agreement math, rubric, passwords, the SQLite store, import/export, CLI, crashes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import NO_SYSTEM_TEMPLATE, read_jsonl, write_jsonl
from instructgpt import data
from instructgpt.data import DataError
from instructgpt.labeling import security
from instructgpt.labeling.agreement import (agreement_report, all_tied, dense_ranks, format_rate,
                                            pair_agreement)
from instructgpt.labeling.cli import main as label_main
from instructgpt.labeling.formats import export, import_prompts, read_prompts
from instructgpt.labeling.outputs import generate_outputs
from instructgpt.labeling.rubric import FLAGS, SubmissionError, check_demonstration, check_ranking
from instructgpt.labeling.store import CLAIM_LEASE_SECONDS, Store, StoreError, User, display_order

PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "labels.sqlite"))


def rank_all(store: Store, user_id: int, ranks_for=lambda task: None) -> list[int]:
    """Claim and submit every task open to a user; returns the task ids in order."""
    done = []
    while (task_id := store.claim_next(user_id)) is not None:
        task = store.task(task_id)
        if task.kind == "demonstration":
            assert store.submit_demonstration(task_id, user_id, f"answer {task_id}").status == "ok"
        else:
            k = len(task.responses)
            ranks = ranks_for(task) or list(range(1, k + 1))
            sub = check_ranking(k, ranks, [4] * k, [[] for _ in range(k)])
            assert store.submit_ranking(task_id, user_id, sub).status == "ok"
        done.append(task_id)
    return done


# ----------------------------------------------------------------------------------------------------------------
# Agreement math


def test_dense_ranks_keeps_order_and_ties():
    assert dense_ranks([3, 1, 3, 7]) == [2, 1, 2, 3]
    assert dense_ranks([1, 2, 3]) == [1, 2, 3]
    assert dense_ranks([2, 2]) == [1, 1]
    assert all_tied([1, 1, 1]) and not all_tied([1, 1, 2])


def test_pair_agreement_on_hand_made_rankings():
    # One swapped neighbour out of six pairs.
    assert pair_agreement([1, 2, 3, 4], [1, 3, 2, 4]) == (5, 6)
    # Exact reversal: nothing agrees.
    assert pair_agreement([1, 2, 3, 4], [4, 3, 2, 1]) == (0, 6)
    # Ties drop pairs: (0,1) tied by a, (2,3) tied by b; the other four pairs agree.
    assert pair_agreement([1, 1, 2, 3], [1, 2, 3, 3]) == (4, 4)
    # A tie on either side removes the pair entirely.
    assert pair_agreement([1, 1], [1, 2]) == (0, 0)
    with pytest.raises(ValueError):
        pair_agreement([1, 2], [1, 2, 3])


def test_agreement_report_numbers():
    report = agreement_report({
        1: {"ann": [1, 2, 3], "bob": [1, 2, 3], "cat": [3, 2, 1]},  # ann-bob 3/3, ann-cat 0/3, bob-cat 0/3
        2: {"ann": [1, 2], "bob": [2, 1]},  # 0/1
        3: {"ann": [1, 2]},  # a single labeler: no overlap, ignored
    })
    assert (report.agree, report.comparable, report.tasks, report.labeler_pairs) == (3, 10, 2, 4)
    assert report.rate == pytest.approx(0.3)
    assert (report.per_labeler["ann"].agree, report.per_labeler["ann"].comparable) == (3, 7)
    assert (report.per_labeler["bob"].agree, report.per_labeler["bob"].comparable) == (3, 7)
    assert (report.per_labeler["cat"].agree, report.per_labeler["cat"].comparable) == (0, 6)
    mean, se = report.mean_and_stderr
    rates = [3 / 7, 3 / 7, 0.0]
    m = sum(rates) / 3
    assert mean == pytest.approx(m)
    assert se == pytest.approx((sum((r - m) ** 2 for r in rates) / 2 / 3) ** 0.5)
    assert format_rate(0.726, 0.015) == "72.6 ± 1.5%"
    assert format_rate(None) == "—"
    assert agreement_report({}).mean_and_stderr is None


# ----------------------------------------------------------------------------------------------------------------
# Rubric and passwords


def test_rubric_has_the_papers_flags_and_validates():
    labels = {f.label for f in FLAGS}
    assert "Hallucination" in labels and "Fails to follow the correct instruction/task" in labels
    assert len(FLAGS) == 11
    sub = check_ranking(3, [2, 3, 2], [7, 1, 7], [["hallucination", "fails_instruction", "hallucination"], [], []])
    assert sub.ranks == [1, 2, 1]
    assert sub.flags[0] == ["fails_instruction", "hallucination"]  # rubric order, no repeats
    for bad in (dict(ranks=[1, 2, 3], ratings=[0, 1, 1]), dict(ranks=[1, 2, 4], ratings=[1, 1, 1]),
                dict(ranks=[1, 2], ratings=[1, 1, 1])):
        with pytest.raises(SubmissionError):
            check_ranking(3, bad["ranks"], bad["ratings"], [[], [], []])
    with pytest.raises(SubmissionError, match="unknown flag"):
        check_ranking(2, [1, 2], [1, 1], [["<script>"], []])
    assert check_demonstration("Hello\r\nworld  \n") == "Hello\nworld"
    with pytest.raises(SubmissionError):
        check_demonstration("   \n")


def test_passwords_are_salted_slow_hashes():
    h1, h2 = security.hash_password("secret-one"), security.hash_password("secret-one")
    assert h1 != h2 and h1.startswith("scrypt$")  # per-user salt
    assert "secret-one" not in h1
    assert security.verify_password("secret-one", h1)
    assert not security.verify_password("secret-two", h1)
    assert not security.verify_password("secret-one", None)  # unknown user: checked against a dummy, never true
    assert not security.verify_password("secret-one", "garbage")
    assert security.tokens_equal("abc", "abc") and not security.tokens_equal("abc", "abd")
    assert not security.tokens_equal(None, None) and not security.tokens_equal("", "")


# ----------------------------------------------------------------------------------------------------------------
# Store


@pytest.mark.parametrize("kept", ["memory", "database"])
def test_login_throttle_counts_failures_in_a_sliding_window(kept, tmp_path):
    now = [1000.0]
    failures = security.MemoryFailures() if kept == "memory" else Store(str(tmp_path / "l.sqlite")).login_failures()
    t = security.LoginThrottle({"user": 3, "addr": 5}, window=600, clock=lambda: now[0], failures=failures)
    ann, bob, addr = "user:ann", "user:bob", "addr:10.0.0.7"
    for i in range(3):
        assert t.wait([ann, addr]) == 0
        t.failed([ann, addr])
        now[0] += 10
    assert t.wait([ann, addr]) == pytest.approx(600 - 30)  # until the first failure leaves the window
    assert t.wait([bob, addr]) == 0  # another account from the same address: 3 of its 5
    t.failed([bob, addr])
    t.failed([bob, addr])
    assert t.wait([bob, addr]) == pytest.approx(600 - 30)  # now the address is at its limit
    assert t.wait([bob, "addr:10.0.0.8"]) == 0  # bob (2 of 3) from elsewhere
    now[0] += 600 - 30
    assert t.wait([ann, addr]) == 0  # the oldest failures have left the window
    t.failed([bob, "addr:10.0.0.8"])
    t.succeeded(bob)  # a good login forgets the account's failures, not the address's
    assert t.wait([bob]) == 0 and len(failures.times("addr:10.0.0.8", now[0] - 600)) == 1
    now[0] += 10_000
    assert t.wait([ann, bob, addr, "addr:10.0.0.8"]) == 0
    t.failed(["user:carol"])
    assert failures.count() == 1  # a failure forgets every one that has left the window: storage stays bounded


def test_login_failures_kept_in_the_database_outlive_a_restart(tmp_path):
    path, now = str(tmp_path / "l.sqlite"), [5000.0]

    def throttle():  # a fresh Store and throttle on the same file: the app restarted
        return security.LoginThrottle({"user": 2, "addr": 9}, window=900, clock=lambda: now[0],
                                      failures=Store(path).login_failures())

    first = throttle()
    first.failed(["user:ann", "addr:a"])
    first.failed(["user:ann", "addr:a"])
    now[0] += 60
    assert throttle().wait(["user:ann"]) == pytest.approx(900 - 60)  # still locked after the restart
    throttle().succeeded("user:ann")
    assert throttle().wait(["user:ann"]) == 0 and throttle().failures.times("addr:a", 0) == [5000.0, 5000.0]


def test_store_uses_wal_and_users(store):
    with store.connect() as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    alice = store.add_user("alice", PASSWORD)
    assert store.authenticate("alice", PASSWORD) == alice
    assert store.authenticate("alice", "wrong password") is None
    assert store.authenticate("nobody", PASSWORD) is None
    with pytest.raises(StoreError, match="already exists"):
        store.add_user("alice", PASSWORD)
    with pytest.raises(StoreError, match="invalid username"):
        store.add_user("<b>x</b>", PASSWORD)
    with pytest.raises(StoreError, match="too short"):
        store.add_user("bob", "short")
    token, csrf = store.create_session(alice.id)
    assert store.session(token).user == alice and store.session(token).csrf_token == csrf
    with store.connect() as con:  # only a hash of the session token is stored
        assert con.execute("SELECT COUNT(*) FROM sessions WHERE token_hash = ?", (token,)).fetchone()[0] == 0
    store.add_user("alice", "a new password", update=True)  # a password reset ends old sessions
    assert store.session(token) is None
    assert store.authenticate("alice", "a new password") is not None


def test_a_disabled_user_loses_sessions_and_open_claims_but_not_submissions(store):
    store.add_tasks(_tasks(3, overlap=1))
    ann, bob = store.add_user("ann", PASSWORD), store.add_user("bob", PASSWORD)
    sub = check_ranking(3, [1, 2, 3], [5, 4, 3], [[], [], []])
    assert store.claim_next(ann.id) == 1 and store.submit_ranking(1, ann.id, sub).status == "ok"
    assert store.claim_next(ann.id) == 2  # an open claim: the slot is hers
    assert store.claim_next(bob.id) == 3
    token, _ = store.create_session(ann.id)
    user, released = store.set_disabled("ann", True)
    assert user.disabled and released == 1
    assert store.session(token) is None and store.authenticate("ann", PASSWORD) is None
    assert [u.disabled for u in store.users()] == [True, False]
    assert store.submit_ranking(3, bob.id, sub).status == "ok"
    assert store.claim_next(bob.id) == 2  # ann's open claim went back to the pool
    assert [(s["labeler"], s["task_id"]) for s in store.iter_submissions()] == [("ann", 1), ("bob", 3)]
    store.add_user("ann", "a new password", update=True)  # a password reset does not enable
    assert store.authenticate("ann", "a new password") is None
    assert store.set_disabled("ann", False) == (User(ann.id, "ann", False, False), 0)
    assert store.authenticate("ann", "a new password") == ann
    with pytest.raises(StoreError, match="no user 'nobody'"):
        store.set_disabled("nobody", True)


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    """A database made before users.disabled opens, keeps its users and sessions, and gains the column (and the
    login_failures table of version 3)."""
    path = str(tmp_path / "v1.sqlite")
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL,
                            is_admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);""")
    con.execute("INSERT INTO users (username, password_hash, is_admin, created_at) VALUES ('ann', ?, 0, 0)",
                (security.hash_password(PASSWORD),))
    con.commit()
    con.close()
    store = Store(path)
    ann = store.authenticate("ann", PASSWORD)
    assert ann is not None and not ann.disabled
    with store.connect() as c:
        assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
    assert store.login_failures().count() == 0  # the table is there
    store.set_disabled("ann", True)
    assert Store(path).authenticate("ann", PASSWORD) is None  # reopening migrates nothing twice


def _tasks(n: int, overlap: int, kind: str = "ranking") -> list[dict]:
    return [{"kind": kind, "messages": [{"role": "user", "content": f"prompt {i}"}],
             "responses": ["a", "b", "c"] if kind == "ranking" else None, "overlap": overlap,
             "source": f"t:{i}", "origin": "imported", "dedup_key": f"{kind}-{i}"} for i in range(n)]


def test_assignment_overlap_and_never_twice(store):
    assert store.add_tasks(_tasks(5, overlap=2)) == 5
    assert store.add_tasks(_tasks(5, overlap=2)) == 0  # same keys: nothing added twice
    users = [store.add_user(f"u{i}", PASSWORD).id for i in range(3)]
    done = {u: rank_all(store, u) for u in users}
    assert done[users[0]] == [1, 2, 3, 4, 5]  # lowest id first, each task once
    assert done[users[1]] == [1, 2, 3, 4, 5]
    assert done[users[2]] == []  # every task already has its two labelers
    with store.connect() as con:
        per_task = [r[0] for r in con.execute("SELECT COUNT(*) FROM submissions GROUP BY task_id")]
    assert per_task == [2] * 5
    p = store.progress(users[0])
    assert (p.done, p.claimed, p.available, p.total) == (5, 0, 0, 5)


def test_claims_skips_and_leases(store):
    store.add_tasks(_tasks(2, overlap=1))
    a, b = store.add_user("a", PASSWORD).id, store.add_user("b", PASSWORD).id
    assert store.claim_next(a) == 1
    assert store.claim_next(a) == 1  # an open claim is returned again, not a new task
    assert store.progress(a).total == 2
    assert store.claim_next(b) == 2  # task 1 is held by a's claim
    assert store.skip(1, a)
    assert store.claim_next(a) is None  # task 2 is b's; a never sees task 1 again
    assert store.claim_next(b) == 2
    sub = check_ranking(3, [1, 2, 3], [5, 4, 3], [[], [], []])
    store.submit_ranking(2, b, sub)
    assert store.claim_next(b) == 1  # a's skip gave the slot back
    # A stale claim (past the lease) frees the slot for someone else; the original labeler may still submit.
    store.add_tasks(_tasks(3, overlap=1)[2:])
    assert store.claim_next(a) == 3
    with store.connect() as con:
        con.execute("UPDATE assignments SET assigned_at = assigned_at - ? WHERE task_id = 3",
                    (CLAIM_LEASE_SECONDS + 1,))
    c = store.add_user("c", PASSWORD).id
    assert store.claim_next(c) == 3
    assert store.submit_ranking(3, a, sub).status == "ok"
    assert store.submit_ranking(3, c, sub).status == "ok"


def test_submissions_are_checked_and_never_duplicated(store):
    store.add_tasks(_tasks(1, overlap=2) + _tasks(1, overlap=1, kind="demonstration"))
    a, b = store.add_user("a", PASSWORD).id, store.add_user("b", PASSWORD).id
    sub = check_ranking(3, [1, 2, 3], [5, 4, 3], [[], [], []])
    assert store.submit_ranking(1, a, sub).status == "not_assigned"  # not claimed
    assert store.claim_next(a) == 1
    assert store.submit_demonstration(1, a, "text").status == "not_assigned"  # wrong kind
    assert store.submit_ranking(1, b, sub).status == "not_assigned"  # someone else's claim
    assert store.submit_ranking(1, a, sub).status == "ok"
    assert store.submit_ranking(1, a, sub).status == "duplicate"
    with store.connect() as con:
        assert con.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 1
        with pytest.raises(sqlite3.IntegrityError):  # the constraint itself, below the application check
            con.execute("INSERT INTO submissions (task_id, user_id, created_at) VALUES (1, ?, 0)", (a,))
    assert store.assigned_task(1, a)[1] == "submitted"
    assert store.assigned_task(1, b) is None


def test_display_order_is_a_stable_shuffle():
    orders = {tuple(display_order(7, u, 4)) for u in range(20)}
    assert len(orders) > 1  # labelers see different orders
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert display_order(7, 3, 4) == display_order(7, 3, 4)


# ----------------------------------------------------------------------------------------------------------------
# Import and export


@pytest.mark.parametrize("line, field, message", [
    ("{not json", None, "malformed JSON"),
    ('{"text": "no prompt"}', "prompt", "missing"),
    ('{"prompt": ""}', "prompt", "empty"),
    ('{"prompt": "p", "responses": "abc"}', "responses", "list"),
    ('{"prompt": "p", "responses": ["only one"]}', "responses", "2..9"),
    ('{"prompt": "p", "responses": ["a", "  "]}', "responses[1]", "empty"),
    ('{"prompt": "p", "responses": ["a", 3]}', "responses[1]", "string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "expected one of"),
])
def test_bad_prompt_files_name_file_line_and_field(tmp_path, line, field, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(DataError) as err:
        read_prompts(path)
    assert err.value.file == path and err.value.line == 2 and err.value.field == field
    assert message in str(err.value) and "line 2" in str(err.value)


def test_import_kinds_and_dedup(tmp_path, store):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "write one"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"prompt": "rank these", "responses": ["x", "y", "z"]},
    ])
    s = import_prompts(store, path, overlap=2)
    assert (s.added, s.already_present) == (3, 0)
    assert import_prompts(store, path, overlap=2).added == 0  # every `serve` start re-imports: no duplicates
    kinds = [store.task(i).kind for i in (1, 2, 3)]
    assert kinds == ["demonstration", "demonstration", "ranking"]
    assert store.task(3).responses == ["x", "y", "z"] and store.task(3).source == "p.jsonl:3"
    with pytest.raises(DataError, match="--model"):
        import_prompts(store, path, tasks="ranking")  # a bare prompt cannot be ranked without a model
    ranked = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "rank these", "responses": ["x", "y", "z"]}])
    s = import_prompts(store, ranked, tasks="both")  # the ranking task exists; its demonstration task is new
    assert (s.added, s.already_present) == (1, 1) and store.task(4).kind == "demonstration"


def test_generated_outputs_in_batches_and_not_twice(tmp_path, store):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(5)])
    calls = []

    def fake(batch):
        calls.append(len(batch))
        # prompt 3 yields only one nonempty output: it cannot be ranked
        return [[f"{m[-1]['content']} / {j}" if not (m[-1]["content"] == "prompt 3" and j) else " "
                 for j in range(4)] for m in batch]

    s = import_prompts(store, path, generator=fake, model_id="tiny", k=4, batch_size=2)
    assert calls == [2, 2, 1]
    assert (s.added, s.generated, s.dropped) == (4, 4, 1)
    assert store.task(1).kind == "ranking" and store.task(1).responses[2] == "prompt 0 / 2"
    s = import_prompts(store, path, generator=fake, model_id="tiny", k=4, batch_size=2)
    assert calls == [2, 2, 1, 1] and s.added == 0  # only the dropped prompt is tried again
    assert generate_outputs([], fake) == []


def test_model_generator_wiring(monkeypatch):
    """model_generator goes through load_model, render_prompt and generate(n=K), a new seed per batch."""
    import types

    from instructgpt.labeling import outputs

    seen = []

    class Tok:
        chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"

        def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
            from jinja2 import Template

            return Template(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    def fake_generate(model, tokenizer, prompts, params):
        seen.append((list(prompts), params.n, params.seed, params.max_new_tokens))
        return [[types.SimpleNamespace(text=f"out{j}") for j in range(params.n)] for p in prompts]

    monkeypatch.setattr(outputs, "load_model", lambda d: ("model", Tok()))
    monkeypatch.setattr(outputs, "generate", fake_generate)
    gen = outputs.model_generator("some/dir", 3, max_new_tokens=16, seed=10)
    assert gen([[{"role": "user", "content": "hello"}]]) == [["out0", "out1", "out2"]]
    gen([[{"role": "user", "content": "again"}]])
    assert seen[0][0] == ["user: hello\nassistant:"] and seen[0][1] == 3 and seen[0][3] == 16
    assert seen[0][2] != seen[1][2]


def test_export_round_trip_through_the_loaders(tmp_path, store):
    conversation = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi <there>"}]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "demo prompt"},
        {"messages": conversation},
        {"prompt": "rank me", "responses": ["r0", "r1", "r2", "r3"]},
        {"messages": conversation, "responses": ["s0", "s1"]},
        {"prompt": "tie me", "responses": ["t0", "t1"]},
    ])
    import_prompts(store, path, overlap=2)
    a, b = store.add_user("ann", PASSWORD).id, store.add_user("bob", PASSWORD).id
    wanted = {3: [2, 1, 2, 3], 4: [2, 1], 5: [1, 1]}  # task 5: all tied
    for u in (a, b):
        assert len(rank_all(store, u, ranks_for=lambda t: wanted[t.id])) == 5
    # Flags and ratings travel too.
    s = export(store, str(tmp_path / "out"))
    assert (s.demonstrations, s.rankings, s.all_tied) == (4, 4, 2)

    demos = data.load_demonstrations(s.demonstrations_path)
    assert demos[0].messages == [{"role": "user", "content": "demo prompt"},
                                 {"role": "assistant", "content": "answer 1"}]
    assert demos[1].messages == conversation + [{"role": "assistant", "content": "answer 2"}]
    rows = read_jsonl(s.rankings_path)
    assert rows[0] == {"prompt": "rank me", "responses": ["r0", "r1", "r2", "r3"], "ranks": [2, 1, 2, 3],
                       "ratings": [4, 4, 4, 4], "flags": [[], [], [], []], "labeler": "ann"}
    rankings = data.load_comparisons(s.rankings_path)
    assert [(r.k, r.ranks, r.labeler) for r in rankings] == [(4, [2, 1, 2, 3], "ann"), (2, [2, 1], "ann"),
                                                             (4, [2, 1, 2, 3], "bob"), (2, [2, 1], "bob")]
    assert rankings[1].messages == conversation and rankings[1].ratings == [4, 4]


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_add_user_import_stats_export(tmp_path, capsys):
    db = str(tmp_path / "l.sqlite")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q"}])
    assert label_main(["add-user", "--db", db, "root", "--admin", "--password", PASSWORD]) == 0
    assert label_main(["add-user", "--db", db, "ann", "--password", PASSWORD]) == 0
    assert label_main(["add-user", "--db", db, "ann", "--password", PASSWORD]) == 2
    assert "already exists" in capsys.readouterr().err
    assert label_main(["import", "--db", db, "--prompts", prompts, "--overlap", "2"]) == 0
    assert "2 tasks added" in capsys.readouterr().err
    store = Store(db)
    ann = store.authenticate("ann", PASSWORD)
    assert store.authenticate("root", PASSWORD).is_admin and not ann.is_admin
    rank_all(store, ann.id, ranks_for=lambda t: [2, 1])
    assert label_main(["stats", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "submissions: 2 of 4 slots" in out and "ann" in out and "(disabled)" not in out
    assert label_main(["disable-user", "--db", db, "ann"]) == 0
    assert capsys.readouterr().out.strip() == "disabled ann; 0 open claims given back"
    assert Store(db).authenticate("ann", PASSWORD) is None
    assert label_main(["stats", "--db", db]) == 0
    assert "ann (disabled)" in capsys.readouterr().out
    assert label_main(["enable-user", "--db", db, "ann"]) == 0 and Store(db).authenticate("ann", PASSWORD) == ann
    assert label_main(["disable-user", "--db", db, "nobody"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    assert label_main(["export", "--db", db, "--out-dir", str(tmp_path / "out")]) == 0
    assert "1 demonstrations" in capsys.readouterr().out
    assert len(data.load_comparisons(str(tmp_path / "out" / "rankings.jsonl"))) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": 5}])
    assert label_main(["import", "--db", db, "--prompts", bad]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "'prompt'" in err


# ----------------------------------------------------------------------------------------------------------------
# Durability


def test_a_killed_writer_loses_nothing_it_acknowledged(tmp_path):
    """Kill -9 a process in the middle of a stream of submissions: every acknowledged one is in the database."""
    db = str(tmp_path / "crash.sqlite")
    store = Store(db)
    store.add_tasks(_tasks(2000, overlap=1, kind="demonstration"))
    uid = store.add_user("writer", PASSWORD).id
    script = textwrap.dedent(f"""
        import sys
        from instructgpt.labeling.store import Store
        store = Store({db!r})
        while True:
            task = store.claim_next({uid})
            assert store.submit_demonstration(task, {uid}, "x" * 2000).status == "ok"
            print(task, flush=True)  # acknowledged only after COMMIT returned
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    acked, deadline = [], time.monotonic() + 30
    try:
        while len(acked) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert len(acked) >= 40, "the writer did not get going"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in con.execute("SELECT task_id FROM submissions")}
        assert set(acked) <= stored
        # Anything half-written was rolled back: each stored submission has its matching assignment.
        assert con.execute("SELECT COUNT(*) FROM assignments WHERE submitted_at IS NOT NULL").fetchone()[0] == \
            len(stored)


def test_cli_import_generates_outputs_with_a_real_model(tmp_path, tiny_model_dir, capsys):
    """`--model DIR` samples K outputs per prompt with instructgpt's own generation, at import time."""
    db = str(tmp_path / "l.sqlite")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 2 plus 3"}, {"prompt": "spell cat"},
                                                 {"prompt": "given", "responses": ["x", "y"]}])
    args = ["import", "--db", db, "--prompts", prompts, "--model", tiny_model_dir, "--k", "3",
            "--max-new-tokens", "8", "--batch-size", "1"]
    assert label_main(args) == 0
    assert "2 prompts generated" in capsys.readouterr().err
    store = Store(db)
    tasks = [store.task(i) for i in range(1, 4)]
    assert [t.kind for t in tasks] == ["ranking"] * 3
    assert tasks[0].responses == ["x", "y"]  # imported outputs are kept as given
    for t in tasks[1:]:  # sampled: K = 3, less any empty sample
        assert 2 <= len(t.responses) <= 3 and all(r.strip() for r in t.responses)
    assert label_main(args) == 0  # restarting does not sample again
    assert "0 tasks added" in capsys.readouterr().err.splitlines()[-1]


def test_import_names_a_prompt_the_models_chat_template_refuses_before_sampling(tmp_path, tiny_model_dir, capsys,
                                                                                monkeypatch):
    """`--model DIR` whose chat template has no system role, and a prompt file whose second row has a system turn:
    the import exits 2 naming that file and line, before any prompt is sampled, and adds no task."""
    from instructgpt.labeling import outputs
    from instructgpt.modeling import load_model, save_model
    model, tok = load_model(tiny_model_dir)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    save_model(model, tok, str(tmp_path / "m"))
    sampled = []
    monkeypatch.setattr(outputs, "generate", lambda *a, **kw: sampled.append(a) or [])
    db = str(tmp_path / "l.sqlite")
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "add 2 plus 3"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "spell cat"}]}])
    args = ["import", "--db", db, "--prompts", prompts, "--model", str(tmp_path / "m"), "--k", "3", "--batch-size", "1"]
    assert label_main(args) == 2
    assert ("p.jsonl, line 2: field 'messages': the chat template refuses this conversation: System role not "
            "supported") in capsys.readouterr().err
    assert sampled == [] and Store(db).counts()["ranking_tasks"] == 0


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_exported_labels_train_the_next_stage(stage, tmp_path, tiny_model_dir):
    """The round trip: label, `instructgpt label export`, then `instructgpt sft` / `instructgpt rm` trains on it."""
    from instructgpt.cli import main as instructgpt_main

    rows = []
    for i in range(12):
        rows.append({"prompt": f"add {i} plus {i + 1}"})
        rows.append({"prompt": f"count letters in {'abcdefghij'[:i % 9 + 1]}",
                     "responses": [str(i % 9 + 1), "seven", f"{i} {i}", "the word"]})
    db = str(tmp_path / "l.sqlite")
    store = Store(db)
    import_prompts(store, write_jsonl(tmp_path / "p.jsonl", rows), overlap=2)
    for name in ("ann", "bob"):
        rank_all(store, store.add_user(name, PASSWORD).id, ranks_for=lambda t: [1, 3, 2, 4])
    out = tmp_path / "labels"
    assert label_main(["export", "--db", db, "--out-dir", str(out)]) == 0
    train_file = out / ("demonstrations.jsonl" if stage == "sft" else "rankings.jsonl")
    assert len(open(train_file).readlines()) == 24
    run_dir = tmp_path / stage
    rc = instructgpt_main([stage, f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}",
                           f"out_dir={run_dir}", "train.max_steps=2", "train.batch_size=4", "data.eval_size=4",
                           "train.eval_every=2", "train.save_every=0"])
    assert rc == 0
    assert (run_dir / "DONE.json").exists()


def test_cli_passwords_from_stdin_or_prompt(tmp_path, monkeypatch, capsys):
    import io

    from instructgpt.labeling import cli

    db = str(tmp_path / "l.sqlite")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert label_main(["add-user", "--db", db, "ann", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", type("Tty", (), {"isatty": lambda self: True})())
    answers = iter([PASSWORD, "a different one"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    assert label_main(["add-user", "--db", db, "bob"]) == 2
    assert "do not match" in capsys.readouterr().err
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: PASSWORD)
    assert label_main(["add-user", "--db", db, "bob", "--admin"]) == 0
    store = Store(db)
    assert store.authenticate("ann", PASSWORD) and store.authenticate("bob", PASSWORD).is_admin


def test_cli_serve_binds_loopback_and_warns_otherwise(tmp_path, monkeypatch, capsys):
    import uvicorn

    calls = []
    proxy = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: calls.append((app, host, port))
                        or proxy.append({k: kw.get(k) for k in ("proxy_headers", "forwarded_allow_ips")}))
    db = str(tmp_path / "l.sqlite")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    assert label_main(["serve", "--db", db, "--prompts", prompts]) == 0
    app, host, port = calls[-1]
    assert (host, port) == ("127.0.0.1", 8765)
    err = capsys.readouterr().err
    assert "1 tasks added" in err and "no users yet" in err and "WARNING" not in err
    assert Store(db).counts()["demonstration_tasks"] == 1
    assert label_main(["serve", "--db", db, "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1][1:] == ("0.0.0.0", 9000)
    assert "WARNING: binding 0.0.0.0, not loopback" in capsys.readouterr().err
    # forwarding headers are trusted from no one unless the proxies are named
    assert proxy == [{"proxy_headers": False, "forwarded_allow_ips": None}] * 2
    assert label_main(["serve", "--db", db, "--forwarded-allow-ips", "10.0.0.1"]) == 0
    assert proxy[-1] == {"proxy_headers": True, "forwarded_allow_ips": "10.0.0.1"}
    assert label_main(["serve", "--db", db, "--model", "some/dir"]) == 2  # a model without prompts


def test_the_built_in_suites_prompts_through_the_app(tmp_path, tiny_model_dir):
    """The default suite's prompts (cards span lines) imported with outputs, labeled with the gold labeler's own
    ratings and flags (the ids the app collects), exported, and read back as the RM reads rankings; outputs a model
    generates for them at import come back too."""
    import random

    from instructgpt import assistant, builtin, gold
    from instructgpt.data import load_comparisons
    from instructgpt.labeling.outputs import model_generator

    rows = list(builtin.rows("builtin:task-prompts?split=train&n=9&seed=4"))
    assert any("\nCard: " in r["prompt"] for r in rows)
    rng, sloppy = random.Random(0), assistant.DemoRates(miss=1, embellish=1, comply=1, rude=0.5, chatty=0.0)
    given = [{"prompt": r["prompt"], "responses": [assistant.reference_answer(r["prompt"]),
                                                   assistant.demonstrate(r["prompt"], rng, sloppy)]} for r in rows]
    db = str(tmp_path / "l.sqlite")
    store = Store(db)
    assert import_prompts(store, write_jsonl(tmp_path / "given.jsonl", given)).added == 9
    sampled = import_prompts(store, write_jsonl(tmp_path / "p.jsonl", rows[:3]),
                             generator=model_generator(tiny_model_dir, 3, max_new_tokens=8), k=3)
    assert sampled.generated == 3
    user = store.add_user("ann", PASSWORD).id
    while (task_id := store.claim_next(user)) is not None:
        task = store.task(task_id)
        prompt = task.messages[-1]["content"]
        assert prompt in [r["prompt"] for r in rows]  # the card's lines kept as written
        judged = [gold.judge(prompt, r) for r in task.responses]
        levels = sorted({j.rating for j in judged}, reverse=True)
        sub = check_ranking(len(judged), [levels.index(j.rating) + 1 for j in judged], [j.rating for j in judged],
                            [list(j.flags) for j in judged])
        assert store.submit_ranking(task_id, user, sub).status == "ok"
    out = tmp_path / "labels"
    assert label_main(["export", "--db", db, "--out-dir", str(out)]) == 0
    recs = load_comparisons(str(out / "rankings.jsonl"))
    assert len(recs) >= 9 and all(r.flags is not None and r.ratings for r in recs)
    for r in recs:  # what the labeler recorded is the gold labeler's verdict, flag for flag
        prompt = r.messages[-1]["content"]
        assert r.flags == [list(gold.judge(prompt, x).flags) for x in r.responses]
        assert r.ratings == [gold.judge(prompt, x).rating for x in r.responses]
