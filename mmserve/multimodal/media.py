"""Media loading: what a client sends (data URL, http(s) URL, file:// URL, local path, raw bytes, PIL image, OpenAI
`input_audio` data) turned into decoded RGB images, video frames and mono audio, safely.

Every refusal is a `MediaError` (a `ValueError`, so a 400 at the API edge) whose message starts with the
caller's label ("image 2: ..."). The limits live in `MediaPolicy`:

- **No SSRF.** http(s) hosts are resolved here and refused if any address is loopback, private, link-local,
  multicast, reserved or unspecified (IPv4-mapped, NAT64 and 6to4 IPv6 judged by the IPv4 inside). The
  connection then goes to one of exactly those vetted addresses: we open the TCP socket ourselves
  (`http.client` with a pinned address) instead of letting an HTTP library resolve the name again, so DNS
  rebinding between the check and the connect cannot move us, and no request ever reaches a refused
  address. TLS still uses the URL's host for SNI and certificate verification. Redirects are followed by
  hand, each hop vetted the same way; the body is streamed and cut at `max_bytes`. Environment proxies are
  not used (a proxy would do the resolving, out of our sight).
- **No slow downloads.** One download (every redirect hop included) has an overall deadline and, after a
  grace period, a minimum average rate. Both are enforced on every socket operation (`_Transfer`): each
  connect, handshake and read may block only as long as the limits leave, so a server that trickles a byte
  now and then, in the headers or the body, is cut off on time.
- **Local files** only under `allowed_local_media_path`, after resolving symlinks and `..`.
- **Decompression bombs.** An image's size is read from its header and checked before any pixel is decoded;
  video frame sizes are checked before decoding and the frames kept are bounded by `max_video_pixels`.
  `open_image` and `VideoReader` tell what decoding will cost (`decode_bytes`, `kept_bytes`) before it
  happens, so a caller can budget decoded memory; `MediaMemory` is the budget shared by all requests.
- **Bounded video work.** A video is sampled by seeking to the frames wanted, so decoding follows the number
  of frames kept rather than the video's length, within a time budget and a cap on frames decoded.
- **Decoder surface.** Images decode only as PNG, JPEG, WebP, GIF or BMP; videos only through the MP4/MOV,
  Matroska/WebM and AVI demuxers, audio only through the WAV, MP3, FLAC, Ogg, MP4/M4A and Matroska/WebM ones, each
  chosen from the file's magic bytes (FFmpeg's probing would also accept playlists and other formats that open
  further URLs or files).
- **Bounded audio.** A clip's encoded bytes are capped (`max_audio_bytes`) and its duration is checked from the
  header before decoding and again while decoding (`max_audio_seconds`), within a time budget. A video's own sound
  track (`open_video_audio`) is held to the same duration and time limits.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import http.client
import io
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import numpy as np
from PIL import Image

# PIL's own bomb guard is process-wide and fixed (a warning above ~89M pixels, an error above ~179M), and it
# fires inside Image.open, before our per-policy check could run. Every client image goes through
# `load_image`, which enforces `MediaPolicy.max_image_pixels` from the header, so PIL's guard is turned off
# rather than left to override the configured limit with its own number and message.
Image.MAX_IMAGE_PIXELS = None

# The decoders a client may reach. Formats like EPS (runs Ghostscript) or TIFF (libtiff) stay out.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Media types accepted in data URLs; application/octet-stream means "sniff it", which decoding does anyway.
_IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif",
                                "image/bmp", "image/x-bmp", "image/x-ms-bmp", "application/octet-stream"})
_VIDEO_MEDIA_TYPES = frozenset({"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/avi",
                                "video/x-msvideo", "video/msvideo", "application/octet-stream"})
_AUDIO_MEDIA_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/mpeg", "audio/mp3",
                                "audio/flac", "audio/x-flac", "audio/ogg", "audio/opus", "audio/mp4", "audio/m4a",
                                "audio/x-m4a", "audio/aac", "audio/webm", "video/mp4", "video/webm",
                                "application/octet-stream"})
# OpenAI's input_audio.format values we decode (the bytes' magic numbers still choose the demuxer)
AUDIO_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "mp4", "webm")

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_MIB = 1024 * 1024

MediaSource = str | bytes | bytearray | memoryview | os.PathLike | Image.Image


class MediaError(ValueError):
    """A client's media was refused or could not be decoded; the message names the part."""


class MediaBusy(RuntimeError):
    """The media memory shared by all requests stayed full for too long: the server is busy (a 503, retry)."""


