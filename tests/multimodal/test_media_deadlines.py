"""Slow media servers: every download has an overall deadline (connect, every read, every redirect hop) and a
minimum average rate after a grace period, enforced on each socket operation, so a server that trickles bytes in
the body or the headers is cut off on time; downloads run in a pool of their own, so slow URLs do not hold the
workers an unrelated request needs (checked through the server's TokenizerManager)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from mmserve.multimodal.media import MediaError, MediaPolicy, fetch_bytes, load_image


def png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


PNG = png()


class _SlowHandler(BaseHTTPRequestHandler):
    """Paths: /image.png, /trickle-body (1 byte every 0.1 s), /trickle-headers (the header section 1 byte every
    0.1 s), /steady (4 KB every 0.05 s: about 80 KB/s), /hop/N (redirects N more times, 0.3 s each)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        stop = self.server.stopping
        if self.path == "/image.png":
            self._send(200, PNG)
        elif self.path == "/trickle-body":
            self._head(200, {"Content-Length": "100000"})
            self._drip(b"x", 0.1, stop)
        elif self.path == "/trickle-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(b"X-Slow: " + b"a" * 100000, 0.1, stop, chunk=1)
        elif self.path == "/steady":
            self._head(200, {})  # no length: read until the cap or the limits end it
            self._drip(b"y" * 4000, 0.05, stop)
        elif self.path.startswith("/hop/"):
            left = int(self.path.rsplit("/", 1)[1])
            time.sleep(0.3)
            if left == 0:
                self._send(200, PNG)
            else:
                self._send(302, b"", {"Location": f"/hop/{left - 1}"})
        else:
            self._send(404, b"no")

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.flush()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._head(status, {**(headers or {}), "Content-Length": str(len(body))})
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def _drip(self, data: bytes, every: float, stop: threading.Event, chunk: int | None = None) -> None:
        """Write `data` over and over (`chunk` bytes at a time) until the client leaves or the server stops."""
        step = chunk or len(data)
        try:
            while not stop.is_set():
                for i in range(0, len(data), step):
                    self.wfile.write(data[i:i + step])
                    self.wfile.flush()
                    if stop.wait(every):
                        return
        except OSError:
            pass  # the client gave up: that is the point

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


@pytest.fixture(scope="module")
def slow_server():
    httpd = _Server(("127.0.0.1", 0), _SlowHandler)
    httpd.stopping = threading.Event()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()


def policy(**overrides) -> MediaPolicy:
    return MediaPolicy(**{"allow_private_urls": True, "fetch_timeout_s": 1.0, "rate_grace_s": 0.5,
                          "min_bytes_per_s": 0, **overrides})


def refused_within(seconds: float, url: str, policy: MediaPolicy, match: str) -> float:
    start = time.monotonic()
    with pytest.raises(MediaError, match=match):
        fetch_bytes(url, policy, "image 0")
    elapsed = time.monotonic() - start
    assert elapsed < seconds, elapsed
    return elapsed


def test_trickled_body_hits_the_deadline(slow_server):
    # Each byte arrives well within the per-read timeout (10 s): only the overall deadline stops it.
    elapsed = refused_within(1.6, slow_server + "/trickle-body", policy(),
                             r"^image 0: download from 127\.0\.0\.1 exceeded 1.0 s$")
    assert elapsed >= 0.95


def test_trickled_headers_hit_the_deadline(slow_server):
    # http.client reads header lines with readline(), which keeps reading while bytes come: the deadline still holds.
    refused_within(1.6, slow_server + "/trickle-headers", policy(), "exceeded 1.0 s")


def test_minimum_rate_after_the_grace_period(slow_server):
    # 1 byte every 0.1 s is far under 1 KB/s: cut off when the grace period ends, long before the deadline.
    elapsed = refused_within(1.0, slow_server + "/trickle-body",
                             policy(fetch_timeout_s=10.0, min_bytes_per_s=1000),
                             r"^image 0: download from 127\.0\.0\.1 is too slow \(\d+ bytes in 0\.\d s; at least "
                             r"1000 bytes/s are needed after the first 0\.5 s\)$")
    assert elapsed >= 0.45
    # About 80 KB/s passes a 1000 bytes/s minimum (and fails a 1 MB/s one) until the byte cap ends it.
    with pytest.raises(MediaError, match="over the limit of 100000 bytes"):
        fetch_bytes(slow_server + "/steady", policy(min_bytes_per_s=1000, max_bytes=100_000, fetch_timeout_s=10.0),
                    "image 0")
    refused_within(1.0, slow_server + "/steady", policy(min_bytes_per_s=10 ** 6, fetch_timeout_s=10.0), "too slow")


def test_deadline_spans_redirects(slow_server):
    # Four hops of 0.3 s each: every hop is fast enough alone, together they overrun one second.
    assert fetch_bytes(slow_server + "/hop/1", policy(), "image 0") == PNG
    refused_within(1.6, slow_server + "/hop/4", policy(), "exceeded 1.0 s")


def test_per_read_timeout_still_applies(slow_server):
    # The per-operation timeout keeps its own message when it is the tighter limit.
    refused_within(0.9, slow_server + "/trickle-headers", policy(timeout_s=0.05, fetch_timeout_s=5.0),
                   r"timed out after 0\.05 s")


def test_fast_downloads_pass(slow_server):
    image = load_image(slow_server + "/image.png", policy(min_bytes_per_s=16 * 1024))
    assert image.size == (32, 24)


def test_unrelated_request_is_served_while_slow_downloads_wait(slow_server, tiny_qwen2_vl_dir):
    """Through the server's own path (TokenizerManager.process_media) with a single CPU worker: four requests
    whose URLs trickle do not delay a request with a data URL image, and each of them is refused in time."""
    from mmserve.config import ServerArgs
    from mmserve.server.errors import APIError
    from mmserve.tokenizer.manager import TokenizerManager

    args = ServerArgs(model_path=str(tiny_qwen2_vl_dir), allow_private_media_urls=True, media_fetch_timeout=2.0,
                      mm_processor_workers=1)
    manager = TokenizerManager(args)
    prompt = "<|vision_start|><|image_pad|><|vision_end|> What is it?"
    fresh = "data:image/png;base64," + base64.b64encode(png(40, 30, seed=1)).decode()

    async def timed(source):
        start = time.monotonic()
        try:
            await manager.process_media(prompt, [("image", source)])
            return time.monotonic() - start, None
        except APIError as exc:
            return time.monotonic() - start, exc

    async def scenario():
        slow = [asyncio.create_task(timed(slow_server + "/trickle-body")) for _ in range(4)]
        await asyncio.sleep(0.2)  # the slow downloads are under way
        quick_time, quick_error = await timed(fresh)
        assert not any(task.done() for task in slow)
        return quick_time, quick_error, await asyncio.gather(*slow)

    try:
        quick_time, quick_error, slow_results = asyncio.run(scenario())
    finally:
        asyncio.run(manager.shutdown())
    assert quick_error is None and quick_time < 1.5, (quick_time, quick_error)
    for elapsed, error in slow_results:
        assert error is not None and error.status == 400 and "exceeded 2.0 s" in str(error), error
        assert elapsed < 3.0
