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
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Any
from urllib.parse import urljoin, urlsplit

MAX_REMOTE_BYTES = 64 << 20  # 64 MiB per downloaded item
REMOTE_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
_CHUNK = 1 << 16
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class MediaError(ValueError):
    """A media item could not be used; the message names the item and the reason.

    ``kind`` says which limit was hit, for callers that answer differently (the server's status):
    ``invalid`` (undecodable, malformed), ``not_found``, ``not_allowed`` (outside the allowed
    directory, remote media disabled, a host not in ``allowed_domains``), ``unreachable`` (a remote
    download failed: refused, private address, no answer, HTTP error, bad redirect; the server
    answers all of these with one text), ``too_large`` (a download over its byte cap),
    ``image_too_large`` (the decoded-pixel guards of images and videos), ``timeout`` (the
    preparation deadline passed) or ``over_budget`` (the prompt's token budget). ``where`` names the
    item (``image 1 (message 0, part 0)``) once the processor knows it.
    """

    def __init__(self, message: str, kind: str = "invalid", where: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.where = where


@dataclass(frozen=True)
class MediaAccess:
    """The one media policy: where media may come from and how much of it may be decoded.

    ``allow_remote`` enables http(s) downloads: each one has one total deadline ``timeout_s``
    (connection, redirects and body together) and a byte cap ``max_remote_bytes`` checked while
    streaming; ``allowed_domains`` (None: any) restricts the host names of the URL and of every
    redirect; ``allow_private_addresses`` False refuses loopback, link-local, private and other
    non-global addresses, checked on the address actually connected to. ``allowed_media_dir``
    restricts local files to one directory tree (None: any readable path, or none at all when
    ``local_files`` is False); ``max_items`` caps the images and videos of one request. ``max_image_pixels``,
    ``max_video_frame_pixels`` and ``max_video_pixels`` (None: the processor's defaults) cap
    decoded pixels per image, per video frame and per video; ``deadline`` (a ``time.monotonic()``
    value) ends the preparation of a request.
    """

    allow_remote: bool = False
    allowed_media_dir: str | None = None
    timeout_s: float = REMOTE_TIMEOUT_S
    max_remote_bytes: int = MAX_REMOTE_BYTES
    allowed_domains: tuple[str, ...] | None = None
    allow_private_addresses: bool = True
    max_image_pixels: int | None = None
    max_video_frame_pixels: int | None = None
    max_video_pixels: int | None = None
    deadline: float | None = None
    local_files: bool = True
    max_items: int = 16

    def check_deadline(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise MediaError(f"preparing the request took too long (stopped at {what})", "timeout")


def url_scheme(source: str) -> str | None:
    """The scheme of a URL source, lower case (``HTTP://x`` -> ``http``), or None for a plain path.

    Every scheme decision (data, http(s), file, refused) is made on this one value.
    """
    match = _SCHEME.match(source)
    if match is None or len(match.group(1)) == 1:  # ``C:\...`` is a Windows path, not a URL
        return None
    scheme = match.group(1).lower()
    return scheme if scheme == "data" or source[match.end():].startswith("//") else None


def safe_reason(err: BaseException, path: str | None = None, name: str = "the file") -> str:
    """``str(err)`` without the server's file path or object reprs (``<_io.BytesIO object at 0x..>``)."""
    text = str(err)
    if path:
        text = text.replace(repr(path), name).replace(path, name)
    return _REPR.sub("the data", text)


def describe(source: Any, limit: int = 80) -> str:
    """Short, printable description of a source for error messages.

    >>> describe("data:image/png;base64," + "A" * 500)
    "'data:image/png;base64,AAAAAAAAAAAA...' (522 chars)"
    """
    if isinstance(source, str):
        if url_scheme(source) == "data":
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
    scheme = url_scheme(source)
    if scheme == "data":
        return _decode_data_url(source)
    if scheme in ("http", "https"):
        return _download(source, access)
    if scheme not in (None, "file"):
        raise MediaError(f"unsupported URL scheme {scheme!r} in {describe(source)}; use data:, http(s): or a "
                         f"file path")
    path = source[len("file://"):] if scheme == "file" else source
    if "\x00" in path:
        raise MediaError(f"{describe(source)} contains a NUL character")
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
    if access.allowed_media_dir is None and not access.local_files:
        raise MediaError(f"local media files are disabled (not reading {describe(source)})", "not_allowed")
    if access.allowed_media_dir is not None:
        path = inside_media_dir(access.allowed_media_dir, path)
        if path is None:
            raise MediaError(f"{describe(source)} is outside the allowed media directory", "not_allowed")
    if not os.path.isfile(path):
        raise MediaError(f"file not found: {describe(source)}", "not_found")
    return path


def _download(url: str, access: MediaAccess) -> bytes:
    """GET ``url`` under one total deadline, following up to 5 redirects, each re-checked."""
    if not access.allow_remote:
        raise MediaError(f"remote media is disabled (enable allow_remote_media to fetch {describe(url)})",
                         "not_allowed")
    deadline = time.monotonic() + access.timeout_s
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = _checked_url(current, url, access)
        status, location, body = _fetch_once(parts, url, access, deadline)
        if location is None:
            if status != 200:
                raise MediaError(f"cannot download {describe(url)}: HTTP status {status}", "unreachable")
            return body
        current = urljoin(current, location)
    raise MediaError(f"cannot download {describe(url)}: more than {MAX_REDIRECTS} redirects", "unreachable")


def _checked_url(current: str, url: str, access: MediaAccess):
    parts = urlsplit(current)
    if url_scheme(current) not in ("http", "https") or not parts.hostname:
        raise MediaError(f"cannot download {describe(url)}: it leads to {describe(current)}, not an http(s) URL",
                         "unreachable" if current != url else "invalid")
    host = parts.hostname.rstrip(".").lower()
    if access.allowed_domains is not None and host not in access.allowed_domains:
        if current != url:  # where a redirect leads is the remote's answer: say no more than for any failure
            raise MediaError(f"cannot download {describe(url)}: it redirects to {host!r}, not an allowed media "
                             f"domain", "unreachable")
        raise MediaError(f"{describe(url)}: the host {host!r} is not in the allowed media domains", "not_allowed")
    try:
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        raise MediaError(f"cannot download {describe(url)}: invalid port", "invalid") from None
    return parts


def address_allowed(address: str) -> bool:
    """True for a global unicast address (also an IPv4 one written as IPv6, ``::ffff:8.8.8.8``)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _connect(host: str, port: int, access: MediaAccess, deadline: float, url: str) -> socket.socket:
    """A TCP connection to the first allowed address of ``host`` (the address checked is the one used)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise MediaError(f"cannot download {describe(url)}: {host} does not resolve ({err})", "unreachable") \
            from None
    last = "no address"
    for family, kind, proto, _name, address in infos:
        if not access.allow_private_addresses and not address_allowed(address[0]):
            last = f"{address[0]} is not a public address"
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(address)
            return sock
        except OSError as err:
            sock.close()
            last = str(err)
    raise MediaError(f"cannot download {describe(url)}: {last}", "unreachable")


def _fetch_once(parts, url: str, access: MediaAccess, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET: ``(status, redirect location or None, body)``; the socket is shut at the deadline."""
    https = url_scheme(parts.geturl()) == "https"
    host, port = parts.hostname, parts.port or (443 if https else 80)
    sock = _connect(host, port, access, deadline, url)
    if https:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    connection = (HTTPSConnection if https else HTTPConnection)(host, port)
    connection.sock = sock
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, (sock,))
    timer.start()
    cap = access.max_remote_bytes
    try:
        path = parts.path or "/"
        connection.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                           headers={"User-Agent": "qwen2vl", "Accept-Encoding": "identity"})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise MediaError(f"{describe(url)} is {int(declared)} bytes, over the {cap}-byte limit", "too_large")
        chunks, size = [], 0
        while True:
            chunk = response.read1(_CHUNK) if response.status == 200 else b""
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise MediaError(f"{describe(url)} is over the {cap}-byte limit", "too_large")
            if time.monotonic() > deadline:
                raise OSError("timed out")
            chunks.append(chunk)
        if time.monotonic() > deadline:
            raise OSError("timed out")
        return response.status, None, b"".join(chunks)
    except MediaError:
        raise
    except (OSError, HTTPException, ValueError) as err:
        reason = "timed out" if time.monotonic() >= deadline else safe_reason(err)
        raise MediaError(f"cannot download {describe(url)}: {reason}", "unreachable") from None
    finally:
        timer.cancel()
        connection.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
