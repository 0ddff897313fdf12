#!/usr/bin/env python
"""A bounded soak test: hostile requests replayed against an mmserve server under concurrent greedy traffic.

It starts a server (or uses `--url`), asks fixed probe prompts greedily, runs one warm-up round (every attack
once, next to normal traffic), reads the server's memory, then for `--duration` seconds runs normal chat and
completion traffic (streaming and not, temperature 0) on `--concurrency` workers while one attacker replays the
attacks of docs/hostile.md in turn. Afterwards it checks that nothing is left running, the KV pool is free, the
server and its engine process are alive, memory is flat, and the probes' answers are unchanged. It prints one
table and exits 1 when a check fails (2 when the soak could not run at all).

    python scripts/soak_hostile.py --duration 30                        # the default model (SmolLM2)
    python scripts/soak_hostile.py --build-tiny-vl /tmp/tiny-vl         # a tiny random Qwen2-VL: media attacks too
    python scripts/soak_hostile.py --url http://127.0.0.1:30000         # a server already running

Every loop is bounded in time and in count, and every request has a finite timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
BIG = str(2**64)  # one past the largest unsigned 64-bit integer
HUGE = str(10**30)
GREEDY_TOKENS = 16
PROBES = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
NORMAL_PROMPTS = ["Write a haiku about the sea.", "What is 2 + 2?", "Name three colors.", "Say hello in French."]
NORMAL_FLAVOURS = ["chat", "chat-stream", "completion", "completion-stream"]

REQUEST_TIMEOUT_S = 120.0  # the longest the soak waits for any one answer
ATTACK_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 10.0
IDLE_WAIT_S = 30.0  # how long the server may take to become idle once the traffic stops
START_TIMEOUT_S = 600.0
HEALTH_SLOW_S = 2.0  # /health slower than this while a 20 MB prompt is processed fails its check
MAX_NORMAL_REQUESTS = 5000
RSS_TOLERANCE = 0.10  # the end RSS may exceed the post-warm-up RSS by this fraction ...
RSS_SLACK_MIB = 64  # ... plus this many MiB (allocator arenas, caches filling up)
DEFAULT_SERVER_ARGS = "--max-running-requests 16 --max-queued-requests 64 --max-total-tokens 16384"


# ----- results -----

@dataclass
class Outcome:
    """One request the soak sent: what came back, and whether that is an acceptable answer."""

    kind: str  # attack name, or "normal:<flavour>"
    label: str  # which variant of the attack
    status: str  # HTTP status, "200/<finish reason>", disconnect, timeout, conn-error
    ok: bool
    detail: str = ""
    latency_s: float = 0.0


@dataclass
class Check:
    name: str
    passed: bool | None  # None: skipped
    detail: str


@dataclass
class Soak:
    """What every attack and worker shares: the client, what is known about the server, the results."""

    client: httpx.AsyncClient
    context_len: int
    media: bool
    outcomes: list[Outcome] = field(default_factory=list)
    health_during_big_prompt: list[float] = field(default_factory=list)
    hung_up_rids: list[str] = field(default_factory=list)  # requests whose client left; aborted if they linger
    streams_started: int = 0

    def record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome


def judge(kind: str, label: str, resp: httpx.Response, started: float, expect_ok: bool = False) -> Outcome:
    """A 2xx with a JSON body, or a 4xx with an OpenAI-shaped JSON error, is acceptable; anything else is not.
    `expect_ok`: the request is valid and only a 2xx will do."""
    latency = time.monotonic() - started
    status = resp.status_code
    try:
        body = resp.json()
    except ValueError:
        return Outcome(kind, label, str(status), False, f"non-JSON body {resp.text[:60]!r}", latency)
    if 200 <= status < 300:
        return Outcome(kind, label, str(status), True, "", latency)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message", "") if isinstance(error, dict) else ""
    ok = 400 <= status < 500 and bool(message) and not expect_ok
    return Outcome(kind, label, str(status), ok, message[:120] or "no OpenAI-shaped error", latency)


def _finish_reason(outcome: Outcome, resp: httpx.Response) -> Outcome:
    """A 200 to a valid request must also have finished by itself (stop or length), not been aborted."""
    if outcome.ok:
        reason = resp.json()["choices"][0]["finish_reason"]
        outcome.detail = f"finish_reason {reason}"
        if reason not in ("stop", "length"):
            outcome.ok, outcome.status = False, f"200/{reason}"
    return outcome


async def send(soak: Soak, kind: str, label: str, method: str, path: str, *, body: object = None,
               raw: str | bytes | None = None, timeout: float = ATTACK_TIMEOUT_S, expect_ok: bool = False,
               headers: dict | None = None) -> Outcome:
    """One request, recorded; `raw` is sent as is (big integers and lone surrogates survive only as raw JSON)."""
    started = time.monotonic()
    try:
        if raw is not None:
            headers = headers or {"content-type": "application/json"}
            resp = await soak.client.request(method, path, content=raw, headers=headers, timeout=timeout)
        else:
            resp = await soak.client.request(method, path, json=body, timeout=timeout)
    except httpx.TimeoutException:
        return soak.record(Outcome(kind, label, "timeout", False, f"no answer in {timeout:.0f} s",
                                   time.monotonic() - started))
    except httpx.TransportError as exc:
        return soak.record(Outcome(kind, label, "conn-error", False, f"{type(exc).__name__}: {exc}",
                                   time.monotonic() - started))
    return soak.record(judge(kind, label, resp, started, expect_ok))


# ----- normal traffic -----

def _chat_body(prompt: str, stream: bool = False, max_tokens: int = GREEDY_TOKENS, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, **extra}


async def normal_request(soak: Soak, flavour: str, prompt: str) -> Outcome:
    """One greedy request that must finish with `stop` or `length`. Every fourth stream is instead cut after
    its first chunk (the `stream_disconnect` attack)."""
    chat, stream = flavour.startswith("chat"), flavour.endswith("stream")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        body = _chat_body(prompt, stream)
    else:
        body = {"prompt": prompt, "max_tokens": GREEDY_TOKENS, "temperature": 0, "stream": stream}
    started = time.monotonic()
    if stream:
        soak.streams_started += 1
        cut = soak.streams_started % 4 == 0
        return await _stream(soak, "stream_disconnect" if cut else f"normal:{flavour}", flavour, path, body, cut)
    kind = f"normal:{flavour}"
    try:
        resp = await soak.client.post(path, json=body, timeout=REQUEST_TIMEOUT_S)
    except httpx.TimeoutException:
        return soak.record(Outcome(kind, flavour, "timeout", False, "", time.monotonic() - started))
    except httpx.TransportError as exc:
        return soak.record(Outcome(kind, flavour, "conn-error", False, str(exc), time.monotonic() - started))
    return soak.record(_finish_reason(judge(kind, flavour, resp, started, expect_ok=True), resp))


async def _stream(soak: Soak, kind: str, label: str, path: str, body: dict, cut: bool) -> Outcome:
    started = time.monotonic()
    reason, done, error = None, False, ""
    try:
        async with soak.client.stream("POST", path, json=body, timeout=REQUEST_TIMEOUT_S) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return soak.record(judge(kind, label, resp, started, expect_ok=True))
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    error = str(event["error"].get("message", "an error event"))[:120]
                    continue
                if cut:  # leaving the block closes the connection mid-stream
                    return soak.record(Outcome(kind, label, "disconnect", True, "", time.monotonic() - started))
                for choice in event.get("choices", []):
                    reason = choice.get("finish_reason") or reason
    except httpx.TimeoutException:
        return soak.record(Outcome(kind, label, "timeout", False, "", time.monotonic() - started))
    except httpx.TransportError as exc:
        return soak.record(Outcome(kind, label, "conn-error", False, str(exc), time.monotonic() - started))
    ok = done and not error and reason in ("stop", "length")
    status = "200" if ok else "200/" + ("error-event" if error else reason or "unfinished")
    return soak.record(Outcome(kind, label, status, ok, error or f"finish_reason {reason}",
                               time.monotonic() - started))


async def normal_worker(soak: Soak, worker: int, deadline: float, budget: list[int]) -> None:
    """Normal requests one after another until the deadline or the shared budget runs out."""
    i = worker
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        await normal_request(soak, NORMAL_FLAVOURS[i % 4], NORMAL_PROMPTS[(i // 4) % len(NORMAL_PROMPTS)])
        i += 1


# ----- attacks (one function each; docs/hostile.md says what the server must answer) -----

async def attack_logprobs_100000(soak: Soak) -> None:
    body = {"text": "Hello there", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 100000}
    await send(soak, "logprobs_top_100000", "generate", "POST", "/generate", body=body)


async def attack_huge_ints(soak: Soak) -> None:
    """Integers past 2^64 - 1 in every integer field, as raw JSON text."""
    msgs = '"messages": [{"role": "user", "content": "hi"}]'
    sp = '"sampling_params": {"max_new_tokens": 4'
    cases = [
        ("chat seed", "/v1/chat/completions", f'{{{msgs}, "max_tokens": 4, "seed": {BIG}}}'),
        ("chat stop_token_ids", "/v1/chat/completions", f'{{{msgs}, "max_tokens": 4, "stop_token_ids": [{BIG}]}}'),
        ("chat top_k", "/v1/chat/completions", f'{{{msgs}, "max_tokens": 4, "top_k": {HUGE}}}'),
        ("chat max_tokens", "/v1/chat/completions", f'{{{msgs}, "max_tokens": {BIG}}}'),
        ("chat top_logprobs", "/v1/chat/completions",
         f'{{{msgs}, "max_tokens": 4, "logprobs": true, "top_logprobs": {BIG}}}'),
        ("generate seed", "/generate", f'{{"text": "hi", {sp}, "seed": {HUGE}}}}}'),
        ("generate stop_token_ids", "/generate", f'{{"text": "hi", {sp}, "stop_token_ids": [{BIG}]}}}}'),
        ("generate top_k", "/generate", f'{{"text": "hi", {sp}, "top_k": {BIG}}}}}'),
        ("generate max_new_tokens", "/generate", f'{{"text": "hi", "sampling_params": {{"max_new_tokens": {BIG}}}}}'),
        ("generate top_logprobs_num", "/generate",
         f'{{"text": "hi", {sp}}}, "return_logprob": true, "top_logprobs_num": {BIG}}}'),
        ("generate input_ids", "/generate", f'{{"input_ids": [1, {BIG}], {sp}}}}}'),
        ("completion max_tokens", "/v1/completions", f'{{"prompt": "hi", "max_tokens": {HUGE}}}'),
        ("completion logprobs", "/v1/completions", f'{{"prompt": "hi", "max_tokens": 4, "logprobs": {BIG}}}'),
    ]
    for label, path, raw in cases:
        await send(soak, "huge_ints", label, "POST", path, raw=raw)


async def attack_prefix_abort(soak: Soak) -> None:
    """`/abort_request {"rid": "chatcmpl"}` while chat requests run: only a request named exactly so (or its n
    copies) may stop; the three victims here must finish by themselves."""
    body = _chat_body("Count slowly from one to fifty.", max_tokens=48, ignore_eos=True)

    async def victim() -> None:
        started = time.monotonic()
        try:
            resp = await soak.client.post("/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        except httpx.HTTPError as exc:
            soak.record(Outcome("prefix_abort", "victim", "conn-error", False, str(exc), time.monotonic() - started))
            return
        soak.record(_finish_reason(judge("prefix_abort", "victim", resp, started, expect_ok=True), resp))

    victims = [asyncio.create_task(victim()) for _ in range(3)]
    await asyncio.sleep(0.5)
    await send(soak, "prefix_abort", "abort", "POST", "/abort_request", body={"rid": "chatcmpl"})
    await asyncio.gather(*victims)


async def attack_big_prompt(soak: Soak) -> None:
    """A 20 MB prompt; /health is polled meanwhile and must stay quick."""
    prompt = "lorem ipsum dolor sit amet " * (20 * 1024 * 1024 // 27)
    big = asyncio.create_task(send(soak, "prompt_20mb", "completion", "POST", "/v1/completions",
                                   body={"prompt": prompt, "max_tokens": 4}, timeout=REQUEST_TIMEOUT_S))
    slowest = 0.0
    for _ in range(int(REQUEST_TIMEOUT_S / 0.1)):
        if big.done():
            break
        started = time.monotonic()
        try:
            await soak.client.get("/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError:
            pass  # a probe that times out counts with its whole wait
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.1)
    await big
    soak.health_during_big_prompt.append(slowest)


async def attack_disconnect_nonstream(soak: Soak) -> None:
    """Non-streaming requests with a large budget whose clients give up after one second: the server must
    abort them (the idle check afterwards finds any that keep generating)."""
    budget = max(16, min(4096, soak.context_len - 64))
    cases = [("chat", "/v1/chat/completions", _chat_body("Tell me a long story.", max_tokens=budget, ignore_eos=True)),
             ("completion", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": budget, "temperature": 0,
                                                "ignore_eos": True})]
    for label, path, body in cases:
        rid = f"soak-hangup-{uuid.uuid4().hex[:12]}"
        soak.hung_up_rids.append(rid)
        outcome = await send(soak, "disconnect_nonstream", label, "POST", path, body={**body, "rid": rid}, timeout=1.0)
        if outcome.status == "timeout":  # the point of the attack: the client hung up
            outcome.status, outcome.ok, outcome.detail = "disconnect", True, ""


async def attack_bad_content(soak: Soak) -> None:
    chat = "/v1/chat/completions"
    await send(soak, "bad_content", 'content ["hi"]', "POST", chat,
               body={"messages": [{"role": "user", "content": ["hi"]}], "max_tokens": 4})
    await send(soak, "bad_content", "template kwarg", "POST", chat,
               body=_chat_body("hi", max_tokens=4, chat_template_kwargs={"template": "x"}))
    await send(soak, "bad_content", "surrogate chat", "POST", chat,
               raw='{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4}')
    await send(soak, "bad_content", "surrogate generate", "POST", "/generate",
               raw='{"text": "a\\ud800b", "sampling_params": {"max_new_tokens": 4}}')
    await send(soak, "bad_content", "surrogate completion", "POST", "/v1/completions",
               raw='{"prompt": "\\udfff", "max_tokens": 4}')


async def attack_malformed(soak: Soak) -> None:
    """Broken JSON, unknown routes and wrong types: all 4xx."""
    chat = "/v1/chat/completions"
    for label, raw in [("truncated json", b'{"messages": ['), ("not json", b"not json at all"), ("empty body", b""),
                       ("binary body", b"\xff\xfe\x00")]:
        await send(soak, "malformed", label, "POST", chat, raw=raw)
    await send(soak, "malformed", "text/plain", "POST", chat, raw='{"messages": []}',
               headers={"content-type": "text/plain"})
    await send(soak, "malformed", "unknown route", "POST", "/v1/nope", body={})
    await send(soak, "malformed", "dot-dot route", "GET", "/../../etc/passwd")
    await send(soak, "malformed", "wrong method", "DELETE", "/generate")
    user = [{"role": "user", "content": "hi"}]
    wrong = [("messages str", chat, {"messages": "hi"}),
             ("max_tokens str", chat, {"messages": user, "max_tokens": "5"}),
             ("temperature str", chat, {"messages": user, "temperature": "hot"}),
             ("role int", chat, {"messages": [{"role": 5, "content": "hi"}]}),
             ("content dict", chat, {"messages": [{"role": "user", "content": {"a": 1}}]}),
             ("image part without url", chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
             ("stop ints", chat, {"messages": user, "stop": [1, 2]}),
             ("prompt int", "/v1/completions", {"prompt": 5}),
             ("prompt [[]]", "/v1/completions", {"prompt": [[]]}),
             ("text int", "/generate", {"text": 5}),
             ("sampling_params str", "/generate", {"text": "hi", "sampling_params": "greedy"}),
             ("temperature list", "/generate", {"text": "hi", "sampling_params": {"temperature": [0]}}),
             ("rid int", "/abort_request", {"rid": 7}),
             ("tokenize list", "/tokenize", {"prompt": ["x"]})]
    for label, path, body in wrong:
        await send(soak, "malformed", label, "POST", path, body=body)


# ----- media attacks (a Qwen2-VL-family server) -----

def _image_url(seed: int = 0, size: int = 64) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _slow_video_url(frames: int = 8, seconds_apart: int = 1000) -> str:
    """An MP4 of `frames` frames at 1/`seconds_apart` fps: its time positions run far past the rotary table."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(1, seconds_apart))
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.time_base = Fraction(seconds_apart, 1)
        for i in range(frames):
            pixels = np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(seconds_apart, 1)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_chat(text: str, **extra: object) -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _image_url(1)}}]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 8, "temperature": 0, **extra}


