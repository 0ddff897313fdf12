"""Media loading: what a client sends (data URL, http(s) URL, file:// URL, local path, raw bytes, PIL image)
turned into decoded RGB images and video frames, safely.

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
- **Local files** only under `allowed_local_media_path`, after resolving symlinks and `..`.
- **Decompression bombs.** An image's size is read from its header and checked before any pixel is decoded;
  video frame sizes are checked before decoding and the frames kept are bounded by `max_video_pixels`.
- **Decoder surface.** Images decode only as PNG, JPEG, WebP, GIF or BMP; videos only through the MP4/MOV,
  Matroska/WebM and AVI demuxers, chosen from the file's magic bytes (FFmpeg's probing would also accept
  playlists and other formats that open further URLs or files).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass
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

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

MediaSource = str | bytes | bytearray | memoryview | os.PathLike | Image.Image


class MediaError(ValueError):
    """A client's media was refused or could not be decoded; the message names the part."""


@dataclass
class MediaPolicy:
    """What media loading may do: one per server, passed explicitly."""

    allowed_local_media_path: str | None = None  # file:// URLs and local paths only under this directory
    allow_private_urls: bool = False  # allow http(s) to loopback/private/link-local/... addresses
    max_image_pixels: int = 8192 * 8192  # per image and per video frame, checked before decoding
    max_bytes: int = 64 * 1024 * 1024  # cap on a download, a data URL payload or a local file
    timeout_s: float = 10.0  # http(s): connect timeout and timeout of each read
    max_redirects: int = 5
    # Decoded frames kept from one video (frames x height x width): 768 frames of 1280x720, about 2 GiB of RGB.
    # Longer videos are thinned uniformly to fit (see load_video_frames) rather than refused.
    max_video_pixels: int = 768 * 1280 * 720


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
                         "the server does not fetch from those")
    return addresses


# ----------------------------------------------------------------------------------------------- http(s)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to vetted socket addresses only; with an SSL context, TLS to the URL's host name
    (SNI and certificate checks use the name, not the address)."""

    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], timeout: float,
                 ssl_context: ssl.SSLContext | None):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses
        self._ssl_context = ssl_context

    def connect(self) -> None:
        sock = self._connect_any()
        if self._ssl_context is not None:
            try:
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock

    def _connect_any(self) -> socket.socket:
        # In resolver order, moving on after a failure or timeout: a host with an unreachable IPv6 address
        # and a working IPv4 one is common.
        last_error: OSError | None = None
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                last_error = e
        assert last_error is not None
        raise last_error


def _http_get(url: str, policy: MediaPolicy, label: str) -> tuple[int, str | None, bytes]:
    """One GET without following redirects: (status, Location header, body). The body is read only for 2xx."""
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
    addresses = _vetted_addresses(host, port, policy, label)

    host_header = f"[{host}]" if ":" in host else host
    if explicit_port is not None:
        host_header += f":{explicit_port}"
    # Percent-encode what http.client would refuse (spaces, non-ASCII) but keep existing escapes.
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    ssl_context = ssl.create_default_context() if scheme == "https" else None
    conn = _PinnedConnection(host, port, addresses, policy.timeout_s, ssl_context)
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
    """GET an http(s) URL on a client's behalf: vetted addresses only, redirects re-vetted, body capped."""
    current = url
    for _ in range(policy.max_redirects + 1):
        status, location, body = _http_get(current, policy, label)
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
        raise MediaError(f"{label}: local files are not allowed (the server has no allowed local media path)")
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


# ----------------------------------------------------------------------------------------------- images


def _check_pixels(width: int, height: int, policy: MediaPolicy, label: str) -> None:
    pixels = width * height
    if pixels > policy.max_image_pixels:
        raise MediaError(f"{label}: {width}x{height} is {pixels} pixels, over the limit of "
                         f"{policy.max_image_pixels} pixels")


