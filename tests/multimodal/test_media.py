"""Media loading: sources, formats, SSRF and local-path refusals, size caps, decompression bombs, video."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest
from PIL import Image

from mmserve.multimodal import media
from mmserve.multimodal.media import (
    MediaError,
    MediaPolicy,
    fetch_bytes,
    is_public_address,
    load_image,
    load_video_frames,
)

# ----------------------------------------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def gradient(width: int = 32, height: int = 24) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :, None] * 7
    y = np.arange(height, dtype=np.uint8)[:, None, None] * 11
    return Image.fromarray(np.broadcast_to(x + y, (height, width, 3)).copy(), "RGB")


PNG = encode(gradient(), "PNG")


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all zeros: a few tens of KB that decode to width*height bytes."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000))
    idat += compressor.compress(row * (height % 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_video(path, codec: str = "libx264", container: str = "mp4", frames: int = 10, fps: int = 5,
               size: tuple[int, int] = (64, 48)) -> bytes:
    """Frame i is a flat gray of value 20 * i."""
    width, height = size
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


# ----------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt, media_type, kwargs", [
    ("PNG", "image/png", {}),
    ("JPEG", "image/jpeg", {"quality": 95}),
    ("WEBP", "image/webp", {"lossless": True}),
    ("BMP", "image/bmp", {}),
])
def test_data_url_formats(fmt, media_type, kwargs):
    source = gradient()
    image = load_image(data_url(encode(source, fmt, **kwargs), media_type), MediaPolicy())
    assert image.mode == "RGB" and image.size == (32, 24)
    tolerance = 8 if fmt == "JPEG" else 0
    assert np.abs(np.asarray(image, np.int16) - np.asarray(source, np.int16)).max() <= tolerance


def test_gif_data_url_gives_first_frame():
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    gif = encode(red, "GIF", save_all=True, append_images=[blue], duration=100)
    image = load_image(data_url(gif, "image/gif"), MediaPolicy())
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 0, 0)


def test_raw_bytes_and_pil_passthrough():
    assert load_image(PNG, MediaPolicy()).size == (32, 24)
    assert load_image(bytearray(PNG), MediaPolicy()).size == (32, 24)
    rgba = Image.new("RGBA", (8, 4), (10, 20, 30, 128))
    out = load_image(rgba, MediaPolicy())
    assert out.mode == "RGB" and out.size == (8, 4) and out.getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("L", (3, 3), 7), MediaPolicy()).getpixel((1, 1)) == (7, 7, 7)


def test_data_url_with_line_breaks():
    encoded = base64.encodebytes(PNG).decode()  # wrapped at 76 columns
    assert load_image(f"data:image/png;base64,{encoded}", MediaPolicy()).size == (32, 24)


@pytest.mark.parametrize("source, message", [
    ("data:image/png;base64,not*valid*base64!", "invalid base64"),
    ("data:image/png;base64,iVBORw0", "invalid base64"),
    ("data:text/plain;base64," + base64.b64encode(PNG).decode(), "unsupported data URL media type 'text/plain'"),
    ("data:image/svg+xml;base64,PHN2Zy8+", "unsupported data URL media type"),
    ("data:image/png,rawtext", "must be base64"),
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png;base64,", "empty"),
])
def test_bad_data_urls(source, message):
    with pytest.raises(MediaError, match="^image 3: ") as info:
        load_image(source, MediaPolicy(), label="image 3")
    assert message in str(info.value)


def test_data_url_size_cap():
    with pytest.raises(MediaError, match="over the limit of 100 bytes"):
        load_image(data_url(PNG, "image/png"), MediaPolicy(max_bytes=100))


def test_not_an_image():
    with pytest.raises(MediaError, match="^image: not a supported image"):
        load_image(b"hello, this is not an image", MediaPolicy())
    # A real image in a format outside the allowed decoders is refused the same way.
    with pytest.raises(MediaError, match="not a supported image"):
        load_image(encode(gradient(), "TIFF"), MediaPolicy())


def test_truncated_png():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    data = encode(noise, "PNG")
    with pytest.raises(MediaError, match="^image 2: could not decode image"):
        load_image(data[: len(data) // 2], MediaPolicy(), label="image 2")


def test_decompression_bomb_refused_before_decoding():
    bomb = png_bomb(15000, 15000)
    assert len(bomb) < 100_000
    start = time.perf_counter()
    with pytest.raises(MediaError) as info:
        load_image(data_url(bomb, "image/png"), MediaPolicy(), label="image 1")
    assert time.perf_counter() - start < 1.0
    # Our check fires (PIL's own guard would have raised first, with its own limit, at 225M pixels).
    assert str(info.value) == "image 1: 15000x15000 is 225000000 pixels, over the limit of 67108864 pixels"


def test_pixel_limit_applies_to_every_source():
    policy = MediaPolicy(max_image_pixels=100)
    for source in (PNG, data_url(PNG, "image/png"), gradient()):
        with pytest.raises(MediaError, match="32x24 is 768 pixels, over the limit of 100 pixels"):
            load_image(source, policy)


def test_unsupported_sources():
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        load_image("ftp://example.com/a.png", MediaPolicy())
    with pytest.raises(MediaError, match="unsupported URL scheme 'javascript'"):
        load_image("javascript:alert(1)", MediaPolicy())
    with pytest.raises(MediaError, match="unsupported source type int"):
        load_image(12, MediaPolicy())


# ----------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("address", [
    "127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "224.0.0.1", "0.0.0.0",
    "::ffff:127.0.0.1", "fc00::1", "fe80::1", "fe80::1%eth0", "::", "100.64.0.1", "240.0.0.1",
    "255.255.255.255", "ff02::1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:a00:1::1", "fec0::1",
])
def test_non_public_addresses_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_allowed(address):
    assert is_public_address(address)


# ----------------------------------------------------------------------------------------------- http


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.seen.append((self.path, self.headers.get("Host")))
        port = self.server.server_address[1]
        if self.path == "/image.png":
            self._send(200, PNG)
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/image.png"})
        elif self.path == "/redirect-absolute":
            self._send(301, b"", {"Location": f"http://127.0.0.1:{port}/redirect"})
        elif self.path == "/to-other-host":
            self._send(302, b"", {"Location": f"http://127.0.0.2:{port}/image.png"})
        elif self.path == "/loop":
            self._send(307, b"", {"Location": "/loop"})
        elif self.path == "/large":
            self._send(200, b"x" * 300_000)
        elif self.path == "/large-unsized":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"x" * 10_000)
            except OSError:
                pass
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, PNG)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that stop reading at the byte cap reset the connection


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


PRIVATE_OK = MediaPolicy(allow_private_urls=True)


def test_loopback_refused_by_default_without_any_request(server):
    before = len(server.seen)
    for host in ("127.0.0.1", "localhost", "[::1]"):
        with pytest.raises(MediaError, match="^image 1: host .* loopback, private"):
            load_image(f"http://{host}:{server.server_address[1]}/image.png", MediaPolicy(), label="image 1")
    assert len(server.seen) == before


def test_fetch_allowed_with_private_urls(server):
    image = load_image(url(server, "/image.png"), PRIVATE_OK)
    assert image.size == (32, 24) and np.array_equal(np.asarray(image), np.asarray(gradient()))


def test_redirects_followed(server):
    assert fetch_bytes(url(server, "/redirect"), PRIVATE_OK, "image") == PNG
    assert fetch_bytes(url(server, "/redirect-absolute"), PRIVATE_OK, "image") == PNG


def test_redirect_to_private_host_refused(server, monkeypatch):
    # Pretend 127.0.0.1 is a public host: the first hop is allowed, the redirect to 127.0.0.2 must be re-vetted.
    monkeypatch.setattr(media, "is_public_address", lambda address: address == "127.0.0.1")
    assert fetch_bytes(url(server, "/image.png"), MediaPolicy(), "image") == PNG
    before = len(server.seen)
    with pytest.raises(MediaError, match="^image: host '127.0.0.2' is a loopback, private"):
        fetch_bytes(url(server, "/to-other-host"), MediaPolicy(), "image")
    assert [path for path, _ in server.seen[before:]] == ["/to-other-host"]


def test_too_many_redirects(server):
    with pytest.raises(MediaError, match="more than 2 redirects"):
        fetch_bytes(url(server, "/loop"), MediaPolicy(allow_private_urls=True, max_redirects=2), "image")


def test_connects_to_the_vetted_address(server, monkeypatch):
    """The name is resolved once, by us, and the connection goes to that address with the name as Host."""
    port = server.server_address[1]
    calls = []

    def fake_getaddrinfo(host, port_, *args, **kwargs):
        calls.append(host)
        assert host == "media.test"
        return [(media.socket.AF_INET, media.socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

    monkeypatch.setattr(media.socket, "getaddrinfo", fake_getaddrinfo)
    assert fetch_bytes(f"http://media.test:{port}/image.png", PRIVATE_OK, "image") == PNG
    assert calls == ["media.test"]
    assert server.seen[-1] == ("/image.png", f"media.test:{port}")


def test_next_address_tried_after_a_failed_connect(server, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on: connecting is refused at once
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    port = server.server_address[1]
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda *args, **kwargs: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", closed_port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))])
    assert fetch_bytes(f"http://media.test:{port}/image.png", PRIVATE_OK, "image") == PNG


def test_size_cap(server):
    policy = MediaPolicy(allow_private_urls=True, max_bytes=100_000)
    with pytest.raises(MediaError, match="300000 bytes, over the limit of 100000"):
        fetch_bytes(url(server, "/large"), policy, "image")
    with pytest.raises(MediaError, match="over the limit of 100000 bytes"):
        fetch_bytes(url(server, "/large-unsized"), policy, "image")
    assert len(fetch_bytes(url(server, "/large"), PRIVATE_OK, "image")) == 300_000


def test_timeout(server):
    start = time.perf_counter()
    with pytest.raises(MediaError, match="timed out after 0.2 s"):
        fetch_bytes(url(server, "/slow"), MediaPolicy(allow_private_urls=True, timeout_s=0.2), "image")
    assert time.perf_counter() - start < 0.9


def test_http_errors(server):
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_bytes(url(server, "/missing"), PRIVATE_OK, "image")
    with pytest.raises(MediaError, match="only http and https"):
        fetch_bytes("ftp://127.0.0.1/x", PRIVATE_OK, "image")
    with pytest.raises(MediaError, match="no host"):
        fetch_bytes("http:///x.png", PRIVATE_OK, "image")


def test_unresolvable_host(monkeypatch):
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(media.socket, "getaddrinfo", no_such_host)  # no real DNS query from the tests
    with pytest.raises(MediaError, match="cannot resolve host 'nowhere.test'"):
        fetch_bytes("http://nowhere.test/x.png", PRIVATE_OK, "image")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for media.test (made with the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=media.test",
                    "-addext", "subjectAltName=DNS:media.test"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.seen = []
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, cert
    httpd.shutdown()
    httpd.server_close()


def test_https_verifies_the_url_host(tls_server, monkeypatch):
    httpd, cert = tls_server
    port = httpd.server_address[1]
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda host, port_, *args, **kwargs: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))])
    # Not signed by a trusted CA: refused.
    with pytest.raises(MediaError, match="TLS with media.test failed: .*certificate verify failed"):
        fetch_bytes(f"https://media.test:{port}/image.png", PRIVATE_OK, "image")
    # Trusted, the certificate is checked against the URL's name (not the pinned address).
    trusting = ssl.create_default_context
    monkeypatch.setattr(media.ssl, "create_default_context", lambda: trusting(cafile=str(cert)))
    assert fetch_bytes(f"https://media.test:{port}/image.png", PRIVATE_OK, "image") == PNG
    with pytest.raises(MediaError, match="TLS with other.test failed: .*certificate verify failed"):
        fetch_bytes(f"https://other.test:{port}/image.png", PRIVATE_OK, "image")


# ----------------------------------------------------------------------------------------------- local files


@pytest.fixture
def media_dir(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    (allowed / "inside-link.png").symlink_to(allowed / "sub" / "a.png")
    return allowed


def test_local_files_refused_by_default(media_dir):
    for source in (str(media_dir / "sub" / "a.png"), (media_dir / "sub" / "a.png").as_uri(), media_dir / "sub/a.png"):
        with pytest.raises(MediaError, match="local files are not allowed"):
            load_image(source, MediaPolicy())


def test_local_files_under_allowed_dir(media_dir):
    policy = MediaPolicy(allowed_local_media_path=str(media_dir))
    target = media_dir / "sub" / "a.png"
    for source in (str(target), target, target.as_uri(), "sub/a.png", f"file://localhost{target}",
                   str(media_dir / "inside-link.png")):
        assert load_image(source, policy).size == (32, 24)


def test_local_escapes_refused(media_dir):
    policy = MediaPolicy(allowed_local_media_path=str(media_dir))
    for source in (str(media_dir / ".." / "secret.png"), "../secret.png", str(media_dir / "escape.png"),
                   (media_dir / "escape.png").as_uri(), "/etc/passwd", str(media_dir) + "-sibling/x.png"):
        with pytest.raises(MediaError, match="outside the allowed local media directory"):
            load_image(source, policy)
    with pytest.raises(MediaError, match="not host 'example.com'"):
        load_image("file://example.com/x.png", policy)


def test_local_missing_and_not_a_file(media_dir):
    policy = MediaPolicy(allowed_local_media_path=str(media_dir))
    with pytest.raises(MediaError, match="^image 4: file not found: 'sub/nope.png'"):
        load_image("sub/nope.png", policy, label="image 4")
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(str(media_dir / "sub"), policy)
    with pytest.raises(MediaError, match="over the limit of 10"):
        load_image("sub/a.png", MediaPolicy(allowed_local_media_path=str(media_dir), max_bytes=10))


# ----------------------------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    return path, make_video(path)


def test_video_from_data_url_and_path(mp4):
    path, data = mp4
    from_url, fps = load_video_frames(data_url(data, "video/mp4"), MediaPolicy())
    assert from_url.shape == (10, 48, 64, 3) and from_url.dtype == np.uint8 and fps == pytest.approx(5.0)
    # Frame i is gray 20 * i (up to codec error).
    assert np.abs(from_url.reshape(10, -1).mean(axis=1) - 20 * np.arange(10)).max() < 4
    from_path, fps = load_video_frames(str(path), MediaPolicy(allowed_local_media_path=str(path.parent)))
    assert from_path.shape == (10, 48, 64, 3) and fps == pytest.approx(5.0)
    from_bytes, _ = load_video_frames(data, MediaPolicy())
    assert np.array_equal(from_bytes, from_path)


def test_webm_video(tmp_path):
    data = make_video(tmp_path / "clip.webm", codec="libvpx", container="webm", frames=6, fps=3)
    frames, fps = load_video_frames(data_url(data, "video/webm"), MediaPolicy())
    assert frames.shape == (6, 48, 64, 3) and fps == pytest.approx(3.0)


def test_video_thinned_to_max_frames(mp4):
    _, data = mp4
    frames, fps = load_video_frames(data, MediaPolicy(), max_frames=4)
    # Every 4th frame (0, 4, 8) survives; fps is divided by the same stride.
    assert frames.shape == (3, 48, 64, 3) and fps == pytest.approx(5.0 / 4)
    assert np.abs(frames.reshape(3, -1).mean(axis=1) - np.array([0, 80, 160])).max() < 4
    # The pixel budget thins the same way: room for 5 frames of 64x48 keeps every 2nd frame.
    frames, fps = load_video_frames(data, MediaPolicy(max_video_pixels=5 * 64 * 48))
    assert frames.shape == (5, 48, 64, 3) and fps == pytest.approx(2.5)


def test_video_refusals(mp4):
    _, data = mp4
    with pytest.raises(MediaError, match="^video 1: 64x48 is 3072 pixels, over the limit of 1000 pixels"):
        load_video_frames(data, MediaPolicy(max_image_pixels=1000), label="video 1")
    with pytest.raises(MediaError, match="not a supported video container"):
        load_video_frames(PNG, MediaPolicy())
    with pytest.raises(MediaError, match="unsupported data URL media type 'image/png'"):
        load_video_frames(data_url(data, "image/png"), MediaPolicy())
    with pytest.raises(MediaError, match="^video: "):
        load_video_frames(data[:200], MediaPolicy())
    with pytest.raises(MediaError, match="local files are not allowed"):
        load_video_frames("/tmp/clip.mp4", MediaPolicy())
