"""HTTP-level attacks on a real server on loopback (issue 13): another client's requests aborted by a guessed id
prefix, oversize and slow (slowloris) requests, a huge prompt freezing the event loop, a non-streaming client
that leaves while its request runs on, bodies that used to get plain-text 500s, and streams cut off by a
shutdown. Each attack gets an OpenAI-shaped answer (or a closed connection) and the server keeps serving.

One server (a tiny random Qwen2 with SmolLM2's tokenizer, context 1024) serves the module: an API key, metrics,
an 8 MiB body limit, a 2 s read timeout and a 1 s shutdown grace period. The last test shuts it down."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from mmserve.tokenizer.manager import max_bytes_per_token

API_KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT_MB = 8
READ_TIMEOUT_S = 2.0
GRACE_S = 1.0
MSGS = [{"role": "user", "content": "Name three colours of the rainbow."}]
LONG = {"messages": MSGS, "max_tokens": 900, "ignore_eos": True}  # tens of seconds on the CPU


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MMSERVE_SHUTDOWN_GRACE_S", str(GRACE_S))
        return start_server(str(tiny_model_dir("qwen2")), "--api-key", API_KEY, "--enable-metrics",
                            "--max-request-body-mb", str(BODY_LIMIT_MB),
                            "--request-read-timeout", str(READ_TIMEOUT_S))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def assert_error(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    for word in words:
        assert word in error["message"], error
    return error


def server_info(server) -> dict:
    return httpx.get(server.url + "/get_server_info", headers=AUTH, timeout=10).json()


def wait_idle(server, timeout: float) -> dict:
    """Poll until nothing is in flight and the engine runs nothing; returns the last info."""
    deadline = time.monotonic() + timeout
    while True:
        info = server_info(server)
        if info["in_flight"] == 0 and info["stats"] and info["stats"]["running"] == 0:
            return info
        if time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def aborted_total(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("mmserve_requests_total{") and 'reason="abort"' in line:
            return float(line.split()[-1])
    return 0.0


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response that has a Content-Length (all of the server's error answers do)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> float | None:
    """Seconds until the server closes `sock` (reading and discarding any answer), sending `trickle` every 0.3 s
    meanwhile; None if it is still open after `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        readable, _, _ = select.select([sock], [], [], 0.3)
        if readable:
            try:
                if not sock.recv(65536):
                    return time.monotonic() - start
            except ConnectionResetError:
                return time.monotonic() - start
        elif trickle:
            try:
                sock.sendall(trickle)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
    return None


# ----- 5: abort matches exact ids, never a prefix -----

def test_abort_takes_exact_ids_only(server, http):
    other: dict[str, httpx.Response] = {}

    def another_client() -> None:
        body = {"messages": MSGS, "max_tokens": 40, "ignore_eos": True}
        other["resp"] = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)

    thread = threading.Thread(target=another_client)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**LONG, "n": 2, "stream": True},
                      headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        rid = json.loads(next(lines).removeprefix("data: "))["id"]
        thread.start()
        deadline = time.monotonic() + 30
        while server_info(server)["in_flight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        # guessable prefixes of the two clients' ids reach nothing
        for guess in ("chatcmpl", "chatcmpl-", rid[:-1], rid + "-", ""):
            r = http.post("/abort_request", json={"rid": guess})
            assert r.status_code == 200 and r.json()["aborted"] == [], (guess, r.text)
        # a sub-request's own id aborts it alone; the client-visible id aborts its own request (-0 again, unless
        # the engine has already reported it aborted)
        assert http.post("/abort_request", json={"rid": rid + "-0"}).json()["aborted"] == [rid + "-0"]
        assert http.post("/abort_request", json={"rid": rid}).json()["aborted"][-1:] == [rid + "-1"]
        finish = {}
        for line in lines:
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice["finish_reason"]:
                        finish[choice["index"]] = choice["finish_reason"]
    assert finish == {0: "abort", 1: "abort"}
    thread.join(120)
    done = other["resp"]
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["finish_reason"] == "length" and done.json()["usage"]["completion_tokens"] == 40


def test_client_chosen_id_cannot_collide_with_a_group(server, http):
    body = {**LONG, "n": 2, "stream": True, "rid": "mine"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as resp:
        lines = resp.iter_lines()  # kept: dropping it closes the connection
        next(lines)
        for rid in ("mine", "mine-0"):
            clash = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "rid": rid})
            assert_error(clash, 400, "duplicate")
        assert http.post("/abort_request", json={"rid": "mine"}).json()["aborted"] == ["mine-0", "mine-1"]
    assert wait_idle(server, 10)["in_flight"] == 0


# ----- 6: body size, and tokenizing off the event loop -----

def test_content_length_over_the_limit_is_413_before_the_body(server):
    with connect(server) as sock:
        size = (BODY_LIMIT_MB + 1) * 2**20
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        status, headers, body = read_response(sock)  # no body was sent: the answer comes from the header alone
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert str(BODY_LIMIT_MB) in json.loads(body)["error"]["message"]


def test_chunked_body_over_the_limit_is_413_while_it_streams(server):
    piece = b"a" * 2**18
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with connect(server) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sock.sendall(b'10\r\n{"prompt": "aaaa\r\n')
        sent = 0
        while sent < 3 * BODY_LIMIT_MB * 2**20 and not select.select([sock], [], [], 0)[0]:
            sock.sendall(chunk)
            sent += len(piece)
            time.sleep(0.002)
        if not select.select([sock], [], [], 5)[0]:  # no answer while streaming: finish the body
            sock.sendall(b'2\r\n"}\r\n0\r\n\r\n')
        status, _, body = read_response(sock)
    assert status == 413, body
    assert sent < 2 * BODY_LIMIT_MB * 2**20  # refused while the body streamed, not after it all arrived
    assert "error" in json.loads(body)


def test_health_stays_responsive_while_a_big_prompt_is_tokenized(server, http):
    prompt = "The quick brown fox jumps over the lazy dog, again and again. " * 40_000  # 2.5 MB, seconds
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.update(r=http.post("/tokenize", json={"prompt": prompt})))
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        worker.start()
        while worker.is_alive():
            start = time.monotonic()
            assert probe.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    worker.join()
    assert result["r"].status_code == 200 and result["r"].json()["count"] > 500_000
    assert len(latencies) >= 10, latencies  # the tokenization took a while...
    assert max(latencies) < 1.0, sorted(latencies)[-5:]  # ...and the event loop answered throughout


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_certainly_over_the_context_is_refused_untokenized(http, route):
    text = "hello " * 1_000_000  # 6 MB: a second or more to tokenize, far past 1024 tokens of any length
    body = {"prompt": text} if route == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    start = time.monotonic()
    error = assert_error(http.post(route, json=body), 400, "bytes", "1024")
    assert time.monotonic() - start < 2.0
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == ("prompt" if route == "/v1/completions" else "messages")


def test_byte_bound_holds_for_adversarial_text(tokenizer):
    """The early refusal is sound: no text has more UTF-8 bytes than its tokens times the bound."""
    bound = max_bytes_per_token(tokenizer)
    assert bound is not None and bound < 200
    for text in (" " * 20_000, "\n" * 9_000, "\t \n" * 3_000, "a" * 20_000, "-" * 20_000, "=" * 9_999, "😀" * 3_000,
                 "数学的证明" * 2_000, "<|im_start|><|im_end|>" * 500, "\u0301" * 5_000, "\x00" * 4_000):
        for special in (False, True):
            ids = tokenizer.encode(text, add_special_tokens=special)
            assert len(text.encode()) <= bound * len(ids), (text[:20], len(ids))


def test_no_byte_bound_where_text_can_vanish(tokenizer):
    """Tokenizers that can map a long text to a few tokens get no early refusal at all."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    def wrapped(tok: Tokenizer) -> SimpleNamespace:
        return SimpleNamespace(backend_tokenizer=tok)

    base = tokenizer.backend_tokenizer.to_str()
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    lowercase = Tokenizer.from_str(base)
    lowercase.normalizer = normalizers.Lowercase()  # "K" (Kelvin, 3 bytes) -> "k"
    deleting = Tokenizer.from_str(base)
    deleting.normalizer = normalizers.Replace(" ", "")
    swallowing = Tokenizer.from_str(base)
    swallowing.add_tokens([AddedToken("<mask>", lstrip=True)])  # "      <mask>" is one token
    for tok in (word_level, lowercase, deleting, swallowing):
        assert max_bytes_per_token(wrapped(tok)) is None
    assert max_bytes_per_token(SimpleNamespace()) is None  # not a fast tokenizer
    nfc = Tokenizer.from_str(base)
    nfc.normalizer = normalizers.NFC()
    assert max_bytes_per_token(wrapped(nfc)) == 4 * max_bytes_per_token(tokenizer)


# ----- 7: a non-streaming client that disconnects -----

def test_non_streaming_disconnect_aborts_the_request(server, http):
    before = aborted_total(http)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1.5 s and closes its connection
        httpx.post(server.url + "/v1/chat/completions", json=LONG, headers=AUTH,
                   timeout=httpx.Timeout(30, read=1.5))
    info = wait_idle(server, 3)
    assert info["in_flight"] == 0 and info["stats"]["running"] == 0, info
    deadline = time.monotonic() + 3
    while aborted_total(http) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted_total(http) == before + 1


# ----- 9: bodies that used to get plain-text 500s -----

@pytest.mark.parametrize("content", [["hi"], [None], [["hi"]]], ids=["string-part", "null-part", "list-part"])
def test_content_parts_that_are_not_objects(http, content):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert_error(r, 400, "content[0]")


@pytest.mark.parametrize("key", ["template", "messages", "tokenizer", "chat_template", "conversation", "tokenize",
                                 "return_dict", "return_tensors"])
def test_template_kwargs_colliding_with_the_renderer(http, key):
    body = {"messages": MSGS, "max_tokens": 2, "chat_template_kwargs": {key: True}}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, key)
    assert error["param"] == "chat_template_kwargs", error


def test_template_kwargs_that_are_template_variables_still_work(http):
    body = {"messages": MSGS, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(("route", "raw"), [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'),
    ("/v1/completions", '{"prompt": "\\ud83d"}'),
    ("/v1/completions", '{"prompt": ["ok", "\\ude00 alone"]}'),
    ("/generate", '{"text": "\\ud800"}'),
    ("/tokenize", '{"prompt": "x\\udc00"}'),
], ids=["chat", "chat-part", "completion", "completion-list", "generate", "tokenize"])
def test_lone_surrogates_are_refused(http, route, raw):
    r = http.post(route, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert_error(r, 400, "surrogate")


def test_surrogate_pairs_are_fine(http):
    r = http.post("/tokenize", content=b'{"prompt": "smile \\ud83d\\ude00"}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["count"] > 0


def test_api_key_compared_as_bytes(server, http):
    for value in (b"Bearer sk-wrong", b"Bearer sk-hostil\xe9", b"Bearer " + API_KEY.encode() + b"x", b""):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": value}, timeout=10)
        assert_error(r, 401, "API key")
    assert http.get("/v1/models").status_code == 200


def test_unexpected_exceptions_are_openai_shaped_500s(tiny_model_dir):
    """In process (no engine started): a route that fails unexpectedly, and a stream that does after its start."""
    from fastapi.testclient import TestClient

    from mmserve.config import ServerArgs
    from mmserve.server.app import create_app
    from mmserve.server.openai_api import sse_with_errors

    app = create_app(ServerArgs(model_path=str(tiny_model_dir("qwen2")), dtype="float32"))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    error = assert_error(r, 500, "RuntimeError")
    assert "a bug" not in error["message"]  # no internals in the answer; the log has them

    async def events():
        yield "data: {}\n\n"
        raise KeyError("oops")

    async def collect() -> list[str]:
        return [event async for event in sse_with_errors(events())]

    out = asyncio.run(collect())
    assert out[0] == "data: {}\n\n" and out[-1] == "data: [DONE]\n\n"
    assert json.loads(out[1].removeprefix("data: "))["error"]["type"] == "internal_error"


# ----- 9: slowloris -----

def test_slow_requests_are_cut_off_after_the_read_timeout(server):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    idle, slow_head, slow_body = connect(server), connect(server), connect(server)
    slow_head.sendall(head.encode())
    slow_body.sendall((head + "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
    results: dict[str, float | None] = {}
    threads = [threading.Thread(target=lambda name=name, sock=sock, trickle=trickle:
                                results.update({name: closed_within(sock, READ_TIMEOUT_S + 4, trickle)}))
               for name, sock, trickle in [("idle", idle, None), ("head", slow_head, b"X-Slow: 1\r\n"),
                                           ("body", slow_body, b" ")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sock in (idle, slow_head, slow_body):
        sock.close()
    for name, elapsed in results.items():
        assert elapsed is not None and elapsed < READ_TIMEOUT_S + 2, (name, results)


def test_a_408_says_why(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        status, _, body = read_response(sock)
    assert status == 408 and "error" in json.loads(body)


def test_server_still_serves(server, http):
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert server.proc.poll() is None, server.log()


# ----- 9: shutdown (this ends the module's server) -----

def test_sigterm_ends_streams_left_at_the_end_of_the_grace_period(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**LONG, "stream": True}, headers=AUTH,
                      timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")
        server.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
        elapsed = time.monotonic() - start
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"], error
    assert GRACE_S - 0.2 < elapsed < GRACE_S + 4, elapsed
    assert server.proc.wait(timeout=30) == 0
