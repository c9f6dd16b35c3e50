"""Access control and audit for the API server: hashed API keys, per-key rate limits, PII redaction, the audit log.

Only standard-library primitives. API keys are random secrets, so a plain SHA-256 digest is what we keep (no slow
hash needed, as with the labeling app's session tokens); a presented key is hashed and compared with every stored
digest in constant time, so neither timing nor an early exit tells which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Optional

MIN_KEY_LENGTH = 16  # a guessable key would make the constant-time comparison pointless
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
ENV_KEYS = "INSTRUCTGPT_API_KEYS"


class KeySourceError(ValueError):
    """A bad API-key source (the message names the file/line or the variable)."""


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_key_line(line: str) -> tuple[Optional[str], str]:
    """``name:key`` or ``key`` -> (name or None, key). A key containing ':' must be given a name."""
    name, sep, key = line.partition(":")
    if sep and KEY_NAME_RE.match(name):
        return name, key
    return None, line


@dataclass
class KeyStore:
    """key id -> SHA-256 digest of the key. Key ids (the name, or ``key-`` + 8 hex of the digest) go in the audit log;
    the keys themselves are never kept."""

    digests: dict[str, bytes] = field(default_factory=dict)

    def add(self, key: str, name: Optional[str], where: str) -> None:
        if len(key) < MIN_KEY_LENGTH:
            raise KeySourceError(f"{where}: key too short (at least {MIN_KEY_LENGTH} characters)")
        digest = key_digest(key)
        key_id = name or f"key-{digest.hex()[:8]}"
        if key_id in self.digests:
            raise KeySourceError(f"{where}: duplicate key name {key_id!r}")
        if any(hmac.compare_digest(digest, d) for d in self.digests.values()):
            raise KeySourceError(f"{where}: the same key appears twice")
        self.digests[key_id] = digest

    def identify(self, presented: Optional[str]) -> Optional[str]:
        """The key id whose key equals `presented`, or None. Every stored digest is compared (no early exit)."""
        if not presented:
            return None
        digest = key_digest(presented)
        found = None
        for key_id, stored in self.digests.items():
            if hmac.compare_digest(digest, stored):
                found = key_id
        return found

    def __len__(self) -> int:
        return len(self.digests)


def load_api_keys(path: Optional[str], env_value: Optional[str]) -> Optional[KeyStore]:
    """Keys from a file (one per line, optionally ``name:key``; blank lines and ``#`` comments skipped) and/or the
    comma-separated environment variable; None when neither source is given."""
    if not path and not env_value:
        return None
    store = KeyStore()
    if path:
        try:
            with open(path, "rb") as fh:
                raw_bytes = fh.read()
        except OSError as e:
            raise KeySourceError(f"{path}: cannot read the API key file ({e.strerror})") from e
        if raw_bytes.startswith(b"\xef\xbb\xbf"):  # a byte order mark (some Windows editors) would open the first name
            raw_bytes = raw_bytes[3:]
        try:
            lines = raw_bytes.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            before = raw_bytes[:e.start].decode("utf-8", "replace")
            line = len((before + "x").splitlines())  # numbered as the lines below are
            raise KeySourceError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x}; save the "
                                 f"file as UTF-8)") from None
        for i, raw in enumerate(lines, 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                name, key = parse_key_line(line)
                store.add(key, name, f"{path}, line {i}")
    if env_value:
        for i, item in enumerate(env_value.split(","), 1):
            item = item.strip()
            if item:
                name, key = parse_key_line(item)
                store.add(key, name, f"{ENV_KEYS}, item {i}")
    if not len(store):
        sources = " and ".join(s for s in (path, ENV_KEYS if env_value else None) if s)
        raise KeySourceError(f"{sources}: an API key source was given but holds no keys")
    return store


class ReloadingKeys:
    """The keys of ``--api-keys FILE`` (with the environment's), read again whenever the file changes (its mtime, size
    or inode, checked on every request: one ``stat``). A key deleted from the file stops working at the next request
    and a key added starts, with no restart. A file that no longer reads (missing, a bad line, no keys) leaves the
    keys as they were, with one message on stderr per change: a half-written file never opens or closes the server.
    """

    def __init__(self, path: str, env_value: Optional[str] = None, log: Callable[[str], None] | None = None):
        self.path, self.env_value = path, env_value
        self.log = log or (lambda msg: print(f"instructgpt serve: {msg}", file=sys.stderr, flush=True))
        self._signature = self._stat()
        self.keys: KeyStore = load_api_keys(path, env_value)  # a bad file at start-up is an error
        self._lock = threading.Lock()

    def _stat(self) -> Optional[tuple[int, int, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> KeyStore:
        signature = self._stat()
        if signature != self._signature:
            with self._lock:
                if signature != self._signature:
                    self._signature = signature
                    try:
                        self.keys = load_api_keys(self.path, self.env_value)
                        self.log(f"{self.path} changed: {len(self.keys)} API key(s) now")
                    except KeySourceError as e:
                        self.log(f"error: {e}; keeping the {len(self.keys)} API key(s) loaded before")
        return self.keys

    def identify(self, presented: Optional[str]) -> Optional[str]:
        return self.current().identify(presented)

    def __len__(self) -> int:
        return len(self.current())


def api_keys(path: Optional[str], env_value: Optional[str]) -> KeyStore | ReloadingKeys | None:
    """The server's key source: a key file is watched for changes (:class:`ReloadingKeys`); keys from the
    environment alone are fixed for the process's life; None when neither is given."""
    return ReloadingKeys(path, env_value) if path else load_api_keys(None, env_value)


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------------------------
# Rate limits


class RateLimiter:
    """A token bucket per key id: `per_minute` requests a minute, bursts of up to `per_minute`.

    `allow` returns (allowed, seconds until the next request would be allowed). `clock` is injectable for tests.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = float(per_minute)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def allow(self, key_id: str) -> tuple[bool, float]:
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return True, 0.0
            self._buckets[key_id] = (tokens, now)
            return False, (1.0 - tokens) / self.rate


# --------------------------------------------------------------------------------------------------------------------
# Redaction and the audit log

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally in groups separated by single spaces or dashes (card-like; no Luhn check: redact more)
CARD_RE = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,18}(?![\d])")
# an optional +country code and (area code), then 2-4 digit groups with optional single separators; 7-15 digits
PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)")


def _phone_or_keep(m: re.Match) -> str:
    digits = sum(c.isdigit() for c in m.group(0))
    return "[PHONE]" if 7 <= digits <= 15 else m.group(0)


def redact(text: str) -> str:
    """Replace emails, card-like numbers and phone numbers with [EMAIL], [CARD], [PHONE] (in that order)."""
    text = EMAIL_RE.sub("[EMAIL]", text)
    text = CARD_RE.sub("[CARD]", text)
    return PHONE_RE.sub(_phone_or_keep, text)


def redact_value(value):
    """`redact` applied to every string inside lists/dicts."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


TEXT_FIELDS = ("prompt", "completions", "error")  # the fields that can carry client text: always redacted


class AuditLog:
    """Append-only JSONL, one record per request: time, key id, endpoint, status, token counts, latency.

    Text fields (`TEXT_FIELDS`) are redacted before writing. The file is created owner-readable only (0600).
    """

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def write(self, record: Mapping) -> None:
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        row.update({k: (redact_value(v) if k in TEXT_FIELDS else v) for k, v in record.items()})
        line = json.dumps(row, ensure_ascii=False)
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._fh.close()