async def attack_stop_after_image(soak: Soak) -> None:
    """Stop strings when the prompt ends in image placeholders (their ids lie outside the vocabulary)."""
    for label, text in [("generate text+image", f"Describe this.{IMAGE}"), ("generate image only", IMAGE)]:
        body = {"text": text, "image_data": [_image_url(2)],
                "sampling_params": {"max_new_tokens": 8, "temperature": 0, "stop": ["x"]}}
        await send(soak, "stop_after_image", label, "POST", "/generate", body=body)
    body = _image_chat("Look:", stop=["x"], chat_template_kwargs={"add_generation_prompt": False})
    await send(soak, "stop_after_image", "chat no generation prompt", "POST", "/v1/chat/completions", body=body)


async def attack_video_past_rope(soak: Soak) -> None:
    parts = [{"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": _slow_video_url()}}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 8, "temperature": 0}
    await send(soak, "video_past_rope", "8 frames 1000 s apart", "POST", "/v1/chat/completions", body=body)


async def attack_vl_penalties(soak: Soak) -> None:
    """Penalties over a prompt holding image pad ids (outside the vocabulary): a normal answer is expected."""
    for label, extra in [("repetition_penalty", {"repetition_penalty": 1.3}),
                         ("frequency+presence", {"frequency_penalty": 1.0, "presence_penalty": 1.0})]:
        await send(soak, "vl_penalties", label, "POST", "/v1/chat/completions",
                   body=_image_chat("What is it?", **extra), expect_ok=True)


