"""Requests that used to kill the engine or leak its slots, replayed against real servers on loopback: each gets a
clear 4xx and the server keeps serving with nothing left running. A dead engine is replaced (in-flight requests get
a 503, later ones are served by the new engine), and a server whose engine keeps dying exits non-zero instead of
living on over a dead engine.

Media attacks on fetching and decoding are in test_hostile_media.py, HTTP-level ones in test_hostile_http.py."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time
from fractions import Fraction

import httpx
import numpy as np
import pytest
from vl_helpers import IMAGE, picture

MSGS = [{"role": "user", "content": "Name three colours of the rainbow."}]
HUGE = 2**64  # one past the largest unsigned 64-bit integer msgpack can carry


def png_data_url(w: int, h: int, seed: int) -> str:
    buf = io.BytesIO()
    picture(w, h, seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def server_info(server) -> dict:
    return httpx.get(server.url + "/get_server_info", timeout=5).json()


def assert_idle_and_serving(server, timeout: float = 15) -> None:
    """Nothing in flight, no KV held, /health ok, and a normal request still answered."""
    deadline = time.monotonic() + timeout
    while True:
        info = server_info(server)
        stats = info["stats"] or {}
        idle = info["in_flight"] == 0 and stats.get("running", 0) == 0 and stats.get("kv_used_tokens", 0) == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, info
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def post_raw(server, path: str, text: str) -> httpx.Response:
    """POST a JSON body given as text, so integers past 64 bits reach the server intact."""
    return httpx.post(server.url + path, content=text.encode(), headers={"Content-Type": "application/json"},
                      timeout=60)


def assert_error(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error


# ----- a text model: the engine-killers and the slot leaks -----


@pytest.fixture(scope="module")
def text_server(start_server, tiny_model_dir):
    return start_server(str(tiny_model_dir("qwen2")), "--max-running-requests", "4", "--max-queued-requests", "0")


def test_prompt_top_logprobs_past_the_limit_is_a_400(text_server):
    body = {"text": "hello there", "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 100000,
            "sampling_params": {"max_new_tokens": 2}}
    assert_error(httpx.post(text_server.url + "/generate", json=body, timeout=60), 400, "top_logprobs_num", "20")
    body["top_logprobs_num"] = 20
    ok = httpx.post(text_server.url + "/generate", json=body, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["meta_info"]["input_top_logprobs"][1]) == 20
    assert_idle_and_serving(text_server)


def test_max_logprobs_bounds_every_route(start_server, tiny_model_dir):
    server = start_server(str(tiny_model_dir("qwen2")), "--max-logprobs", "5")
    chat = {"messages": MSGS, "max_tokens": 1, "logprobs": True}
    assert_error(httpx.post(server.url + "/v1/chat/completions", json={**chat, "top_logprobs": 6}, timeout=60),
                 400, "[0, 5]")
    ok = httpx.post(server.url + "/v1/chat/completions", json={**chat, "top_logprobs": 5}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5
    completion = {"prompt": "hi", "max_tokens": 1}
    assert_error(httpx.post(server.url + "/v1/completions", json={**completion, "logprobs": 6}, timeout=60),
                 400, "[0, 5]")
    assert_error(httpx.post(server.url + "/v1/completions", json={**completion, "prompt_logprobs": 6}, timeout=60),
                 400, "[0, 5]")
    body = {"text": "hi", "return_logprob": True, "top_logprobs_num": 6, "sampling_params": {"max_new_tokens": 1}}
    assert_error(httpx.post(server.url + "/generate", json=body, timeout=60), 400, "--max-logprobs")


@pytest.mark.parametrize("field", ["seed", "stop_token_ids", "top_k", "max_new_tokens", "top_logprobs_num"])
def test_integers_past_64_bits_are_400s_and_leak_nothing(text_server, field):
    value = f"[{HUGE}]" if field == "stop_token_ids" else str(HUGE)
    # twice the running + queue capacity: each leaked request would hold a slot for ever
    for _ in range(8):
        resp = post_raw(text_server, "/generate",
                        f'{{"text": "hi", "sampling_params": {{"max_new_tokens": 2, "{field}": {value}}}}}')
        assert_error(resp, 400, field, "out of range")
    chat_field = {"max_new_tokens": "max_tokens", "top_logprobs_num": None}.get(field, field)
    if chat_field is not None:
        resp = post_raw(text_server, "/v1/chat/completions",
                        f'{{"messages": {json.dumps(MSGS)}, "max_tokens": 2, "{chat_field}": {value}}}')
        assert resp.status_code == 400, resp.text
    resp = post_raw(text_server, "/generate", f'{{"text": "hi", "logprob_start_len": {HUGE}}}')
    assert resp.status_code == 400, resp.text
    assert_idle_and_serving(text_server)


def test_a_killed_engine_is_replaced_until_its_restarts_run_out(start_server, tiny_model_dir):
    """One restart allowed: the first death mid-stream ends that stream with an error event and a new engine serves;
    the second is past the limit, and the server exits non-zero."""
    server = start_server(str(tiny_model_dir("qwen2")), "--max-engine-restarts", "1")
    old_pid = server_info(server)["engine_pid"]
    body = {"messages": MSGS, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        os.kill(old_pid, signal.SIGKILL)
        rest = "\n".join(lines)  # the stream ends with an error event, not a hang
    assert '"error"' in rest and "engine" in rest and rest.rstrip().endswith("data: [DONE]")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and httpx.get(server.url + "/health", timeout=5).status_code != 200:
        time.sleep(0.3)
    new_pid = server_info(server)["engine_pid"]
    assert new_pid not in (None, old_pid)
    assert "starting a new engine process" in server.log()
    assert_idle_and_serving(server)
    os.kill(new_pid, signal.SIGKILL)
    assert server.proc.wait(timeout=60) != 0
    assert "the server exits" in server.log()


# ----- a vision-language model: positions, placeholders and penalties -----


@pytest.fixture(scope="module")
def vl_server(start_server, tiny_qwen2_5_vl_dir):
    return start_server(str(tiny_qwen2_5_vl_dir), "--chat-template", "qwen2-vl")


def low_fps_video(frames: int = 8, fps: Fraction = Fraction(1, 1000)) -> str:
    """An MP4 of `frames` small frames declared `1 / fps` seconds apart (1.5 KB for a clip of hours)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            pixels = np.random.RandomState(i).randint(0, 255, (32, 32, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_video_whose_positions_outrun_the_rotary_table_is_a_400(vl_server):
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": low_fps_video()}},
                                             {"type": "text", "text": "What happens?"}]}]
    resp = httpx.post(vl_server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4},
                      timeout=60)
    assert_error(resp, 400, "rotary positions")
    stream = httpx.post(vl_server.url + "/v1/chat/completions",
                        json={"messages": messages, "max_tokens": 4, "stream": True}, timeout=60)
    assert_error(stream, 400, "rotary positions")
    assert_idle_and_serving(vl_server)


def test_stop_strings_after_a_prompt_ending_in_an_image(vl_server):
    body = {"text": "Describe " + IMAGE, "image_data": png_data_url(32, 32, 1),
            "sampling_params": {"max_new_tokens": 4, "stop": ["zz"], "temperature": 0}}
    resp = httpx.post(vl_server.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                             {"type": "image_url", "image_url": {"url": png_data_url(32, 32, 2)}}]}]
    resp = httpx.post(vl_server.url + "/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 4, "stop": ["zz"], "stream": True,
                            "chat_template_kwargs": {"add_generation_prompt": False}}, timeout=60)
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]"), resp.text
    assert '"error"' not in resp.text
    assert_idle_and_serving(vl_server)


def test_penalties_with_an_image(vl_server):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(32, 32, 3)}},
                                             {"type": "text", "text": "What is it?"}]}]
    for extra in ({"repetition_penalty": 1.3}, {"frequency_penalty": 0.5, "presence_penalty": 0.5}):
        resp = httpx.post(vl_server.url + "/v1/chat/completions",
                          json={"messages": messages, "max_tokens": 4, "temperature": 0, **extra}, timeout=60)
        assert resp.status_code == 200, resp.text
    assert_idle_and_serving(vl_server)
