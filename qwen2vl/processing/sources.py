"""Where media bytes come from, and the error every media problem raises.

A *source* is what a message part names: a local path, a ``file://`` URL, a
``data:<mime>;base64,`` URL, raw ``bytes``, or an ``http(s)://`` URL (only when the caller
enables remote loading). Images may also be PIL images or numpy arrays; videos may be a list
of frames. This module turns string and bytes sources into a local path or in-memory bytes,
enforcing the access policy (remote loading off by default, an optional media directory jail,
a download timeout and size cap).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

MAX_REMOTE_BYTES = 64 << 20  # 64 MiB per downloaded item
REMOTE_TIMEOUT_S = 10.0


class MediaError(ValueError):
    """A media item could not be used; the message names the item and the reason.

    ``kind`` says which limit was hit, for callers that answer differently (the server's status):
    ``invalid`` (undecodable, malformed), ``not_found``, ``not_allowed`` (outside the allowed
    directory, remote media disabled), ``too_large`` (a download over its byte cap),
    ``image_too_large`` (the decoded-pixel guard) or ``over_budget`` (the prompt's token budget).
    """

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class MediaAccess:
    """Policy for loading media from strings.

    ``allow_remote`` enables http(s) downloads (each capped at ``max_remote_bytes`` and
    ``timeout_s``); ``allowed_media_dir`` restricts local files to one directory tree
    (None: any readable path).
    """

    allow_remote: bool = False
    allowed_media_dir: str | None = None
    timeout_s: float = REMOTE_TIMEOUT_S
    max_remote_bytes: int = MAX_REMOTE_BYTES


def describe(source: Any, limit: int = 80) -> str:
    """Short, printable description of a source for error messages.

    >>> describe("data:image/png;base64," + "A" * 500)
    "'data:image/png;base64,AAAAAAAAAAAA...' (522 chars)"
    """
    if isinstance(source, str):
        if source.startswith("data:"):
            head = source[: source.find(",") + 13] if "," in source else source[:34]
            return f"{head + '...'!r} ({len(source)} chars)"
        return repr(source if len(source) <= limit else source[: limit - 3] + "...")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (list, tuple)):
        return f"<list of {len(source)} frames>"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<array {getattr(source, 'dtype', '?')} {tuple(shape)}>"
    size, mode = getattr(source, "size", None), getattr(source, "mode", None)
    if size is not None and mode is not None:
        return f"<PIL image {mode} {size[0]}x{size[1]}>"
    return f"<{type(source).__name__}>"


def read_source(source: str | bytes, access: MediaAccess | None = None) -> str | bytes:
    """Resolve a string or bytes source to a local file path or the item's bytes.

    Raises MediaError for a missing file, a path outside ``allowed_media_dir``, a malformed
    data URL, or a remote URL when remote loading is off or the download fails or is too big.
    """
    access = access or MediaAccess()
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, str):
        raise MediaError(f"unsupported source type {type(source).__name__}: {describe(source)}")
    if source.startswith("data:"):
        return _decode_data_url(source)
    if source.startswith(("http://", "https://")):
        return _download(source, access)
    path = source[len("file://"):] if source.startswith("file://") else source
    return _local_path(path, source, access)


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"data URL must be '<mime>;base64,<payload>': {describe(url)}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"data URL has invalid base64 ({err}): {describe(url)}") from None


def inside_media_dir(root: str, path: str) -> str | None:
    """``path`` (relative paths taken from ``root``) resolved, or None when it leads outside ``root``."""
    root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))
    return real if os.path.commonpath([root, real]) == root else None


def _local_path(path: str, source: str, access: MediaAccess) -> str:
    if access.allowed_media_dir is not None:
        path = inside_media_dir(access.allowed_media_dir, path)
        if path is None:
            raise MediaError(f"{describe(source)} is outside the allowed media directory", "not_allowed")
    if not os.path.isfile(path):
        raise MediaError(f"file not found: {describe(source)}", "not_found")
    return path


def _download(url: str, access: MediaAccess) -> bytes:
    if not access.allow_remote:
        raise MediaError(f"remote media is disabled (enable allow_remote_media to fetch {describe(url)})",
                         "not_allowed")
    cap = access.max_remote_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2vl"})
    try:
        with urllib.request.urlopen(request, timeout=access.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise MediaError(f"{describe(url)} is {int(declared)} bytes, over the {cap}-byte limit", "too_large")
            data = response.read(cap + 1)
    except MediaError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise MediaError(f"cannot download {describe(url)}: {err}") from None
    if len(data) > cap:
        raise MediaError(f"{describe(url)} is over the {cap}-byte limit", "too_large")
    return data