@dataclass
class Attack:
    name: str
    run: Callable[[Soak], Awaitable[None]]
    limit: int  # most times it runs in one soak, the warm-up round included
    media: bool = False


ATTACKS = [
    Attack("logprobs_top_100000", attack_logprobs_100000, limit=10),
    Attack("huge_ints", attack_huge_ints, limit=10),
    Attack("prefix_abort", attack_prefix_abort, limit=6),
    Attack("prompt_20mb", attack_big_prompt, limit=2),
    Attack("disconnect_nonstream", attack_disconnect_nonstream, limit=2),
    Attack("bad_content", attack_bad_content, limit=10),
    Attack("malformed", attack_malformed, limit=10),
    Attack("stop_after_image", attack_stop_after_image, limit=10, media=True),
    Attack("video_past_rope", attack_video_past_rope, limit=4, media=True),
    Attack("vl_penalties", attack_vl_penalties, limit=6, media=True),
]


async def attacker(soak: Soak, attacks: list[Attack], done: Counter, deadline: float,
                   rounds: int | None = None) -> None:
    """Every attack in turn until the deadline, `rounds` passes, or every attack's limit is spent."""
    for _ in range(rounds or max(a.limit for a in attacks)):
        for attack in attacks:
            if time.monotonic() >= deadline:
                return
            if done[attack.name] >= attack.limit:
                continue
            done[attack.name] += 1
            try:
                await attack.run(soak)
            except Exception as exc:  # a bug in the attack itself must not end the soak
                soak.record(Outcome(attack.name, "script", "script-error", False, f"{type(exc).__name__}: {exc}"))


