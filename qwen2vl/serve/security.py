"""Browser and client checks made before a request is read: API key, origin, content type.

- ``--api-key KEY``: every ``/v1/...``, ``/tokenize`` and ``/detokenize`` request needs
  ``Authorization: Bearer KEY`` (401 otherwise; compared in constant time). Off by default.
- Cross-origin browser requests (an ``Origin`` header) are refused with 403 unless the origin is
  in ``--allowed-origins`` (``*``: any). A page served by this server itself is same-origin and
  allowed, but only when the host it was loaded from is an IP address or ``localhost``: a
  DNS-rebinding name pointing at the server is not.
- A POST body must be ``application/json`` (415 otherwise), so an HTML form or a ``text/plain``
  fetch, which a browser sends cross-origin without asking first, is never read as JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from .errors import APIError

PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def check_request(method: str, path: str, headers, api_key: str | None, allowed_origins: tuple[str, ...]) -> None:
    """Raise APIError (401, 403 or 415) for a request this server must not serve."""
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, headers.get("host", ""), allowed_origins):
        raise APIError(403, f"cross-origin requests from {origin[:100]!r} are not allowed (start the server with "
                            f"--allowed-origins to allow them)", "origin_not_allowed")
    if api_key is not None and path.startswith(PROTECTED) and method != "OPTIONS":  # CORS preflights carry no key
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", "invalid_api_key")
    if method == "POST":
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"the request body must be application/json, got {kind[:60] or 'no content type'!r}",
                           "unsupported_media_type")


def origin_allowed(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.netloc.lower() != host.lower() or parts.scheme not in ("http", "https"):
        return False
    return _literal_host(parts.hostname or "")


def _literal_host(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: ``check_request`` before the app sees a request; ``on_status(route, status)``
    after each POST to ``/v1/...`` (the request counter)."""

    def __init__(self, app, api_key: str | None, allowed_origins: tuple[str, ...], on_status):
        self.app, self.api_key, self.allowed_origins, self.on_status = app, api_key, tuple(allowed_origins), on_status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        counted = method == "POST" and path.startswith("/v1/")

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.on_status(path, message["status"])
            await send(message)

        try:
            check_request(method, path, Headers(scope=scope), self.api_key, self.allowed_origins)
        except APIError as err:
            body = json.dumps(err.body()).encode()
            await counting_send({"type": "http.response.start", "status": err.status,
                                 "headers": [(b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, counting_send)
