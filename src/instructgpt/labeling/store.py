"""SQLite storage for the labeling app: users, sessions, tasks, assignments and submissions.

Durability rules (the reason this module exists as it does):

* WAL journal with ``synchronous=FULL``: a committed submission survives a crash of the process or the machine.
* A fresh connection per call (so per request and per thread); ``busy_timeout`` makes concurrent writers wait their
  turn instead of failing.
* Every write that must be all-or-nothing (claiming a task, a submission) is one ``BEGIN IMMEDIATE`` transaction:
  the write lock is taken up front, so two labelers can never both see "capacity left" and overfill a task.
* ``UNIQUE(task_id, user_id)`` on submissions: a double click or a replayed POST cannot duplicate a submission.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from instructgpt.labeling import security
from instructgpt.labeling.rubric import RankingSubmission

SCHEMA_VERSION = 3  # 2: users.disabled; 3: login_failures
# A claimed task that is neither submitted nor skipped holds its slot this long; after that another labeler may take
# the slot (the first may still submit: one extra judgement, never a lost one).
CLAIM_LEASE_SECONDS = 2 * 3600
# Sessions end after this long without a request. last_seen is written at most every SESSION_TOUCH_SECONDS so that
# page views do not compete with submissions for the write lock.
SESSION_IDLE_SECONDS = 12 * 3600
SESSION_TOUCH_SECONDS = 300
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0  -- may not log in; what they submitted stays
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('demonstration', 'ranking')),
    messages TEXT NOT NULL,            -- JSON [{"role", "content"}, ...], ending with a user (or system) turn
    overlap INTEGER NOT NULL CHECK (overlap >= 1),
    source TEXT NOT NULL,              -- where it came from, e.g. "prompts.jsonl:12"
    origin TEXT NOT NULL,              -- "imported" or "model:DIR" for ranking outputs
    dedup_key TEXT NOT NULL UNIQUE,    -- importing the same file twice adds nothing
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (task_id, position)
);
CREATE TABLE IF NOT EXISTS assignments (
    task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    assigned_at REAL NOT NULL,
    submitted_at REAL,
    skipped_at REAL,
    PRIMARY KEY (task_id, user_id)     -- no labeler gets the same task twice
);
CREATE INDEX IF NOT EXISTS assignments_by_user ON assignments (user_id, submitted_at, skipped_at);
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    response TEXT,                     -- demonstration tasks
    ranks TEXT, ratings TEXT, flags TEXT,  -- ranking tasks: JSON lists indexed like responses.position
    seconds REAL,                      -- time from claim to submit
    created_at REAL NOT NULL,
    UNIQUE (task_id, user_id)
);
CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at REAL NOT NULL);  -- security.LoginThrottle's
CREATE INDEX IF NOT EXISTS login_failures_by_key ON login_failures (key, at);
"""


class StoreError(ValueError):
    """A request the store refuses (bad username, user exists, ...)."""


@dataclass(frozen=True)
class User:
    id: int
    username: str
    is_admin: bool
    disabled: bool = False


@dataclass(frozen=True)
class Session:
    user: User
    csrf_token: str


@dataclass(frozen=True)
class Task:
    id: int
    kind: str  # "demonstration" | "ranking"
    messages: list[dict[str, str]]
    responses: list[str]  # empty for demonstrations
    source: str


@dataclass(frozen=True)
class Progress:
    """One labeler's queue: what is done, skipped, claimed and still open to them."""

    done: int
    skipped: int
    claimed: int  # claimed, not yet submitted or skipped
    available: int  # unclaimed tasks that still need a labeler and that this labeler has not seen

    @property
    def total(self) -> int:
        return self.done + self.claimed + self.available


@dataclass(frozen=True)
class SubmitResult:
    status: str  # "ok" | "duplicate" | "not_assigned"
    submission_id: int | None = None


def display_order(task_id: int, user_id: int, k: int) -> list[int]:
    """The order in which one labeler sees a task's K outputs: shuffled per (task, labeler), stable across visits.

    Imported outputs often come in a meaningful order (e.g. best first); shuffling removes position bias.
    """
    order = list(range(k))
    random.Random(f"{task_id}:{user_id}").shuffle(order)
    return order