# ----- the server: start, inspect, measure -----

@dataclass
class Server:
    url: str
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (graceful: the server stops its engine process), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str | None, server_args: str, workdir: Path) -> Server:
    port = free_port()
    if model_path is None:
        cmd = [sys.executable, "-m", "mmserve.cli", "serve"]
    else:
        cmd = [sys.executable, "-m", "mmserve.launch_server", "--model-path", model_path]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *shlex.split(server_args)]
    log = workdir / "server.log"
    print(f"starting: {shlex.join(cmd)}\n  log: {log}", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, trust_env=False) as client:
        while time.monotonic() < deadline:
            if server.died():
                raise RuntimeError(f"the server exited (code {server.proc.returncode}) while starting")
            try:
                if client.get("/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s")


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def rss_mib(root: int) -> dict[int, float] | None:
    """Resident memory (MiB) of `root` and each of its descendants, from /proc; None if `root` is gone."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found[pid] = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")),
                          0.0)
        todo.extend(c for c in children.get(pid, []) if c not in found)
    return found if root in found else None


async def get_info(client: httpx.AsyncClient) -> dict:
    """/get_server_info, or {} when the server does not answer it."""
    try:
        info = (await client.get("/get_server_info", timeout=HEALTH_TIMEOUT_S)).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[bool, dict]:
    """Poll /get_server_info until nothing runs or waits and no KV is held; returns (idle, last info)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await get_info(client)
        stats = info.get("stats") or {}
        if (info.get("in_flight") == 0 and stats.get("running") == 0 and stats.get("waiting") == 0
                and stats.get("kv_used_tokens") == 0):
            return True, info
        if time.monotonic() > deadline:
            return False, info
        await asyncio.sleep(0.5)


