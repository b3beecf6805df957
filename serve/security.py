"""What stands between the network and the app: keys, browsers, error shapes (docs/security.md).

`Guard` is one ASGI middleware around the Starlette app; per request, in order:

    errors     any exception below it becomes a 500 in OpenAI's error shape, logged once
               (the traceback only at debug level); every response is counted by route and status
    Host       refused (400) unless it names this server: an IP literal, localhost, this machine's
               host name, or a name the operator allowed; a DNS-rebinding page sends its own name
    Origin     a cross-origin browser request is refused (403) unless the operator named its origin
               (CORS is off by default); preflights for named origins are answered here
    keys       with API keys set, /v1/* and /metrics (unless opened) need `Authorization: Bearer
               KEY`, compared in constant time; 401 in OpenAI's shape otherwise. /health and the
               page stay open. The key's digest names the request's tenant (caches are per tenant)
    body type  a POST must say `Content-Type: application/json` (415): a page on another origin
               cannot send that without a preflight, which is refused above
    headers    nosniff, no referrer, no framing, and a Content-Security-Policy on every response

`LogCap` keeps any one log line short, whatever a request put in it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .openai_api import ApiError, scrub

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENV_KEY = "NANOVLM_API_KEY"
LOCAL_NAMES = ("localhost", "localhost.localdomain")
# what every response says: no sniffing, no referrer, no framing, and (for anything but the page,
# which sets its own) no active content at all
BASE_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
API_CSP = b"default-src 'none'; frame-ancestors 'none'"


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """OpenAI's error shape, as bytes."""
    return json.dumps(ApiError(status, message, code=code).body()).encode()


def read_key_file(path: str) -> list[str]:
    """Keys from a file, one a line; blank lines and lines starting with # are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({type(e).__name__})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: holds no key")
    return keys


def tenant_of(key: str) -> str:
    """A key's tenant id: a digest, never the key itself (it reaches caches and logs)."""
    return hashlib.blake2b(key.encode(), digest_size=8, person=b"nanovlm-tenant").hexdigest()


@dataclass(frozen=True)
class SecurityPolicy:
    """The operator's choices; the server's flags set these."""

    api_keys: tuple[str, ...] = ()  # none: no authentication (a warning off loopback)
    allowed_hosts: tuple[str, ...] = ()  # Host names allowed beyond the defaults; "*": any
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API; "*": any
    open_metrics: bool = False  # /metrics without a key

    def __post_init__(self) -> None:
        for key in self.api_keys:
            if not key or key != key.strip() or any(ord(c) < 33 or ord(c) > 126 for c in key):
                raise ValueError("an API key must be printable ASCII without spaces, and not empty")
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"--cors-origin {origin!r}: expected scheme://host[:port], e.g. http://kiosk.lan"
                )

    @classmethod
    def from_options(
        cls,
        keys: Iterable[str] = (),
        key_file: str | None = None,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        open_metrics: bool = False,
        environ: dict[str, str] | None = None,
    ) -> SecurityPolicy:
        """Keys from flags, a file and NANOVLM_API_KEY together."""
        found = list(keys)
        if key_file:
            found += read_key_file(key_file)
        env = (os.environ if environ is None else environ).get(ENV_KEY, "").strip()
        if env:
            found.append(env)
        return cls(
            tuple(dict.fromkeys(found)),
            tuple(h.lower() for h in allowed_hosts),
            tuple(o.rstrip("/").lower() for o in cors_origins),
            open_metrics,
        )


# ----------------------------------------------------------------------------- the checks


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port, lower case ('[::1]:8000' -> '::1')."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def machine_names() -> set[str]:
    """This machine's own names: what a client on the LAN may put in Host besides an address."""
    names = set(LOCAL_NAMES)
    try:
        hostname = socket.gethostname().lower()
        names |= {hostname, hostname + ".local", hostname.split(".")[0]}
    except OSError:
        pass
    return names


class KeyRing:
    """Bearer keys, checked in constant time: every key is compared, whichever matches."""

    def __init__(self, keys: Iterable[str]):
        self.digests = [(hashlib.sha256(k.encode()).digest(), tenant_of(k)) for k in keys]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of a valid `Bearer KEY` header, else None."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        given = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = None
        for digest, tenant in self.digests:
            if hmac.compare_digest(digest, given):
                found = tenant
        return found


