"""Hostile media against a real server (tiny Qwen2-VL, one media worker): image URLs that trickle bytes get a clear
400 once the download deadline passes, while an unrelated image request is answered at once; an 8192x8192 PNG of a
few hundred KB is served (shrunk while decoding) instead of inflating the API process."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from vl_helpers import solid_png

FETCH_TIMEOUT_S = 4.0
GREEDY = {"temperature": 0, "max_tokens": 4}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(url: str, image: str, timeout: float = 60) -> tuple[float, httpx.Response]:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}]}], **GREEDY}
    start = time.monotonic()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
    return time.monotonic() - start, response


@pytest.fixture(scope="module")
def trickle_url():
    """An image server on loopback that sends its headers, then one byte of body a second."""
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                while not stopping.wait(1.0):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    stopping.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(start_server, tiny_qwen2_vl_dir):
    return start_server(str(tiny_qwen2_vl_dir), "--chat-template", "qwen2-vl", "--allow-private-media-urls",
                        "--media-fetch-timeout", str(FETCH_TIMEOUT_S), "--mm-processor-workers", "1")


def test_slow_urls_are_refused_in_time_without_starving_others(server, trickle_url):
    chat(server.url, data_url(solid_png(64, 48)))  # warm up the processor and the model
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(chat, server.url, trickle_url) for _ in range(4)]
        time.sleep(0.5)  # the four downloads are under way
        quick_time, quick = chat(server.url, data_url(solid_png(80, 60, (250, 10, 10))))
        assert quick.status_code == 200, quick.text
        assert not any(future.done() for future in slow)  # answered while the slow downloads still wait
        assert quick_time < FETCH_TIMEOUT_S - 1
        for future in slow:
            elapsed, response = future.result()
            assert response.status_code == 400, response.text
            assert response.json()["error"]["message"] == (
                f"image 0: download from 127.0.0.1 exceeded {FETCH_TIMEOUT_S} s")
            assert FETCH_TIMEOUT_S - 0.5 < elapsed < FETCH_TIMEOUT_S + 2
    assert server.proc.poll() is None


def test_huge_png_is_served(server):
    huge = solid_png(8192, 8192)
    assert len(huge) < 300_000
    elapsed, response = chat(server.url, data_url(huge))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 64  # the image's 8x8 merged patches are in the prompt