async def ask_probes(client: httpx.AsyncClient, media: bool) -> list[object]:
    """Greedy output ids of the probe prompts (and an image one on a VL server), one at a time."""
    greedy = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS}
    bodies = [{"text": p, "sampling_params": greedy} for p in PROBES]
    if media:
        bodies.append({"text": f"Describe.{IMAGE}", "image_data": [_image_url(3)], "sampling_params": greedy})
    answers: list[object] = []
    for body in bodies:
        try:
            resp = await client.post("/generate", json=body, timeout=REQUEST_TIMEOUT_S)
            answers.append(resp.json().get("output_ids") if resp.status_code == 200 else f"HTTP {resp.status_code}")
        except (httpx.HTTPError, ValueError) as exc:
            answers.append(type(exc).__name__)
    return answers


async def accepts_images(client: httpx.AsyncClient) -> tuple[bool, str]:
    body = {"text": f"Hi{IMAGE}", "image_data": [_image_url(4)], "sampling_params": {"max_new_tokens": 1}}
    try:
        resp = await client.post("/generate", json=body, timeout=ATTACK_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return False, f"the image probe failed ({type(exc).__name__}): media attacks skipped"
    if resp.status_code == 200:
        return True, "the server takes images: media attacks on"
    return False, f"the server refused an image ({resp.status_code}): media attacks skipped"


# ----- the run -----

async def soak_run(server: Server, args: argparse.Namespace) -> tuple[Soak, list[Check], dict[str, float]]:
    timings: dict[str, float] = {}
    pool = args.concurrency + 16
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, limits=limits) as client:
        info = (await client.get("/get_server_info", timeout=HEALTH_TIMEOUT_S)).json()
        context_len = (info.get("engine") or {}).get("context_len") or 2048
        engine_pid = info.get("engine_pid")
        root = server.proc.pid if server.proc is not None else (_ppid(engine_pid) if engine_pid else None)
        media, why = await accepts_images(client)
        print(f"model {info.get('model')}, context {context_len} tokens, engine pid {engine_pid}; {why}", flush=True)
        soak = Soak(client, context_len, media)
        attacks = [a for a in ATTACKS if media or not a.media]
        done: Counter = Counter()

        t = time.monotonic()
        probes_before = await ask_probes(client, media)
        print("warm-up round: every attack once, with normal traffic ...", flush=True)
        deadline = time.monotonic() + 5 * REQUEST_TIMEOUT_S
        budget = [args.concurrency * 2]
        await asyncio.gather(attacker(soak, attacks, done, deadline, rounds=1),
                             *(normal_worker(soak, w, deadline, budget) for w in range(args.concurrency)))
        await _settle(soak, client)
        rss_before = rss_mib(root) if root else None
        timings["warm-up"] = time.monotonic() - t

        print(f"soak: {args.duration:.0f} s, {args.concurrency} workers + 1 attacker ...", flush=True)
        t = time.monotonic()
        deadline = t + args.duration
        budget = [args.max_requests]
        await asyncio.gather(attacker(soak, attacks, done, deadline),
                             *(normal_worker(soak, w, deadline, budget) for w in range(args.concurrency)))
        timings["soak"] = time.monotonic() - t

        t = time.monotonic()
        _, info = await wait_idle(client, IDLE_WAIT_S)
        leftovers = await _settle(soak, client)
        probes_after = await ask_probes(client, media)
        try:
            health = (await client.get("/health", timeout=HEALTH_TIMEOUT_S)).status_code
        except httpx.HTTPError as exc:
            health = type(exc).__name__
        final = await get_info(client)
        rss_after = rss_mib(root) if root else None
        timings["checks"] = time.monotonic() - t

    # a restarted engine reports no stats until it has run something; then the state after the probes counts
    state = info if info.get("stats") else final
    stats = state.get("stats") or {}
    running = [state.get("in_flight"), stats.get("running"), stats.get("waiting")]
    checks = [
        Check("idle: in_flight, running, waiting all 0", running == [0, 0, 0],
              "in_flight {}, running {}, waiting {}".format(*running) + leftovers),
        Check("KV pool free: kv_used_tokens 0", stats.get("kv_used_tokens") == 0,
              f"kv_used_tokens {stats.get('kv_used_tokens')} of {stats.get('kv_total_tokens')}"),
        Check("server alive: /health 200", health == 200 and not server.died(), f"/health -> {health}"),
        _engine_check(engine_pid, final.get("engine_pid"), health == 200),
        _memory_check(rss_before, rss_after, engine_pid, final.get("engine_pid")),
        Check("probe answers unchanged", probes_before == probes_after,
              f"{sum(a == b for a, b in zip(probes_before, probes_after, strict=True))}/{len(probes_before)} same"),
        _normal_check(soak),
        _attack_check(soak),
        _health_check(soak),
    ]
    if server.log is not None:
        n = server.log.read_text(errors="replace").count("Traceback (most recent call last)")
        checks.append(Check("no tracebacks in the server log", n == 0, f"{n} in {server.log}"))
    return soak, checks, timings