class Guard:
    """The ASGI middleware described at the top of this module."""

    def __init__(
        self,
        app: ASGIApp,
        policy: SecurityPolicy,
        bind_host: str = "127.0.0.1",
        count: Callable[[str, int], None] | None = None,
        routes: Iterable[str] = (),
    ):
        self.app, self.policy = app, policy
        self.keys = KeyRing(policy.api_keys)
        self.any_host = "*" in policy.allowed_hosts
        self.hosts = machine_names() | set(policy.allowed_hosts) | {host_name(bind_host)}
        self.any_origin = "*" in policy.cors_origins
        self.origins = set(policy.cors_origins)
        self.count = count or (lambda route, status: None)
        self.routes = set(routes)

    @property
    def state(self) -> Any:
        """The wrapped app's state (Starlette's app.state)."""
        return self.app.state

    # ------------------------------------------------------------------ one request
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        status: list[int] = []  # the status sent, once sent
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        cors = self._cors_headers(origin)

        async def guarded_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [h for h in BASE_HEADERS if h[0] not in names]
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", API_CSP))
                message = dict(message, headers=[*message.get("headers", []), *extra, *cors])
            await send(message)

        refusal = self._refusal(scope, headers, origin)
        try:
            if refusal is not None:
                await _respond(guarded_send, *refusal)
            else:
                await self.app(scope, receive, guarded_send)
        except Exception as e:  # noqa: BLE001 - the one place an unhandled error becomes a 500
            log.error(
                "unhandled %s on %s %s: %s",
                type(e).__name__,
                scope.get("method"),
                route,
                scrub(str(e))[:500],
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            if not status:
                await _respond(guarded_send, 500, error_body(500, "internal error (logged by the server)"))
        self.count(route, status[0] if status else 500)

    def _refusal(self, scope: Scope, headers: dict[str, str], origin: str | None) -> tuple | None:
        """(status, body, headers) that answer the request here, or None to pass it on."""
        host = headers.get("host")
        if not self.any_host and (host is None or not self._host_ok(host_name(host))):
            return 400, error_body(400, "the Host header does not name this server", "bad_host")
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if origin is not None and not self._origin_ok(origin, host):
            return 403, error_body(
                403,
                "cross-origin requests are off (the server allows them with --cors-origin)",
                "cross_origin",
            )
        if method == "OPTIONS" and origin is not None:  # a preflight from an allowed origin
            return (
                204,
                b"",
                [
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600"),
                ],
            )
        protected = path.startswith("/v1/") or (path == "/metrics" and not self.policy.open_metrics)
        if protected and self.keys:
            tenant = self.keys.tenant(headers.get("authorization"))
            if tenant is None:
                message = (
                    "invalid API key"
                    if "authorization" in headers
                    else "an API key is required (Authorization: Bearer KEY)"
                )
                return (
                    401,
                    error_body(401, message, "invalid_api_key"),
                    [(b"www-authenticate", b'Bearer realm="nanovlm"')],
                )
            scope.setdefault("state", {})["tenant"] = tenant
        if method == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return 415, error_body(
                    415,
                    f"a POST body must be application/json, not {ctype[:100] or 'unnamed'!r}",
                    "unsupported_media_type",
                )
        return None

    def _host_ok(self, name: str) -> bool:
        return is_ip(name) or name in self.hosts

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        o = origin.rstrip("/").lower()
        if self.any_origin or o in self.origins:
            return True
        # our own page: the origin names the host the request was sent to
        return host is not None and o in (f"http://{host.lower()}", f"https://{host.lower()}")

    def _cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if origin is None or not (self.any_origin or origin.rstrip("/").lower() in self.origins):
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"vary", b"Origin"),
        ]


async def _respond(send: Send, status: int, body: bytes, headers: list | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- logs


class LogCap(logging.Filter):
    """Cuts a log record's message to `limit` characters (a request can put anything in one)."""

    def __init__(self, limit: int = 2000):
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > self.limit:
            record.msg = f"{message[: self.limit]}… [{len(message) - self.limit} more characters]"
            record.args = ()
        return True


def cap_log_lines(limit: int = 2000) -> None:
    """Put a LogCap on every handler configured now (root's and each logger's)."""
    cap = LogCap(limit)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, LogCap) for f in handler.filters):
                handler.addFilter(cap)