@dataclass
class MediaPolicy:
    """What media loading may do: one per server, passed explicitly."""

    allowed_local_media_path: str | None = None  # file:// URLs and local paths only under this directory
    allow_private_urls: bool = False  # allow http(s) to loopback/private/link-local/... addresses
    max_image_pixels: int = 8192 * 8192  # per image and per video frame, checked before decoding
    max_bytes: int = 64 * 1024 * 1024  # cap on a download, a data URL payload or a local file
    timeout_s: float = 10.0  # http(s): the longest any one connect or read may block
    fetch_timeout_s: float = 30.0  # http(s): one download in all (resolving, connecting, reading, redirects)
    min_bytes_per_s: float = 16 * 1024  # http(s): average rate a download must keep after `rate_grace_s`
    rate_grace_s: float = 5.0
    max_redirects: int = 5
    # Decoded frames kept from one video (frames x height x width): 768 frames of 1280x720, about 2 GiB of RGB.
    # Longer videos are thinned uniformly to fit (see VideoReader.read_all) rather than refused.
    max_video_pixels: int = 768 * 1280 * 720
    video_decode_timeout_s: float = 30.0  # one video's demuxing and decoding, seeks and fallbacks included
    # Frames one video may decode in all: sampling by seeking decodes at most about a keyframe interval per frame
    # kept; a video whose keyframes are too sparse for that (or that cannot seek) stops here.
    max_decoded_frames: int = 200_000
    # Decoded RGB bytes (width x height x 3, from the headers, before decoding): what one request may hold,
    # what all requests together may hold (`MediaMemory`), and how long a request waits for room in the latter.
    max_bytes_per_request: int = 768 * _MIB
    max_bytes_in_flight: int = 3072 * _MIB
    in_flight_wait_s: float = 30.0
    # Audio: a clip's encoded bytes (a download, a data URL, input_audio data or a file) and its duration; decoding
    # one clip has its own time budget.
    max_audio_bytes: int = 32 * _MIB
    max_audio_seconds: float = 600.0
    audio_decode_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "fetch_timeout_s", "video_decode_timeout_s", "max_audio_seconds",
                     "audio_decode_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_bytes_per_request", "max_bytes_in_flight", "max_decoded_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_bytes_per_s < 0 or self.rate_grace_s < 0 or self.in_flight_wait_s < 0:
            raise ValueError("min_bytes_per_s, rate_grace_s and in_flight_wait_s must not be negative")


def mib(nbytes: int) -> str:
    """Bytes as MiB for messages: '768 MiB', '0.4 MiB'."""
    value = nbytes / _MIB
    return f"{value:.0f} MiB" if value >= 10 or value == int(value) else f"{value:.1f} MiB"