async def _settle(soak: Soak, client: httpx.AsyncClient) -> str:
    """Wait for the server to go idle; requests whose client hung up but that still run are then aborted by their
    exact rid, so that what follows (memory, probes) is measured on a quiet server. Says what it aborted."""
    idle, info = await wait_idle(client, IDLE_WAIT_S)
    if idle:
        return ""
    aborted = []
    for rid in soak.hung_up_rids:
        try:
            resp = await client.post("/abort_request", json={"rid": rid}, timeout=HEALTH_TIMEOUT_S)
            aborted.extend(resp.json().get("aborted", []))
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
    await wait_idle(client, IDLE_WAIT_S / 3)
    return f"; then aborted {len(aborted)} hung-up request(s) by rid" if aborted else ""


def _engine_check(before: int | None, now: int | None, healthy: bool) -> Check:
    if now == before:
        return Check("engine process the same", True, f"pid {now}")
    return Check("engine process restarted cleanly", healthy and now is not None,
                 f"pid {before} -> {now}, {'healthy' if healthy else 'unhealthy'}")


def _memory_check(before: dict[int, float] | None, after: dict[int, float] | None, engine_before: int | None,
                  engine_after: int | None) -> Check:
    if before is None or after is None:
        return Check("memory flat", None, "RSS unreadable (the server is not on this machine?)")
    total_before, total_after = sum(before.values()), sum(after.values())
    limit = total_before * (1 + RSS_TOLERANCE) + RSS_SLACK_MIB
    engine = ""
    if engine_before in before and engine_after in after:
        engine = f", engine {before[engine_before]:.0f} -> {after[engine_after]:.0f}"
    return Check("memory flat (server + children RSS)", total_after <= limit,
                 f"{total_before:.0f} -> {total_after:.0f} MiB{engine}; limit {limit:.0f} "
                 f"(+{RSS_TOLERANCE:.0%} + {RSS_SLACK_MIB} MiB)")


