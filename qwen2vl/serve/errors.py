"""Errors in OpenAI's JSON shape, and the HTTP status each kind of failure gets.

    {"error": {"message": "temperature must be a number >= 0, got -1", "type": "invalid_request_error",
               "param": "temperature", "code": "invalid_value"}}

Statuses: 400 a bad value (malformed JSON, bad sampling values, invalid base64, undecodable media,
unknown part types, prompts over the context); 403 media the server may not read (local files
outside ``--allowed-media-dir``, remote URLs without ``--allow-remote-media``); 404 unknown model
or route; 413 too big (the body, too many media items, an image over the pixel cap, a remote file
over the size cap); 422 a required field missing or a field of the wrong JSON type; 429 the
waiting queue is full; 500 a fault of the server (the request is dropped, the server goes on).
"""

from __future__ import annotations

ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request that cannot be served, with the status and the OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# MediaError.kind -> (status, code)
MEDIA_STATUSES = {"over_budget": (400, "context_length_exceeded"), "image_too_large": (413, "image_too_large"),
                  "too_large": (413, "media_too_large"), "not_allowed": (403, "media_not_allowed"),
                  "not_found": (400, "media_not_found"), "invalid": (400, "invalid_media")}


def media_error(err: Exception) -> APIError:
    """The API error for a failure of the processor: a MediaError's ``kind`` picks the status."""
    status, code = MEDIA_STATUSES[getattr(err, "kind", "invalid")]
    return APIError(status, str(err), code, "messages")