class MediaMemory:
    """Decoded media that all requests together may hold: a byte semaphore.

    A request takes all its bytes at once, before decoding anything, and gives them back when its processing is
    done, so two requests can never each hold part of the room while waiting for the rest. Waiters are served in
    arrival order (a large request is not overtaken forever by small ones), each for at most `wait_s`."""

    def __init__(self, capacity: int, wait_s: float):
        self.capacity = capacity
        self.wait_s = wait_s
        self.held = 0
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` for the duration of the block; MediaError if it can never fit, MediaBusy after waiting."""
        if nbytes > self.capacity:
            raise MediaError(f"the request's media need {mib(nbytes)} decoded, more than the {mib(self.capacity)} "
                             "the server holds for all requests together (--max-mm-bytes-in-flight)")
        if nbytes <= 0:
            yield
            return
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                if not self._changed.wait_for(
                        lambda: self._waiting[0] is ticket and self.held + nbytes <= self.capacity, self.wait_s):
                    raise MediaBusy(f"the server is busy decoding other requests' media (this one needs "
                                    f"{mib(nbytes)}; waited {self.wait_s:g} s for room); retry later")
                self.held += nbytes
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.held -= nbytes
                self._changed.notify_all()


# ----------------------------------------------------------------------------------------------- addresses


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True if `address` is a globally routable unicast address, i.e. safe to fetch from on a client's behalf.

    Loopback, private, shared (CGNAT), link-local, multicast, reserved and unspecified addresses are not.
    IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by that IPv4 address too."""
    if isinstance(address, str):
        # getaddrinfo may give link-local IPv6 with a zone ("fe80::1%eth0"); the zone does not change the verdict.
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # ::ffff:a.b.c.d reaches a.b.c.d on a dual-stack socket.
            return is_public_address(address.ipv4_mapped)
        if address in _NAT64_PREFIX:
            # A NAT64 gateway forwards 64:ff9b::a.b.c.d to a.b.c.d.
            return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None and not is_public_address(address.sixtofour):
            return False
        if address.is_site_local:
            return False
    # Python's is_global alone is not enough: it calls multicast (224.0.0.0/4) global.
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


def _vetted_addresses(host: str, port: int, policy: MediaPolicy, label: str) -> list[tuple[int, tuple]]:
    """Resolve `host` once and return (family, sockaddr) pairs to connect to, refusing non-public ones.

    ANY non-public address refuses the host: picking only the public ones would still let a name that
    resolves to both an internal and an external address probe which one answers."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"{label}: cannot resolve host {host!r}") from e
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos
                 if family in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise MediaError(f"{label}: cannot resolve host {host!r}")
    # The resolved addresses are not echoed: they would tell a client how the server's network resolves names.
    if not policy.allow_private_urls and not all(is_public_address(sockaddr[0]) for _, sockaddr in addresses):
        raise MediaError(f"{label}: host {host!r} is a loopback, private, link-local or reserved address; "
                         "the server does not fetch from those (start it with --allow-private-media-urls to allow "
                         "them)")
    return addresses


# ----------------------------------------------------------------------------------------------- http(s)


class _Transfer:
    """The clock of one download, shared by all its hops: an overall deadline, and a minimum average rate once
    the grace period is over. `operation_timeout` is how long the next socket operation may block."""

    def __init__(self, policy: MediaPolicy, label: str):
        self.policy, self.label = policy, label
        self.start = time.monotonic()
        self.received = 0  # bytes off the wire so far, headers included
        self.host = ""  # of the current hop, for messages

    def time_left(self) -> float:
        elapsed = time.monotonic() - self.start
        left = self.policy.fetch_timeout_s - elapsed
        if self.policy.min_bytes_per_s > 0:
            # With `received` bytes so far the average stays above the minimum until received / rate seconds,
            # and never binds before the grace period ends.
            left = min(left, max(self.policy.rate_grace_s, self.received / self.policy.min_bytes_per_s) - elapsed)
        return left

    def operation_timeout(self) -> float:
        """The per-operation timeout, shrunk to what the download has left; MediaError when nothing is left."""
        left = self.time_left()
        if left <= 0:
            raise self.expired()
        return min(self.policy.timeout_s, left)

    def expired(self) -> MediaError:
        elapsed = time.monotonic() - self.start
        if elapsed >= self.policy.fetch_timeout_s:
            limit = float(self.policy.fetch_timeout_s)
            return MediaError(f"{self.label}: download from {self.host} exceeded {limit} s")
        return MediaError(f"{self.label}: download from {self.host} is too slow ({self.received} bytes in "
                          f"{elapsed:.1f} s; at least {self.policy.min_bytes_per_s:g} bytes/s are needed after the "
                          f"first {self.policy.rate_grace_s:g} s)")


class _TimedSocketMixin:
    """Every blocking operation bounded by the download's clock. http.client reads through `recv_into` (its
    buffered file calls it once per raw read), so a trickle cannot stretch one `read(n)` or `readline()`."""

    transfer: _Transfer

    def _timed(self, operation: Callable[..., Any], *args: Any) -> Any:
        timeout = self.transfer.operation_timeout()
        self.settimeout(timeout)  # type: ignore[attr-defined]
        try:
            return operation(*args)
        except TimeoutError:
            if timeout < self.transfer.policy.timeout_s:  # the download's own limit fired, not the per-read one
                raise self.transfer.expired() from None
            raise

    def connect(self, *args: Any) -> None:
        self._timed(super().connect, *args)  # type: ignore[misc]

    def recv_into(self, *args: Any) -> int:
        count = self._timed(super().recv_into, *args)  # type: ignore[misc]
        self.transfer.received += count
        return count

    def sendall(self, *args: Any) -> None:
        self._timed(super().sendall, *args)  # type: ignore[misc]


class _TimedSocket(_TimedSocketMixin, socket.socket):
    pass


class _TimedSSLSocket(_TimedSocketMixin, ssl.SSLSocket):
    def do_handshake(self, *args: Any) -> None:
        self._timed(super().do_handshake, *args)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to vetted socket addresses only; with an SSL context, TLS to the URL's host name
    (SNI and certificate checks use the name, not the address). Every socket operation runs on `transfer`'s
    clock."""

    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], transfer: _Transfer,
                 ssl_context: ssl.SSLContext | None):
        super().__init__(host, port, timeout=transfer.policy.timeout_s)
        self._addresses = addresses
        self._transfer = transfer
        self._ssl_context = ssl_context

    def connect(self) -> None:
        sock = self._connect_any()
        if self._ssl_context is not None:
            self._ssl_context.sslsocket_class = _TimedSSLSocket
            try:
                tls = self._ssl_context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
            except BaseException:
                sock.close()
                raise
            tls.transfer = self._transfer
            try:
                tls.do_handshake()
            except BaseException:
                tls.close()
                raise
            sock = tls
        self.sock = sock

    def _connect_any(self) -> socket.socket:
        # In resolver order, moving on after a failure or timeout: a host with an unreachable IPv6 address
        # and a working IPv4 one is common.
        last_error: OSError | None = None
        for family, sockaddr in self._addresses:
            sock = _TimedSocket(family, socket.SOCK_STREAM)
            sock.transfer = self._transfer
            try:
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                last_error = e
            except BaseException:
                sock.close()
                raise
        assert last_error is not None
        raise last_error


def _http_get(url: str, transfer: _Transfer) -> tuple[int, str | None, bytes]:
    """One GET without following redirects: (status, Location header, body). The body is read only for 2xx."""
    policy, label = transfer.policy, transfer.label
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"{label}: only http and https URLs can be fetched, got {scheme or 'no'} scheme")
    if not parts.hostname:
        raise MediaError(f"{label}: URL has no host")
    try:
        # The ASCII (IDNA) form serves DNS, the Host header and TLS alike.
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise MediaError(f"{label}: invalid host name in URL") from e
    try:
        explicit_port = parts.port
    except ValueError as e:
        raise MediaError(f"{label}: invalid port in URL") from e
    port = explicit_port or (443 if scheme == "https" else 80)
    transfer.host = host
    # Name resolution cannot be interrupted; the clock is checked once it returns.
    addresses = _vetted_addresses(host, port, policy, label)
    transfer.operation_timeout()

    host_header = f"[{host}]" if ":" in host else host
    if explicit_port is not None:
        host_header += f":{explicit_port}"
    # Percent-encode what http.client would refuse (spaces, non-ASCII) but keep existing escapes.
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    ssl_context = ssl.create_default_context() if scheme == "https" else None
    conn = _PinnedConnection(host, port, addresses, transfer, ssl_context)
    try:
        # identity encoding: the byte cap then limits what we hold, not what a gzip body would expand to.
        conn.request("GET", target, headers={"Host": host_header, "User-Agent": "mmserve", "Accept": "*/*",
                                             "Accept-Encoding": "identity", "Connection": "close"})
        response = conn.getresponse()
        if response.status in _REDIRECT_STATUSES:
            return response.status, response.getheader("Location"), b""
        if not 200 <= response.status < 300:
            raise MediaError(f"{label}: fetching {host} returned HTTP {response.status}")
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
            raise MediaError(f"{label}: response is {int(length)} bytes, over the limit of {policy.max_bytes}")
        body = bytearray()
        while chunk := response.read(_READ_CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise MediaError(f"{label}: response is over the limit of {policy.max_bytes} bytes")
        return response.status, None, bytes(body)
    except TimeoutError as e:
        raise MediaError(f"{label}: fetching {host} timed out after {policy.timeout_s} s") from e
    except ssl.SSLError as e:
        raise MediaError(f"{label}: TLS with {host} failed: {e}") from e
    except (OSError, http.client.HTTPException) as e:
        raise MediaError(f"{label}: fetching {host} failed: {e}") from e
    finally:
        conn.close()


def fetch_bytes(url: str, policy: MediaPolicy, label: str) -> bytes:
    """GET an http(s) URL on a client's behalf: vetted addresses only, redirects re-vetted, body capped, and the
    whole download (every hop) within `policy.fetch_timeout_s` at no less than `policy.min_bytes_per_s`."""
    transfer = _Transfer(policy, label)
    current = url
    for _ in range(policy.max_redirects + 1):
        status, location, body = _http_get(current, transfer)
        if status not in _REDIRECT_STATUSES:
            return body
        if not location:
            raise MediaError(f"{label}: redirect (HTTP {status}) without a Location")
        current = urljoin(current, location.strip())
    raise MediaError(f"{label}: more than {policy.max_redirects} redirects")


# ----------------------------------------------------------------------------------------------- local files


def _read_local(path: str, policy: MediaPolicy, label: str) -> bytes:
    """Read a file under the allowed directory. Relative paths are relative to that directory."""
    if policy.allowed_local_media_path is None:
        raise MediaError(f"{label}: local files are not allowed (the server has no allowed local media path: start "
                         "it with --allowed-local-media-path DIR to allow files under DIR)")
    if not path or "\x00" in path:
        raise MediaError(f"{label}: invalid local path {path!r}")
    root = os.path.realpath(policy.allowed_local_media_path)
    real = os.path.realpath(os.path.join(root, path))  # an absolute `path` replaces root in the join
    # Containment is checked before existence, so a client cannot probe which files exist elsewhere.
    if os.path.commonpath([root, real]) != root:
        raise MediaError(f"{label}: {path!r} is outside the allowed local media directory")
    try:
        info = os.stat(real)
        # Only regular files: a FIFO or device would block or never end.
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"{label}: {path!r} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise MediaError(f"{label}: {path!r} is {info.st_size} bytes, over the limit of {policy.max_bytes}")
        with open(real, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except FileNotFoundError as e:
        raise MediaError(f"{label}: file not found: {path!r}") from e
    except OSError as e:
        raise MediaError(f"{label}: cannot read {path!r}: {e.strerror or e}") from e
    if len(data) > policy.max_bytes:
        raise MediaError(f"{label}: {path!r} is over the limit of {policy.max_bytes} bytes")
    return data


def _file_url_path(url: str, label: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"{label}: file:// URLs must name a local file, not host {parts.netloc!r}")
    return unquote(parts.path)


# ----------------------------------------------------------------------------------------------- sources


def _decode_data_url(url: str, media_types: frozenset[str], policy: MediaPolicy, label: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{label}: malformed data URL (no comma)")
    params = [p.strip().lower() for p in header[len("data:"):].split(";")]
    media_type = params[0]
    if "base64" not in params[1:]:
        raise MediaError(f"{label}: data URL must be base64-encoded")
    if media_type not in media_types:
        kinds = ", ".join(sorted(media_types))
        raise MediaError(f"{label}: unsupported data URL media type {media_type or '(none)'!r}; expected one of "
                         f"{kinds}")
    payload = "".join(payload.split())  # line breaks inside base64 are common and harmless
    # Refuse by size before decoding: 4 base64 characters carry 3 bytes.
    if len(payload) // 4 * 3 > policy.max_bytes:
        raise MediaError(f"{label}: data URL payload is over the limit of {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{label}: invalid base64 in data URL ({e})") from e
    if not data:
        raise MediaError(f"{label}: data URL is empty")
    return data


def _source_bytes(source: object, media_types: frozenset[str], policy: MediaPolicy, label: str) -> bytes:
    """The encoded bytes a source names: decoded data URL, download, local file or the bytes themselves."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        # Already in the caller's memory, so the byte cap (meant for downloads) does not apply.
        data = bytes(source)
        if not data:
            raise MediaError(f"{label}: empty bytes")
        return data
    if isinstance(source, os.PathLike):
        return _read_local(os.fspath(source), policy, label)
    if not isinstance(source, str):
        raise MediaError(f"{label}: unsupported source type {type(source).__name__}")
    text = source.strip()
    match = _URL_SCHEME.match(text)
    if match is None:
        return _read_local(text, policy, label)
    scheme = match.group(1).lower()
    if scheme == "data":
        return _decode_data_url(text, media_types, policy, label)
    if scheme in ("http", "https"):
        return fetch_bytes(text, policy, label)
    if scheme == "file":
        return _read_local(_file_url_path(text, label), policy, label)
    raise MediaError(f"{label}: unsupported URL scheme {scheme!r}; use data:, http(s):, file: or a local path")


def media_bytes(source: MediaSource, modality: str, policy: MediaPolicy, label: str) -> bytes:
    """The encoded bytes of an image or video source (a data URL decoded, a local file read, a URL downloaded),
    checked as `open_image` and `open_video` check them: for telling a repeated image by its content before deciding
    whether to decode it. PIL images are not sources of bytes."""
    if modality == "audio":
        return audio_bytes(source, policy, label)
    return _source_bytes(source, _IMAGE_MEDIA_TYPES if modality == "image" else _VIDEO_MEDIA_TYPES, policy, label)


def media_digest(*parts: bytes) -> bytes:
    """A 128-bit digest of media content (encoded bytes, or decoded pixels with their shape)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # so that the parts' boundaries count
        h.update(part)
    return h.digest()


# ----------------------------------------------------------------------------------------------- images

# An image this many times larger than the pixels its consumer resizes to is shrunk while it is decoded.
_SHRINK_RATIO = 4


def shrink_factor(pixels: int, target_pixels: int | None) -> int:
    """The integer factor that shrinks an image of `pixels` while keeping at least `target_pixels`: 1 (keep it
    whole) unless the image has `_SHRINK_RATIO` times `target_pixels` or more."""
    if not target_pixels or pixels < _SHRINK_RATIO * target_pixels:
        return 1
    return math.isqrt(pixels // target_pixels)


def _shrunk_size(width: int, height: int, factor: int) -> tuple[int, int]:
    return -(-width // factor), -(-height // factor)  # Image.reduce rounds up


def _check_pixels(width: int, height: int, policy: MediaPolicy, label: str) -> None:
    pixels = width * height
    if pixels > policy.max_image_pixels:
        raise MediaError(f"{label}: {width}x{height} is {pixels} pixels, over the limit of "
                         f"{policy.max_image_pixels} pixels")


class PendingImage:
    """An image whose header is read and checked but whose pixels are not decoded yet, and what decoding it
    costs: `decode_bytes` of RGB while decoding, `kept_bytes` for the image `load` returns.

    With `target_pixels` (the most pixels the model's processor resizes an image to), an image with 4x that or
    more is shrunk by an integer factor as it is decoded, staying at least `target_pixels`, so the processor
    still makes the final resize and the patch grid comes out the same (up to rounding). JPEG decodes directly
    at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's `draft`); other formats decode whole and are then
    box-averaged (`Image.reduce`) in uint8. The trade-off: such images are no longer bit-identical to what
    transformers computes from the full image (a box average before its bicubic resize), in exchange for a
    decoded size bounded by the model's needs rather than by the client's file; images under 4x take exactly the
    path they always did."""

    def __init__(self, image: Image.Image, label: str, target_pixels: int | None, owned: bool):
        self._image, self.label, self._owned = image, label, owned
        self.width, self.height = image.size  # as the header says
        factor = shrink_factor(self.width * self.height, target_pixels)
        if factor > 1 and owned and image.format == "JPEG":
            image.draft(image.mode, _shrunk_size(self.width, self.height, factor))  # at least that size
            factor = shrink_factor(image.width * image.height, target_pixels)
        self.factor = factor
        self.decode_bytes = image.width * image.height * 3
        self.kept_bytes = math.prod(_shrunk_size(image.width, image.height, factor)) * 3

    def load(self) -> Image.Image:
        """The decoded RGB image (shrunk by `factor`); the source image is closed if we opened it."""
        image = self._image
        try:
            image.load()  # a GIF or animated WebP stays on its first frame
            if self.factor == 1:
                # Plain convert, like transformers' processors, so outputs match the reference implementation.
                return image.convert("RGB")
            # Shrinking in the decoded mode spares a full-size RGB copy. Bilevel images average as grayscale;
            # palettes and alpha are converted first, as transformers' plain convert would.
            if image.mode == "1":
                image = image.convert("L")
            elif image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            small = image.reduce(self.factor)
            return small if small.mode == "RGB" else small.convert("RGB")
        except Image.DecompressionBombError as e:
            raise MediaError(f"{self.label}: image is too large ({e})") from e
        except Exception as e:  # truncated or corrupt pixel data
            raise MediaError(f"{self.label}: could not decode image ({e})") from e
        finally:
            self.close()

    def close(self) -> None:
        if self._owned:
            self._image.close()

    def __enter__(self) -> PendingImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(source: MediaSource, policy: MediaPolicy, label: str = "image",
               target_pixels: int | None = None) -> PendingImage:
    """Read and check an image's header (any source `load_image` takes); its pixels are decoded by `load`."""
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, policy, label)
        return PendingImage(source, label, target_pixels, owned=False)
    data = _source_bytes(source, _IMAGE_MEDIA_TYPES, policy, label)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as e:  # only if someone turned PIL's guard back on
        raise MediaError(f"{label}: image is too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"{label}: not a supported image (png, jpeg, webp, gif or bmp)") from e
    except Exception as e:  # hostile headers raise all sorts (SyntaxError, struct.error, ...): all mean "bad image"
        raise MediaError(f"{label}: invalid image data ({e})") from e
    try:
        _check_pixels(image.width, image.height, policy, label)
        return PendingImage(image, label, target_pixels, owned=True)
    except BaseException:
        image.close()
        raise


def load_image(source: MediaSource, policy: MediaPolicy, label: str = "image",
               target_pixels: int | None = None) -> Image.Image:
    """A decoded RGB image from a data: URL, http(s) URL, file:// URL, local path, raw bytes or PIL image; with
    `target_pixels`, shrunk while decoding when it is much larger (see PendingImage)."""
    with open_image(source, policy, label, target_pixels) as pending:
        return pending.load()


# ----------------------------------------------------------------------------------------------- video

# Until a keyframe interval has been seen, seek only to frames this far ahead (x264's default interval is 250
# frames, 10 s at 25 fps); closer frames are reached by decoding on.
_SEEK_GAP_S = 10.0


def _sniff_container(data: bytes, label: str) -> tuple[str, dict[str, str]]:
    """The FFmpeg demuxer (and its options) for these bytes, from their magic numbers."""
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        # External data references (drefs) would make the demuxer open other files; FFmpeg's default is off,
        # said again here so a build with another default cannot turn it on.
        return "mov", {"enable_drefs": "0"}
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska", {}
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi", {}
    raise MediaError(f"{label}: not a supported video container (mp4/mov, webm/mkv or avi)")


@dataclass
class VideoClip:
    """Frames sampled from a video, and what a model's processor needs to time them."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    fps: float  # of the numbering below
    total_frames: int  # the whole video, in that numbering
    indices: list[int]  # each frame's index in the video


class _EndedEarly(Exception):
    """The video ran out before a wanted frame: its header overstated its length."""


class _CannotSeek(Exception):
    """Seeking failed, or the frames after a seek have no timestamps to place them by."""


class VideoReader:
    """A video opened for sampling: the header's facts first (frame size, fps, frame count), checked and
    budgeted before any frame is decoded, then the frames wanted.

    `sample` picks frames from the header's count and fps and reaches them by seeking to the keyframe before
    each and decoding on to it, so the work follows the number of frames wanted (times a keyframe interval at
    most), not the video's length. Every read runs within `policy.video_decode_timeout_s` (counted from the first
    read) and `policy.max_decoded_frames`. With `target_pixels`, frames 4x larger or more are shrunk like images
    (see PendingImage)."""

    def __init__(self, data: bytes, policy: MediaPolicy, label: str = "video", target_pixels: int | None = None):
        self._data, self._policy, self.label = data, policy, label
        self._format, self._options = _sniff_container(data, label)
        self._container, self._stream = self._open()
        self._used = False
        self._deadline: float | None = None
        self.frames_decoded = 0  # in all reads, for the budget (and tests)
        self.seeks = 0
        try:
            stream = self._stream
            # The header's size, checked before any frame is decoded (each decoded frame is checked again).
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            _check_pixels(self.width, self.height, policy, label)
            if not self.width or not self.height:
                raise MediaError(f"{label}: the video's header gives no frame size")
            rate = stream.average_rate or stream.guessed_rate
            self.fps: float | None = float(rate) if rate and rate > 0 else None
            self.frame_count = self._header_frame_count()
            self.factor = shrink_factor(self.width * self.height, target_pixels)
            self.frame_width, self.frame_height = _shrunk_size(self.width, self.height, self.factor)
        except BaseException:
            self.close()
            raise

    @property
    def frame_bytes(self) -> int:
        """RGB bytes of one kept frame."""
        return self.frame_width * self.frame_height * 3

    @property
    def decode_bytes(self) -> int:
        """RGB bytes of one frame as decoded, before shrinking."""
        return self.width * self.height * 3

    def _open(self) -> tuple[Any, Any]:
        import av  # PyAV loads FFmpeg's libraries; only video needs them

        try:
            container = av.open(io.BytesIO(self._data), mode="r", format=self._format, options=self._options)
        except Exception as e:
            raise MediaError(f"{self.label}: not a readable video ({e})") from e
        if not container.streams.video:
            container.close()
            raise MediaError(f"{self.label}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container, stream

    def _header_frame_count(self) -> int | None:
        """Frames in the video as the header tells: MP4 and AVI count them; Matroska gives a duration."""
        stream, container = self._stream, self._container
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        if self.fps is None:
            return None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1_000_000  # AV_TIME_BASE
        else:
            return None
        count = round(seconds * self.fps)
        return count if count > 0 else None

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reading

    def sample(self, choose: Callable[[int, float], Sequence[int]], max_frames: int) -> VideoClip:
        """The frames `choose(total_frames, fps)` picks. With a frame count and rate in the header only those are
        decoded, by seeking (or by decoding on, where the file cannot seek). Without them, or when the video
        turns out shorter than its header said, the whole video is decoded in order keeping at most `max_frames`
        (see `read_all`), and `choose` picks among those, in their numbering."""
        if self.fps and self.frame_count:
            indices = [int(i) for i in choose(self.frame_count, self.fps)]
            for seek in (True, False):
                try:
                    return VideoClip(self.read(indices, seek), self.fps, self.frame_count, indices)
                except _CannotSeek:
                    continue
                except _EndedEarly:
                    break
        frames, fps = self.read_all(max_frames)
        indices = [int(i) for i in choose(len(frames), fps)]
        return VideoClip(frames[indices], fps, len(frames), indices)

    def read(self, indices: Sequence[int], seek: bool = True) -> np.ndarray:
        """Frames [T, H, W, 3] at `indices` of the header's numbering (frame i is shown at i / fps).

        Frames are decoded in order, and counted, until the first seek; after it a frame's index comes from its
        timestamp (for a constant frame rate the two agree, so a short video gives the same frames as decoding it
        whole). A target is taken as the first frame at or after it. A seek goes to a target further ahead than
        the widest keyframe interval seen (a default before one is seen); one that lands no further than
        decoding already was doubles that distance."""
        assert self.fps, "read needs the video's frame rate"
        fps = self.fps
        container, stream = self._restart()
        frames = container.decode(stream)
        out = np.empty((len(indices), self.frame_height, self.frame_width, 3), np.uint8)
        slots: dict[int, list[int]] = {}  # target -> its places in `out`
        for slot, index in enumerate(indices):
            slots.setdefault(index, []).append(slot)
        pos, last = -1, None  # index of the newest decoded frame, and its pixels once converted
        origin: float | None = None  # time of frame 0
        by_time = False
        default_gap, penalty = max(2, round(_SEEK_GAP_S * fps)), 1
        keyframe_gap, last_keyframe = 0, None
        before_seek: int | None = None
        for target in sorted(slots):
            if seek and origin is not None and target - pos > max(2, keyframe_gap or default_gap) * penalty:
                try:
                    # To the keyframe at or before the target (half a frame early, against rounding).
                    container.seek(int((origin + (target - 0.5) / fps) / stream.time_base), stream=stream,
                                   backward=True)
                except Exception as e:
                    raise _CannotSeek from e
                frames = container.decode(stream)
                self.seeks += 1
                by_time, last_keyframe, before_seek = True, None, pos
            while pos < target:
                frame = self._next(frames)
                if frame is None:
                    raise _EndedEarly
                if not by_time:
                    index = pos + 1
                    if origin is None:
                        origin = frame.time  # None: no timestamps, so no seeking either
                elif frame.time is None:
                    raise _CannotSeek
                else:
                    index = round((frame.time - origin) * fps)
                if before_seek is not None:
                    if index <= before_seek:
                        penalty *= 2  # keyframes are sparser here than the gap assumed
                    before_seek = None
                if index <= pos:
                    continue  # decoded again after landing behind
                if frame.key_frame:
                    if last_keyframe is not None:
                        keyframe_gap = max(keyframe_gap, index - last_keyframe)
                    last_keyframe = index
                pos = index
                if pos >= target:
                    last = self._rgb(frame)
            out[slots[target]] = last
        return out

    def read_all(self, max_frames: int = 768) -> tuple[np.ndarray, float]:
        """Every frame in order: (frames [T, H, W, 3], fps of the returned frames).

        At most `max_frames` frames, and at most `policy.max_video_pixels` pixels in all, are kept: a longer
        video keeps every k-th frame (k a power of two, doubled whenever the kept frames would overflow, so
        memory stays bounded whatever the container claims) and fps is divided by k, so T / fps still spans the
        video. Frames that change size mid-stream are scaled to the header's size."""
        if max_frames < 1:
            raise MediaError(f"{self.label}: max_frames must be at least 1, got {max_frames}")
        container, stream = self._restart()
        budget = max(1, min(max_frames, self._policy.max_video_pixels // (self.frame_width * self.frame_height)))
        kept: list[np.ndarray] = []
        stride, decoded = 1, 0
        first_time = last_time = None
        frames = container.decode(stream)
        while (frame := self._next(frames)) is not None:
            if frame.time is not None:
                first_time = frame.time if first_time is None else first_time
                last_time = frame.time
            if decoded % stride == 0:
                if len(kept) == budget:
                    kept, stride = kept[::2], stride * 2
                if decoded % stride == 0:
                    kept.append(self._rgb(frame))
            decoded += 1
        if not kept:
            raise MediaError(f"{self.label}: video has no frames")
        if self.fps:
            fps = self.fps
        elif decoded > 1 and first_time is not None and last_time is not None and last_time > first_time:
            fps = (decoded - 1) / (last_time - first_time)
        else:
            raise MediaError(f"{self.label}: cannot determine the video's frame rate")
        return np.stack(kept), fps / stride

    def _restart(self) -> tuple[Any, Any]:
        """The container at its start (reopened after an earlier read), with the decode clock running."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self._policy.video_decode_timeout_s
        if self._used:
            self._container.close()
            self._container, self._stream = self._open()
        self._used = True
        return self._container, self._stream

    def _next(self, frames: Iterator[Any]) -> Any:
        """The next decoded frame (None at the end), within the decode budgets."""
        try:
            frame = next(frames, None)
        except Exception as e:
            raise MediaError(f"{self.label}: could not decode video ({e})") from e
        if frame is None:
            return None
        self.frames_decoded += 1
        if self.frames_decoded > self._policy.max_decoded_frames:
            raise MediaError(f"{self.label}: decoding needs more than {self._policy.max_decoded_frames} frames (the "
                             "video is too long, or its keyframes too sparse, to sample)")
        assert self._deadline is not None
        if time.monotonic() > self._deadline:
            raise MediaError(f"{self.label}: decoding took longer than {float(self._policy.video_decode_timeout_s)} s")
        _check_pixels(frame.width, frame.height, self._policy, self.label)
        return frame

    def _rgb(self, frame: Any) -> np.ndarray:
        try:
            pixels = frame.to_ndarray(width=self.width, height=self.height, format="rgb24")
        except Exception as e:
            raise MediaError(f"{self.label}: could not decode video ({e})") from e
        if self.factor > 1:
            pixels = np.asarray(Image.fromarray(pixels).reduce(self.factor))
        return pixels


def open_video(source: MediaSource, policy: MediaPolicy, label: str = "video",
               target_pixels: int | None = None) -> VideoReader:
    """A VideoReader on a video's first video stream, from any source `load_image` takes except PIL images."""
    return VideoReader(_source_bytes(source, _VIDEO_MEDIA_TYPES, policy, label), policy, label, target_pixels)


def load_video_frames(source: MediaSource, policy: MediaPolicy, label: str = "video",
                      max_frames: int = 768) -> tuple[np.ndarray, float]:
    """Decode a whole video in order: (frames uint8 [T, H, W, 3], fps of the returned frames); see
    `VideoReader.read_all` for how a long video is thinned. `VideoReader.sample` decodes only what it needs."""
    if max_frames < 1:
        raise MediaError(f"{label}: max_frames must be at least 1, got {max_frames}")
    with open_video(source, policy, label) as video:
        return video.read_all(max_frames)


# ----------------------------------------------------------------------------------------------- audio


def _sniff_audio(data: bytes, label: str) -> tuple[str, dict[str, str]]:
    """The FFmpeg demuxer (and its options) for audio bytes, from their magic numbers."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav", {}
    if data[:4] == b"fLaC":
        return "flac", {}
    if data[:4] == b"OggS":
        return "ogg", {}
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE6 in (0xE2, 0xE4, 0xE6)):
        return "mp3", {}  # an ID3 tag, or an MPEG audio frame header of layer I-III
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov", {"enable_drefs": "0"}  # see _sniff_container
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska", {}
    raise MediaError(f"{label}: not a supported audio format ({', '.join(AUDIO_FORMATS)})")


def _input_audio_bytes(part: dict, policy: MediaPolicy, label: str) -> bytes:
    """The bytes of an OpenAI `input_audio` part: {"data": base64, "format": "wav" | "mp3" | ...}."""
    data, fmt = part.get("data"), part.get("format")
    if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
        raise MediaError(f"{label}: input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}")
    if not isinstance(data, str) or not data:
        raise MediaError(f"{label}: input_audio.data must be a non-empty base64 string")
    payload = "".join(data.split())
    if len(payload) // 4 * 3 > policy.max_bytes:
        raise MediaError(f"{label}: input_audio.data is over the limit of {mib(policy.max_bytes)} per audio clip "
                         "(--max-audio-mb)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{label}: invalid base64 in input_audio.data ({e})") from e


def audio_bytes(source: Any, policy: MediaPolicy, label: str = "audio") -> bytes:
    """The encoded bytes of an audio source: an `input_audio` part's {"data", "format"}, an `audio_url` part's
    {"url"}, or any source `load_image` takes but PIL images; at most `policy.max_audio_bytes`."""
    limited = dataclasses.replace(policy, max_bytes=min(policy.max_bytes, policy.max_audio_bytes))
    if isinstance(source, dict) and ("data" in source or "format" in source):
        data = _input_audio_bytes(source, limited, label)
    else:
        try:
            data = _source_bytes(source.get("url") if isinstance(source, dict) else source, _AUDIO_MEDIA_TYPES,
                                 limited, label)
        except MediaError as e:
            if "over the limit" not in str(e):
                raise
            raise MediaError(f"{e} (the limit per audio clip, --max-audio-mb)") from e
    if len(data) > limited.max_bytes:
        raise MediaError(f"{label}: the clip is {mib(len(data))}, over the limit of {mib(limited.max_bytes)} per "
                         "audio clip (--max-audio-mb)")
    return data


class PendingAudio:
    """An audio clip whose container is opened and whose header is checked (an audio stream, a duration within
    `policy.max_audio_seconds` where the header tells one), its samples not decoded yet."""

    def __init__(self, data: bytes, policy: MediaPolicy, label: str = "audio", in_video: bool = False):
        """`in_video`: the sound track of a video's bytes (`open_video_audio`), opened by the video demuxers."""
        import av  # PyAV loads FFmpeg's libraries; only video and audio need them

        self.label, self._policy = label, policy
        fmt, options = _sniff_container(data, label) if in_video else _sniff_audio(data, label)
        try:
            self._container = av.open(io.BytesIO(data), mode="r", format=fmt, options=options)
        except Exception as e:
            raise MediaError(f"{label}: not a readable {'video' if in_video else 'audio file'} ({e})") from e
        try:
            if not self._container.streams.audio:
                raise MediaError(f"{label}: no audio track, which use_audio_in_video needs" if in_video
                                 else f"{label}: no audio stream")
            self._stream = self._container.streams.audio[0]
            seconds = None
            if self._stream.duration and self._stream.time_base:
                seconds = float(self._stream.duration * self._stream.time_base)
            elif self._container.duration:
                seconds = self._container.duration / 1_000_000  # AV_TIME_BASE
            self.seconds = seconds  # as the header tells, None where it does not
            if seconds is not None:
                self._check_seconds(seconds)
        except BaseException:
            self.close()
            raise

    def _check_seconds(self, seconds: float) -> None:
        limit = self._policy.max_audio_seconds
        if seconds > limit:
            raise MediaError(f"{self.label}: the clip is {seconds:.1f} s long, over the limit of {limit:g} s "
                             "(--max-audio-seconds)")

    def decoded_bytes(self, rate: int) -> int:
        """float32 bytes of the clip at `rate` (from the header; the longest allowed clip where it tells nothing)."""
        seconds = self.seconds if self.seconds is not None else self._policy.max_audio_seconds
        return int(math.ceil(seconds * rate)) * 4

    def load(self, rate: int) -> np.ndarray:
        """The clip as mono float32 samples at `rate` Hz: resampled by FFmpeg per channel, then the channels averaged
        (as librosa's to_mono does); the container is closed."""
        import av

        deadline = time.monotonic() + self._policy.audio_decode_timeout_s
        most = int(self._policy.max_audio_seconds * rate) + rate // 10  # a tenth of a second of slack for rounding
        pieces: list[np.ndarray] = []
        count = 0
        try:
            resampler = None
            frames = self._container.decode(self._stream)
            while True:
                try:
                    frame = next(frames, None)
                except Exception as e:
                    raise MediaError(f"{self.label}: could not decode audio ({e})") from e
                if resampler is None and frame is not None:
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
                if resampler is None:
                    break
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().mean(axis=0, dtype=np.float32)
                    pieces.append(samples)
                    count += len(samples)
                if count > most:
                    self._check_seconds(count / rate)
                if time.monotonic() > deadline:
                    raise MediaError(f"{self.label}: decoding took longer than "
                                     f"{float(self._policy.audio_decode_timeout_s)} s")
                if frame is None:
                    break
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{self.label}: could not decode audio ({e})") from e
        finally:
            self.close()
        if not count:
            raise MediaError(f"{self.label}: the clip has no audio samples")
        return np.concatenate(pieces)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> PendingAudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_audio(source: Any, policy: MediaPolicy, label: str = "audio") -> PendingAudio:
    """A PendingAudio of any source `audio_bytes` takes."""
    return PendingAudio(audio_bytes(source, policy, label), policy, label)


def open_video_audio(data: bytes, policy: MediaPolicy, label: str = "video") -> PendingAudio:
    """The sound track of a video's container bytes, under the audio limits (`max_audio_seconds`, the decode time
    budget); a video without one is refused by name."""
    return PendingAudio(data, policy, label, in_video=True)


def load_audio(source: Any, policy: MediaPolicy, rate: int, label: str = "audio") -> np.ndarray:
    """Decode an audio clip to mono float32 samples at `rate` Hz."""
    return open_audio(source, policy, label).load(rate)