def _normal_check(soak: Soak) -> Check:
    normal = [o for o in soak.outcomes if o.kind.startswith("normal:")]
    bad = Counter(o.status for o in normal if not o.ok)
    return Check("normal traffic all finished by itself", bool(normal) and not bad,
                 f"{len(normal) - bad.total()}/{len(normal)} ok" + (f"; failed: {dict(bad)}" if bad else ""))


def _attack_check(soak: Soak) -> Check:
    attacks = [o for o in soak.outcomes if not o.kind.startswith("normal:")]
    bad = Counter(o.kind for o in attacks if not o.ok)
    return Check("attacks answered 4xx JSON or normally", not bad,
                 f"{len(attacks) - bad.total()}/{len(attacks)} ok" + (f"; failed: {dict(bad)}" if bad else ""))


def _health_check(soak: Soak) -> Check:
    name = f"/health < {HEALTH_SLOW_S:.0f} s during a 20 MB prompt"
    if not soak.health_during_big_prompt:
        return Check(name, None, "not run")
    slowest = max(soak.health_during_big_prompt)
    shown = f">= {HEALTH_TIMEOUT_S:.0f} s (timed out)" if slowest >= HEALTH_TIMEOUT_S else f"{slowest:.2f} s"
    return Check(name, slowest < HEALTH_SLOW_S, f"slowest {shown}")


# ----- report -----

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]


