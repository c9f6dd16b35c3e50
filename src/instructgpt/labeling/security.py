"""Passwords and tokens: scrypt with a per-user salt, constant-time comparisons, random session/CSRF tokens, and a
throttle on failed logins.

Only standard-library primitives: ``hashlib.scrypt`` is a memory-hard "slow hash" (RFC 7914), so a stolen database
does not give away passwords cheaply. Session tokens are stored hashed, so the database does not give away live
sessions either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from typing import Callable

# scrypt cost: N=2^14, r=8 takes ~16 MiB and tens of milliseconds per check, the common interactive-login setting.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024
MIN_PASSWORD_LENGTH = 8


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$hash`` for `password` with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


# A well-formed hash of a random password: checking an unknown username against it costs the same time as checking
# a real one, so response times do not reveal which usernames exist.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: str | None) -> bool:
    """True when `password` matches `stored` (a :func:`hash_password` string); None checks against a dummy."""
    real = stored is not None
    try:
        scheme, n, r, p, salt, digest = (stored or _DUMMY_HASH).split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected) and real


def new_token() -> str:
    """A 256-bit random token, URL-safe."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database keeps for a session token (SHA-256: tokens are random, so no salt or slow hash needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two tokens; missing tokens never match."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# Failed logins allowed per account, and per client address, within LOGIN_WINDOW_SECONDS; past that, logins for that
# account (or from that address) are refused, without checking the password, until the oldest failure leaves the
# window. scrypt makes each guess cost tens of milliseconds; this caps an online guesser at a few a minute.
LOGIN_FAILURES_PER_ACCOUNT = 5
LOGIN_FAILURES_PER_ADDRESS = 20
LOGIN_WINDOW_SECONDS = 15 * 60


class MemoryFailures:
    """Failed-login times per key, in this process: forgotten on restart (`Store.login_failures()` persists them)."""

    def __init__(self):
        self._times: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def times(self, key: str, since: float) -> list[float]:
        with self._lock:
            return [t for t in self._times.get(key, ()) if t > since]

    def add(self, keys: list[str], at: float, forget_before: float) -> None:
        """Record a failure for each key, and forget every failure at or before `forget_before`."""
        with self._lock:
            for key in list(self._times):
                q = self._times[key]
                while q and q[0] <= forget_before:
                    q.popleft()
                if not q:
                    del self._times[key]  # idle keys go: memory stays bounded by recent failures
            for key in keys:
                self._times.setdefault(key, deque()).append(at)

    def clear(self, key: str) -> None:
        with self._lock:
            self._times.pop(key, None)

    def count(self) -> int:
        with self._lock:
            return sum(map(len, self._times.values()))


class LoginThrottle:
    """Failed logins in a sliding window, per key ("user:alice", "addr:10.0.0.7").

    `wait(keys)` is the seconds until every key is under its limit (0: go ahead); `failed(keys)` records a failure;
    `succeeded(key)` forgets an account's failures. `failures` keeps the times: in memory by default, in the labeling
    database with `Store.login_failures()` (what the app uses, so a restart does not reset the count). Wall-clock
    time, since stored times must outlive the process; `clock` is injectable for tests.
    """

    def __init__(self, limits: dict[str, int] | None = None, window: float = LOGIN_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.time, failures=None):
        self.limits = limits or {"user": LOGIN_FAILURES_PER_ACCOUNT, "addr": LOGIN_FAILURES_PER_ADDRESS}
        self.window, self.clock = window, clock
        self.failures = failures if failures is not None else MemoryFailures()

    def wait(self, keys: list[str]) -> float:
        now, out = self.clock(), 0.0
        for key in keys:
            times = self.failures.times(key, now - self.window)
            if len(times) >= self.limits[key.split(":", 1)[0]]:
                out = max(out, min(times) + self.window - now)
        return out

    def failed(self, keys: list[str]) -> None:
        now = self.clock()
        self.failures.add(keys, now, now - self.window)

    def succeeded(self, key: str) -> None:
        self.failures.clear(key)