class Store:
    """The labeling database at `path` (created on first use)."""

    def __init__(self, path: str):
        self.path = str(path)
        with self.connect() as con:
            # WAL lets readers proceed while one writer commits; the setting is stored in the file.
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._migrate(con)

    @staticmethod
    def _migrate(con: sqlite3.Connection) -> None:
        """Bring a database made by an earlier version up to SCHEMA_VERSION (CREATE IF NOT EXISTS leaves an existing
        table as it was), under the write lock: two processes opening an old file do not both alter it."""
        con.execute("BEGIN IMMEDIATE")
        try:
            if "disabled" not in {r["name"] for r in con.execute("PRAGMA table_info(users)")}:  # version 1
                con.execute("ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0")
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    # ---------------------------------------------------------------------------------------------------------------
    # Connections

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh autocommit connection (no implicit transactions), closed on exit."""
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 30000")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit: submissions survive power loss
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any exception."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---------------------------------------------------------------------------------------------------------------
    # Users and sessions

    def add_user(self, username: str, password: str, *, is_admin: bool = False, update: bool = False) -> User:
        """Create a user (or, with `update`, reset an existing user's password and admin flag)."""
        if not USERNAME_RE.match(username):
            raise StoreError(f"invalid username {username!r}: use 1-64 letters, digits and _ . @ - "
                             "(starting with a letter or digit)")
        if len(password) < security.MIN_PASSWORD_LENGTH:
            raise StoreError(f"password too short: at least {security.MIN_PASSWORD_LENGTH} characters")
        pw_hash = security.hash_password(password)  # slow: computed outside the write lock
        with self.transaction() as con:
            row = con.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
            if row is not None and not update:
                raise StoreError(f"user {username!r} already exists (use --update to change the password)")
            if row is None:
                cur = con.execute("INSERT INTO users (username, password_hash, is_admin, created_at) VALUES (?,?,?,?)",
                                  (username, pw_hash, int(is_admin), time.time()))
                uid = cur.lastrowid
            else:
                uid = row["id"]
                con.execute("UPDATE users SET password_hash = ?, is_admin = ? WHERE id = ?",
                            (pw_hash, int(is_admin), uid))
                con.execute("DELETE FROM sessions WHERE user_id = ?", (uid,))  # a reset password ends old sessions
        return User(uid, username, is_admin)

    def authenticate(self, username: str, password: str) -> User | None:
        """The user when the password matches and the user is not disabled, else None (same cost whether or not the
        user exists)."""
        with self.connect() as con:
            row = con.execute("SELECT id, username, password_hash, is_admin, disabled FROM users WHERE username = ?",
                              (username,)).fetchone()
        ok = security.verify_password(password, row["password_hash"] if row else None)
        return User(row["id"], row["username"], bool(row["is_admin"])) if ok and row and not row["disabled"] else None

    def users(self) -> list[User]:
        with self.connect() as con:
            rows = con.execute("SELECT id, username, is_admin, disabled FROM users ORDER BY username").fetchall()
        return [User(r["id"], r["username"], bool(r["is_admin"]), bool(r["disabled"])) for r in rows]

    def set_disabled(self, username: str, disabled: bool) -> tuple[User, int]:
        """Disable (or enable again) a user. Disabling ends their sessions at once and gives their open claims back,
        so other labelers get those slots; their submissions stay in the data and in the exports. -> (user, claims
        given back)."""
        with self.transaction() as con:
            row = con.execute("SELECT id, is_admin FROM users WHERE username = ?", (username,)).fetchone()
            if row is None:
                raise StoreError(f"no user {username!r}")
            con.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), row["id"]))
            released = 0
            if disabled:
                con.execute("DELETE FROM sessions WHERE user_id = ?", (row["id"],))
                released = con.execute("DELETE FROM assignments WHERE user_id = ? AND submitted_at IS NULL "
                                       "AND skipped_at IS NULL", (row["id"],)).rowcount
        return User(row["id"], username, bool(row["is_admin"]), disabled), released

    def login_failures(self) -> StoredFailures:
        """Failed-login times in this database, for :class:`security.LoginThrottle`: a restart keeps the count."""
        return StoredFailures(self)

    def create_session(self, user_id: int) -> tuple[str, str]:
        """A new session for `user_id`: (token for the cookie, CSRF token for its forms)."""
        token, csrf = security.new_token(), security.new_token()
        now = time.time()
        with self.transaction() as con:
            con.execute("DELETE FROM sessions WHERE last_seen < ?", (now - SESSION_IDLE_SECONDS,))
            con.execute("INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, last_seen) "
                        "VALUES (?,?,?,?,?)", (security.token_digest(token), user_id, csrf, now, now))
        return token, csrf

    def session(self, token: str | None) -> Session | None:
        """The live session for a cookie token, or None."""
        if not token:
            return None
        digest, now = security.token_digest(token), time.time()
        with self.connect() as con:
            row = con.execute(
                "SELECT s.csrf_token, s.last_seen, u.id, u.username, u.is_admin FROM sessions s "
                "JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND u.disabled = 0", (digest,)).fetchone()
            if row is None or row["last_seen"] < now - SESSION_IDLE_SECONDS:
                return None
            if row["last_seen"] < now - SESSION_TOUCH_SECONDS:
                con.execute("UPDATE sessions SET last_seen = ? WHERE token_hash = ?", (now, digest))
        return Session(User(row["id"], row["username"], bool(row["is_admin"])), row["csrf_token"])

    def end_session(self, token: str) -> None:
        with self.connect() as con:
            con.execute("DELETE FROM sessions WHERE token_hash = ?", (security.token_digest(token),))

    # ---------------------------------------------------------------------------------------------------------------
    # Tasks

    def has_task(self, dedup_key: str) -> bool:
        with self.connect() as con:
            return con.execute("SELECT 1 FROM tasks WHERE dedup_key = ?", (dedup_key,)).fetchone() is not None

    def add_tasks(self, tasks: Sequence[dict]) -> int:
        """Insert tasks in one transaction; each dict has kind, messages, responses, overlap, source, origin,
        dedup_key. Tasks whose key is already present are left alone. Returns how many were added."""
        added, now = 0, time.time()
        with self.transaction() as con:
            for t in tasks:
                cur = con.execute(
                    "INSERT OR IGNORE INTO tasks (kind, messages, overlap, source, origin, dedup_key, created_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (t["kind"], json.dumps(t["messages"], ensure_ascii=False), int(t["overlap"]), t["source"],
                     t["origin"], t["dedup_key"], now))
                if cur.rowcount == 0:
                    continue
                added += 1
                con.executemany("INSERT INTO responses (task_id, position, text) VALUES (?,?,?)",
                                [(cur.lastrowid, i, text) for i, text in enumerate(t.get("responses") or [])])
        return added

    def task(self, task_id: int) -> Task | None:
        with self.connect() as con:
            return self._task(con, task_id)

    @staticmethod
    def _task(con: sqlite3.Connection, task_id: int) -> Task | None:
        row = con.execute("SELECT id, kind, messages, source FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        responses = [r["text"] for r in con.execute(
            "SELECT text FROM responses WHERE task_id = ? ORDER BY position", (task_id,))]
        return Task(row["id"], row["kind"], json.loads(row["messages"]), responses, row["source"])

    # Tasks still open to a user: not seen by them, and fewer live claims than the task's overlap. A claim is live
    # when submitted, or claimed within the lease and not skipped.
    _OPEN_TO_USER = """
        FROM tasks t
        WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.id AND a.user_id = :user)
          AND (SELECT COUNT(*) FROM assignments a
               WHERE a.task_id = t.id AND a.skipped_at IS NULL
                 AND (a.submitted_at IS NOT NULL OR a.assigned_at > :cutoff)) < t.overlap
    """

    def claim_next(self, user_id: int) -> int | None:
        """The task this user should work on now: their oldest open claim, else a newly claimed one, else None."""
        now = time.time()
        with self.transaction() as con:
            row = con.execute("SELECT task_id FROM assignments WHERE user_id = ? AND submitted_at IS NULL "
                              "AND skipped_at IS NULL ORDER BY assigned_at, task_id LIMIT 1", (user_id,)).fetchone()
            if row is not None:
                return row["task_id"]
            # Lowest id first: overlapping labelers work through the same tasks early, so agreement shows up soon.
            row = con.execute("SELECT t.id " + self._OPEN_TO_USER + " ORDER BY t.id LIMIT 1",
                              {"user": user_id, "cutoff": now - CLAIM_LEASE_SECONDS}).fetchone()
            if row is None:
                return None
            con.execute("INSERT INTO assignments (task_id, user_id, assigned_at) VALUES (?,?,?)",
                        (row["id"], user_id, now))
            return row["id"]

    def assigned_task(self, task_id: int, user_id: int) -> tuple[Task, str] | None:
        """(task, state) when `task_id` is in this user's queue (state "open", "submitted" or "skipped"), else None.

        This is the access check: a labeler can only ever read tasks that were assigned to them.
        """
        with self.connect() as con:
            row = con.execute("SELECT submitted_at, skipped_at FROM assignments WHERE task_id = ? AND user_id = ?",
                              (task_id, user_id)).fetchone()
            if row is None:
                return None
            state = "submitted" if row["submitted_at"] else "skipped" if row["skipped_at"] else "open"
            task = self._task(con, task_id)
        return (task, state) if task else None

    def progress(self, user_id: int) -> Progress:
        with self.connect() as con:
            row = con.execute(
                "SELECT COUNT(submitted_at) AS done, COUNT(skipped_at) AS skipped, "
                "SUM(submitted_at IS NULL AND skipped_at IS NULL) AS claimed FROM assignments WHERE user_id = ?",
                (user_id,)).fetchone()
            available = con.execute("SELECT COUNT(*) " + self._OPEN_TO_USER,
                                    {"user": user_id, "cutoff": time.time() - CLAIM_LEASE_SECONDS}).fetchone()[0]
        return Progress(row["done"], row["skipped"], row["claimed"] or 0, available)

    # ---------------------------------------------------------------------------------------------------------------
    # Submissions

    def _submit(self, task_id: int, user_id: int, kind: str, values: dict) -> SubmitResult:
        now = time.time()
        with self.transaction() as con:
            row = con.execute("SELECT a.assigned_at, a.submitted_at, a.skipped_at, t.kind FROM assignments a "
                              "JOIN tasks t ON t.id = a.task_id WHERE a.task_id = ? AND a.user_id = ?",
                              (task_id, user_id)).fetchone()
            if row is None or row["kind"] != kind or row["skipped_at"] is not None:
                return SubmitResult("not_assigned")
            if row["submitted_at"] is not None:
                return SubmitResult("duplicate")
            try:
                cur = con.execute(
                    "INSERT INTO submissions (task_id, user_id, response, ranks, ratings, flags, seconds, created_at) "
                    "VALUES (:task, :user, :response, :ranks, :ratings, :flags, :seconds, :now)",
                    {"task": task_id, "user": user_id, "seconds": now - row["assigned_at"], "now": now,
                     "response": None, "ranks": None, "ratings": None, "flags": None, **values})
            except sqlite3.IntegrityError:  # unreachable under the lock; the constraint is the last line of defence
                return SubmitResult("duplicate")
            con.execute("UPDATE assignments SET submitted_at = ? WHERE task_id = ? AND user_id = ?",
                        (now, task_id, user_id))
            return SubmitResult("ok", cur.lastrowid)

    def submit_demonstration(self, task_id: int, user_id: int, text: str) -> SubmitResult:
        """Store a demonstration (already validated by :func:`rubric.check_demonstration`)."""
        return self._submit(task_id, user_id, "demonstration", {"response": text})

    def submit_ranking(self, task_id: int, user_id: int, sub: RankingSubmission) -> SubmitResult:
        """Store a ranking (already validated by :func:`rubric.check_ranking`)."""
        task = self.task(task_id)
        if task is None or len(task.responses) != len(sub.ranks):
            return SubmitResult("not_assigned")
        return self._submit(task_id, user_id, "ranking", {
            "ranks": json.dumps(sub.ranks), "ratings": json.dumps(sub.ratings), "flags": json.dumps(sub.flags)})

    def skip(self, task_id: int, user_id: int) -> bool:
        """Give an open claim back (the slot goes to another labeler; this one never sees the task again)."""
        with self.transaction() as con:
            cur = con.execute("UPDATE assignments SET skipped_at = ? WHERE task_id = ? AND user_id = ? "
                              "AND submitted_at IS NULL AND skipped_at IS NULL", (time.time(), task_id, user_id))
            return cur.rowcount == 1

    # ---------------------------------------------------------------------------------------------------------------
    # Reading results (admin page, agreement, export)

    def counts(self) -> dict[str, int]:
        with self.connect() as con:
            row = con.execute(
                "SELECT (SELECT COUNT(*) FROM tasks WHERE kind = 'demonstration') AS demonstration_tasks, "
                "(SELECT COUNT(*) FROM tasks WHERE kind = 'ranking') AS ranking_tasks, "
                "(SELECT COALESCE(SUM(overlap), 0) FROM tasks) AS slots, "
                "(SELECT COUNT(*) FROM submissions) AS submissions, "
                "(SELECT COUNT(*) FROM users) AS users").fetchone()
        return dict(row)

    def labeler_rows(self) -> list[dict]:
        """Per user: submissions by kind, skips, open claims, median seconds per task, last activity, disabled."""
        with self.connect() as con:
            rows = con.execute("""
                SELECT u.id, u.username, u.is_admin, u.disabled,
                       (SELECT COUNT(*) FROM submissions s JOIN tasks t ON t.id = s.task_id
                        WHERE s.user_id = u.id AND t.kind = 'demonstration') AS demonstrations,
                       (SELECT COUNT(*) FROM submissions s JOIN tasks t ON t.id = s.task_id
                        WHERE s.user_id = u.id AND t.kind = 'ranking') AS rankings,
                       (SELECT COUNT(*) FROM assignments a WHERE a.user_id = u.id AND a.skipped_at IS NOT NULL)
                           AS skipped,
                       (SELECT COUNT(*) FROM assignments a WHERE a.user_id = u.id
                        AND a.submitted_at IS NULL AND a.skipped_at IS NULL) AS claimed,
                       (SELECT MAX(created_at) FROM submissions s WHERE s.user_id = u.id) AS last_submit
                FROM users u ORDER BY u.username""").fetchall()
            out = []
            for r in rows:
                secs = sorted(x[0] for x in con.execute("SELECT seconds FROM submissions WHERE user_id = ?",
                                                        (r["id"],)))
                d = dict(r)
                d["median_seconds"] = secs[len(secs) // 2] if secs else None
                out.append(d)
        return out

    def rankings_by_task(self) -> dict[int, dict[str, list[int]]]:
        """{task id: {username: ranks}} over every ranking submission."""
        out: dict[int, dict[str, list[int]]] = {}
        with self.connect() as con:
            for r in con.execute("SELECT s.task_id, u.username, s.ranks FROM submissions s "
                                 "JOIN users u ON u.id = s.user_id WHERE s.ranks IS NOT NULL"):
                out.setdefault(r["task_id"], {})[r["username"]] = json.loads(r["ranks"])
        return out

    def iter_submissions(self) -> Iterator[dict]:
        """Every submission with its task, in submission order: kind, messages, responses, labeler, and the
        judgement (response, or ranks/ratings/flags)."""
        with self.connect() as con:
            rows = con.execute("SELECT s.id, s.task_id, s.response, s.ranks, s.ratings, s.flags, s.created_at, "
                               "u.username, t.kind, t.messages FROM submissions s JOIN users u ON u.id = s.user_id "
                               "JOIN tasks t ON t.id = s.task_id ORDER BY s.id").fetchall()
            responses: dict[int, list[str]] = {}
            for r in con.execute("SELECT task_id, text FROM responses ORDER BY task_id, position"):
                responses.setdefault(r["task_id"], []).append(r["text"])
        for r in rows:
            yield {
                "id": r["id"], "task_id": r["task_id"], "kind": r["kind"], "labeler": r["username"],
                "messages": json.loads(r["messages"]), "responses": responses.get(r["task_id"], []),
                "response": r["response"],
                "ranks": json.loads(r["ranks"]) if r["ranks"] else None,
                "ratings": json.loads(r["ratings"]) if r["ratings"] else None,
                "flags": json.loads(r["flags"]) if r["flags"] else None,
                "created_at": r["created_at"],
            }


class StoredFailures:
    """:class:`security.MemoryFailures`' interface over the `login_failures` table."""

    def __init__(self, store: Store):
        self.store = store

    def times(self, key: str, since: float) -> list[float]:
        with self.store.connect() as con:
            return [r["at"] for r in con.execute("SELECT at FROM login_failures WHERE key = ? AND at > ?",
                                                 (key, since))]

    def add(self, keys: list[str], at: float, forget_before: float) -> None:
        with self.store.transaction() as con:
            con.execute("DELETE FROM login_failures WHERE at <= ?", (forget_before,))
            con.executemany("INSERT INTO login_failures (key, at) VALUES (?, ?)", [(k, at) for k in keys])

    def clear(self, key: str) -> None:
        with self.store.transaction() as con:
            con.execute("DELETE FROM login_failures WHERE key = ?", (key,))

    def count(self) -> int:
        with self.store.connect() as con:
            return con.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0]
