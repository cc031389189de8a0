"""Errors in OpenAI's JSON shape, and the HTTP status each kind of failure gets.

    {"error": {"message": "temperature must be a number >= 0, got -1", "type": "invalid_request_error",
               "param": "temperature", "code": "invalid_value"}}

Statuses: 400 a bad value (malformed JSON, bad sampling values, invalid base64, undecodable media,
unknown part types, prompts over the context, a remote download that failed); 401 a missing or
wrong API key; 403 media the server may not read (local files outside ``--allowed-media-dir``,
remote URLs without ``--allow-remote-media``, hosts outside ``--allowed-media-domains``) or a
browser request from an origin not allowed; 404 unknown model or route; 408 preparing the request
(tokenizing, fetching and decoding media) passed its deadline; 413 too big (the body, too many
media items, an image or video over its decoded-pixel cap, a remote file over the size cap); 415 a
body that is not ``application/json``; 422 a required field missing or a field of the wrong JSON
type; 429 the waiting queue is full (with ``Retry-After``); 500 a fault of the server (the request
is dropped, the server goes on).
"""

from __future__ import annotations

import logging

log = logging.getLogger("qwen2vl.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request that cannot be served, with the status and the OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers  # extra response headers (Retry-After on 429)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# MediaError.kind -> (status, code)
MEDIA_STATUSES = {"over_budget": (400, "context_length_exceeded"), "image_too_large": (413, "image_too_large"),
                  "too_large": (413, "media_too_large"), "not_allowed": (403, "media_not_allowed"),
                  "not_found": (400, "media_not_found"), "invalid": (400, "invalid_media"),
                  "unreachable": (400, "media_unreachable"), "timeout": (408, "timeout")}
UNREACHABLE = ("the remote media could not be fetched (the host is unreachable, refused or not allowed, "
               "did not answer in time, or had no such file)")


def media_error(err: Exception) -> APIError:
    """The API error for a failure of the processor: a MediaError's ``kind`` picks the status.

    Every failed download gets the same text, whatever answered (or did not): the detail, which
    could tell a closed port from a silent one, goes to the server log only.
    """
    kind = getattr(err, "kind", "invalid")
    status, code = MEDIA_STATUSES[kind]
    if kind == "unreachable":
        log.info("remote media failed: %s", err)
        return APIError(status, f"{getattr(err, 'where', None) or 'a media item'}: {UNREACHABLE}", code, "messages")
    return APIError(status, str(err), code, "messages")
