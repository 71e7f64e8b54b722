"""Who may call, on which port, and how much: API keys, the operator/API port split, and per-caller limits.

- **Ports.** The operator endpoints (``/metrics``; ``/docs`` and ``/openapi.json`` when docs are on) answer
  only on the operator port, everything else only on the API port, so a client of the API cannot read
  the per-member counters (``magnet_pool_selections_total``) that would tell it which pool member
  answered it. The split is decided by the local port each request came in on (``scope["server"]``), so
  one application serves both sockets, in every worker.
- **Keys.** With keys configured, every API request needs one (``Authorization: Bearer <key>`` or
  ``X-API-Key: <key>``); health probes stay open. The caller ("principal") is the key's id; without keys
  it is the client's address.
- **Limits.** Per principal, in each worker: requests per window (off by default) and rejected inputs
  per window. A caller whose inputs keep being rejected is probing or attacking, so it is throttled with
  429 and ``Retry-After`` until its window has room again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict, deque
from pathlib import Path

from service.errors import MagnetError, error_response
from service.settings import Settings

log = logging.getLogger("magnet.access")

OPERATOR_PATHS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
OPEN_PATHS = ("/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
MIN_KEY_CHARS = 16


class Unauthorized(MagnetError):
    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="magnet"'}


class Throttled(MagnetError):
    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}


class ConfigError(ValueError):
    """A setting the gateway cannot start with (a malformed key list or file, say)."""


def parse_keys(text: str, source: str) -> dict[str, str]:
    """``id:key`` entries, separated by commas or new lines (``#`` starts a comment); id -> key."""
    keys: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",")]
    for n, entry in enumerate((e for e in entries if e), 1):
        key_id, sep, key = (part.strip() for part in entry.partition(":"))
        if not sep or not key_id or not key:
            raise ConfigError(f"{source}, entry {n}: expected 'id:key'")
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"{source}: key {key_id!r} is shorter than {MIN_KEY_CHARS} characters")
        if key_id in keys:
            raise ConfigError(f"{source}: key id {key_id!r} appears twice")
        keys[key_id] = key
    return keys