def _clip(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _failures(outcomes: list[Outcome]) -> str:
    """Distinct failing variants with their status, then the first error message."""
    bad = [o for o in outcomes if not o.ok]
    seen = ", ".join(dict.fromkeys(f"{o.label} {o.status}" for o in bad))
    first = next((o.detail for o in bad if o.detail), "")
    return f"{seen} ({first[:90]})" if first else seen


def report(soak: Soak, checks: list[Check]) -> str:
    rows: list[tuple[str, ...]] = []
    kinds = sorted({o.kind for o in soak.outcomes}, key=lambda k: (k.startswith("normal:"), k))
    for kind in kinds:
        mine = [o for o in soak.outcomes if o.kind == kind]
        statuses = " ".join(f"{s}:{n}" for s, n in sorted(Counter(o.status for o in mine).items()))
        bad = sum(not o.ok for o in mine)
        result = "ok" if not bad else _clip(f"FAIL {bad}: {_failures(mine)}")
        slowest = f"{max(o.latency_s for o in mine):.1f}"
        section = "normal" if kind.startswith("normal:") else "attack"
        rows.append((section, kind.removeprefix("normal:"), str(len(mine)), slowest, statuses, result))
    done = [o.latency_s for o in soak.outcomes if o.kind.startswith("normal:") and o.ok]
    if done:
        rows.append(("normal", "latency of finished", str(len(done)), "",
                     f"p50 {percentile(done, 50):.2f} s, p99 {percentile(done, 99):.2f} s", ""))
    for check in checks:
        verdict = "skip" if check.passed is None else ("PASS" if check.passed else "FAIL")
        rows.append(("check", check.name, "", "", _clip(check.detail), verdict))
    header = ("section", "what", "sent", "max s", "statuses / detail", "result")
    rows = [header, tuple("-" * len(h) for h in header), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)] + [0]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# ----- tiny VL model -----

def build_tiny_vl(out: Path) -> Path:
    """A tiny random Qwen2-VL (tests/tiny_models.py) with SmolLM2's tokenizer converted from the default GGUF;
    reused when `out` already holds one."""
    model_dir = out / "qwen2_vl"
    if (model_dir / "config.json").exists():
        return model_dir
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_qwen2_vl
    from transformers import AutoTokenizer

    from mmserve.models.loader import default_model_path

    print(f"building a tiny Qwen2-VL in {model_dir} ...", flush=True)
    gguf = Path(default_model_path())
    tok_dir = out / "tokenizer"
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tok_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    return build_tiny_qwen2_vl(tok_dir, model_dir)


# ----- main -----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="Model to serve (default: `mmserve serve`'s SmolLM2).")
    p.add_argument("--vl-model-path", default=None, help="A Qwen2-VL-family folder, served instead of --model-path "
                   "(it answers text too), so the media attacks run as well.")
    p.add_argument("--build-tiny-vl", metavar="DIR", default=None,
                   help="Build a tiny random Qwen2-VL in DIR (or reuse the one there) and serve it.")
    p.add_argument("--url", default=None, help="Use this running server instead of starting one (media attacks "
                   "run if it takes images).")
    p.add_argument("--concurrency", type=int, default=4, help="Workers sending normal traffic (default 4).")
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of soak after the warm-up round (60).")
    p.add_argument("--max-requests", type=int, default=MAX_NORMAL_REQUESTS, help="Most normal requests in the soak.")
    p.add_argument("--server-args", default=DEFAULT_SERVER_ARGS,
                   help=f"Extra flags for the server it starts, one string (default: {DEFAULT_SERVER_ARGS!r}).")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.max_requests < 1:
        p.error("--concurrency, --duration and --max-requests must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.build_tiny_vl:
        args.vl_model_path = str(build_tiny_vl(Path(args.build_tiny_vl)))
        # its tokenizer is SmolLM2's, whose chat template renders text only
        args.server_args += " --chat-template qwen2-vl"
    if args.url:
        server = Server(args.url.rstrip("/"))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="soak-hostile-"))
        server = start_server(args.vl_model_path or args.model_path, args.server_args, workdir)
    try:
        wait_ready(server, timeout=30.0 if args.url else START_TIMEOUT_S)
        print(f"server ready at {server.url} after {time.monotonic() - started:.0f} s", flush=True)
        soak, checks, timings = asyncio.run(soak_run(server, args))
    except (RuntimeError, httpx.HTTPError, ValueError) as exc:
        print(f"soak aborted: {type(exc).__name__}: {exc}", file=sys.stderr)
        if server.log is not None:
            print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        return 2
    finally:
        server.stop()
    print()
    print(report(soak, checks))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    print(f"\ntotal {time.monotonic() - started:.0f} s ({phases})")
    if server.died() and server.proc.returncode != 0:
        print(f"the server exited with code {server.proc.returncode}; log tail:\n{server.log_tail()}")
    failed = [c.name for c in checks if c.passed is False]
    print("FAILED: " + "; ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