def _decode_image(data: bytes, policy: MediaPolicy, label: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as e:  # only if someone turned PIL's guard back on
        raise MediaError(f"{label}: image is too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"{label}: not a supported image (png, jpeg, webp, gif or bmp)") from e
    except Exception as e:  # hostile headers raise all sorts (SyntaxError, struct.error, ...): all mean "bad image"
        raise MediaError(f"{label}: invalid image data ({e})") from e
    with image:
        _check_pixels(image.width, image.height, policy, label)
        try:
            image.load()  # a GIF or animated WebP stays on its first frame
            # Plain convert, like transformers' processors, so outputs match the reference implementation.
            return image.convert("RGB")
        except Image.DecompressionBombError as e:
            raise MediaError(f"{label}: image is too large ({e})") from e
        except Exception as e:  # truncated or corrupt pixel data
            raise MediaError(f"{label}: could not decode image ({e})") from e


def load_image(source: MediaSource, policy: MediaPolicy, label: str = "image") -> Image.Image:
    """A fully decoded RGB image from a data: URL, http(s) URL, file:// URL, local path, raw bytes or PIL image."""
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, policy, label)
        try:
            return source.convert("RGB")
        except Exception as e:  # a lazily opened image can still fail to decode here
            raise MediaError(f"{label}: could not decode image ({e})") from e
    return _decode_image(_source_bytes(source, _IMAGE_MEDIA_TYPES, policy, label), policy, label)


# ----------------------------------------------------------------------------------------------- video


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


def load_video_frames(source: MediaSource, policy: MediaPolicy, label: str = "video",
                      max_frames: int = 768) -> tuple[np.ndarray, float]:
    """Decode a video's first video stream: (frames uint8 [T, H, W, 3], fps of the returned frames).

    Sources as for `load_image` (except PIL images). At most `max_frames` frames, and at most
    `policy.max_video_pixels` pixels in all, are kept: a longer video keeps every k-th frame (k a power of
    two, doubled whenever the kept frames would overflow, so memory stays bounded whatever the container
    claims) and fps is divided by k, so T / fps still spans the video. Frames that change size mid-stream are
    scaled to the first frame's size."""
    import av  # PyAV loads FFmpeg's libraries; only video needs them

    if max_frames < 1:
        raise MediaError(f"{label}: max_frames must be at least 1, got {max_frames}")
    data = _source_bytes(source, _VIDEO_MEDIA_TYPES, policy, label)
    container_format, options = _sniff_container(data, label)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=container_format, options=options)
    except Exception as e:
        raise MediaError(f"{label}: not a readable video ({e})") from e
    with container:
        if not container.streams.video:
            raise MediaError(f"{label}: no video stream")
        stream = container.streams.video[0]
        # The header's size, checked before any frame is decoded (a decoded frame is checked again below).
        _check_pixels(stream.codec_context.width, stream.codec_context.height, policy, label)
        stream.thread_type = "AUTO"
        kept: list[np.ndarray] = []
        stride, decoded, budget, width, height = 1, 0, max_frames, 0, 0
        first_time = last_time = None
        try:
            for frame in container.decode(stream):
                _check_pixels(frame.width, frame.height, policy, label)
                if decoded == 0:
                    width, height = frame.width, frame.height
                    budget = max(1, min(max_frames, policy.max_video_pixels // (width * height)))
                if frame.time is not None:
                    first_time = frame.time if first_time is None else first_time
                    last_time = frame.time
                if decoded % stride == 0:
                    if len(kept) == budget:
                        kept, stride = kept[::2], stride * 2
                    if decoded % stride == 0:
                        kept.append(frame.to_ndarray(width=width, height=height, format="rgb24"))
                decoded += 1
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{label}: could not decode video ({e})") from e
        if not kept:
            raise MediaError(f"{label}: video has no frames")
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            fps = float(rate)
        elif decoded > 1 and first_time is not None and last_time is not None and last_time > first_time:
            fps = (decoded - 1) / (last_time - first_time)
        else:
            raise MediaError(f"{label}: cannot determine the video's frame rate")
    return np.stack(kept), fps / stride