class ApiKeys:
    """The configured keys, held as SHA-256 digests; ``identify`` compares a presented key with every
    digest in constant time per digest, so timing tells nothing about which key was close."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._digests = [(key_id, hashlib.sha256(key.encode()).digest()) for key_id, key in keys.items()]

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ApiKeys | None":
        keys: dict[str, str] = {}
        if settings.api_keys is not None:
            keys.update(parse_keys(settings.api_keys.get_secret_value(), "MAGNET_API_KEYS"))
        if settings.api_key_file is not None:
            try:
                text = Path(settings.api_key_file).read_text()
            except OSError as e:
                raise ConfigError(f"MAGNET_API_KEY_FILE {settings.api_key_file}: {e.strerror}") from e
            for key_id, key in parse_keys(text, str(settings.api_key_file)).items():
                if key_id in keys:
                    raise ConfigError(f"key id {key_id!r} is in both MAGNET_API_KEYS and {settings.api_key_file}")
                keys[key_id] = key
        return cls(keys) if keys else None

    def identify(self, presented: str | None) -> str | None:
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key_id, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                found = key_id
        return found


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() if key else None


class AccessGuard:
    """ASGI middleware: the port split, then the key check; puts the principal in ``scope["state"]``."""

    def __init__(self, app, settings: Settings, keys: ApiKeys | None, metrics) -> None:
        self.app = app
        self.max_in_flight = settings.max_in_flight
        self.in_flight = 0
        self.operator_port = settings.operator_port
        self.shared = settings.operator_port == settings.port
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        on_operator = (scope.get("server") or (None, None))[1] == self.operator_port
        if path in OPERATOR_PATHS:
            if not on_operator:
                return await error_response(404, "not found")(scope, receive, send)
            return await self.app(scope, receive, send)
        if on_operator and not self.shared:
            return await error_response(404, "not found: the operator port serves /metrics only")(scope, receive, send)
        if self.keys is None:
            client = scope.get("client")
            principal = f"addr:{client[0]}" if client else "addr:unknown"
        elif path in OPEN_PATHS:
            principal = None
        else:
            principal = self.keys.identify(presented_key(dict(scope["headers"])))
            if principal is None:
                self.metrics.requests.labels("unauthorized").inc()
                failure = Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
                return await error_response(401, failure.message, failure.headers)(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        if path in OPEN_PATHS:  # probes never wait behind the work, nor count towards it
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:  # shed at once rather than queue without bound
            self.metrics.requests.labels("overloaded").inc()
            return await error_response(503, f"overloaded: {self.in_flight} requests in progress; retry shortly",
                                        {"Retry-After": "1"})(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class Window:
    """Events per principal in a sliding window of ``seconds``: at most ``limit`` of them. Tracks at
    most ``max_principals`` callers (the least recently seen are forgotten), so many addresses cannot
    grow it without bound."""

    def __init__(self, limit: int, seconds: float, max_principals: int = 100_000) -> None:
        self.limit, self.seconds, self.max_principals = limit, seconds, max_principals
        # principal -> (its events, oldest first; their total), so a check costs no sum over the window
        self._events: OrderedDict[str, tuple[deque[tuple[float, int]], list[int]]] = OrderedDict()

    def _trimmed(self, principal: str, now: float) -> tuple[deque[tuple[float, int]], list[int]]:
        entry = self._events.get(principal)
        if entry is None:
            entry = self._events[principal] = (deque(), [0])
            while len(self._events) > self.max_principals:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(principal)
        events, total = entry
        while events and events[0][0] <= now - self.seconds:
            total[0] -= events.popleft()[1]
        return entry

    def retry_after(self, principal: str, now: float | None = None) -> float:
        """Seconds until ``principal`` is under its limit again (0: it is now)."""
        now = time.monotonic() if now is None else now
        events, (total,) = self._trimmed(principal, now)
        if total < self.limit:
            return 0.0
        for t, n in events:  # the window frees up as the oldest events age out
            total -= n
            if total < self.limit:
                return t + self.seconds - now
        return self.seconds

    def add(self, principal: str, count: int = 1, now: float | None = None) -> None:
        if count > 0:
            now = time.monotonic() if now is None else now
            events, total = self._trimmed(principal, now)
            events.append((now, count))
            total[0] += count


class Limits:
    """The two per-principal limits of one worker process."""

    def __init__(self, settings: Settings, metrics) -> None:
        rate, rejections = settings.window("rate_limit"), settings.window("rejection_limit")
        self.requests = Window(*rate) if rate else None
        self.rejections = Window(*rejections) if rejections else None
        self.metrics = metrics
        self._logged: dict[str, float] = {}

    def check(self, principal: str | None) -> None:
        """Raise Throttled when ``principal`` is over a limit; else count its request."""
        if principal is None:
            return
        now = time.monotonic()
        for reason, window in (("rejections", self.rejections), ("requests", self.requests)):
            if window is None:
                continue
            wait = window.retry_after(principal, now)
            if wait > 0:
                self.metrics.throttled.labels(reason).inc()
                if self._logged.get(principal, 0) < now - window.seconds:  # once per window per caller
                    self._logged[principal] = now
                    log.warning("throttling %s: over its %s limit (%d in %g s); retry in %.0f s",
                                principal, reason, window.limit, window.seconds, wait)
                raise Throttled(f"too many {'rejected inputs' if reason == 'rejections' else 'requests'}; "
                                f"retry in {math.ceil(wait)} s", wait)
        if self.requests is not None:
            self.requests.add(principal, 1, now)

    def rejected(self, principal: str | None, count: int) -> None:
        if principal is not None and self.rejections is not None:
            self.rejections.add(principal, count)
