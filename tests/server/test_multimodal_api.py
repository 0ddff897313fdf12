"""Images and video through the HTTP server (tiny Qwen2-VL): data URLs give the in-process engine's answer, the prefix
cache recognises a repeated image, per-request media settings (mm_processor_kwargs, in the openai client's
extra_body) change an image's tokens as transformers does, and every bad media input is a 400 while the server keeps
serving: loopback URLs (refused by default, allowed by a flag), file://, invalid base64, non-image bytes, a
decompression bomb, too many images, a prompt too long after expansion, unknown or bad mm_processor_kwargs, and
images sent to a text model."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from mmserve import Engine

GREEDY = {"temperature": 0, "max_tokens": 6}


def png_bytes(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bomb_png(w: int = 15000, h: int = 15000) -> bytes:
    """A valid 1-bit PNG of w x h pixels that compresses to a few KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = (b"\x00" + b"\x00" * ((w + 7) // 8)) * h
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def image_message(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def image_host():
    """A tiny HTTP server on loopback serving one PNG at /cat.png."""
    body = png_bytes(64, 48, 3)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cat.png", body
    server.shutdown()


@pytest.fixture(scope="module")
def vl_server(start_server, tiny_qwen2_vl_dir):
    # images prepared in the engine process (the in-process Engines compared with prepare them in the API side)
    return start_server(str(tiny_qwen2_vl_dir), "--chat-template", "qwen2-vl", "--limit-mm-per-prompt",
                        '{"image": 2}', "--context-length", "160", "--mm-image-prep", "engine")


@pytest.fixture(scope="module")
def client(vl_server):
    return openai.OpenAI(base_url=vl_server.base_url, api_key="none", max_retries=0)


def bad_request(client, messages, match: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=messages, **GREEDY)
    assert match in info.value.body["message"], info.value.body


def test_data_url_image_matches_the_engine(client, tiny_qwen2_vl_dir):
    url = data_url(png_bytes(150, 100, 0))
    resp = client.chat.completions.create(model="m", messages=image_message(url), **GREEDY)
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", chat_template="qwen2-vl") as engine:
        ref = engine.chat(image_message(url), {"temperature": 0, "max_new_tokens": 6})
    assert resp.choices[0].message.content == ref["text"]
    assert resp.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]


def test_video_url_matches_the_engine(client, tiny_qwen2_vl_dir, tmp_path):
    from vl_helpers import video_data_url

    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    resp = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", chat_template="qwen2-vl") as engine:
        ref = engine.chat(messages, {"temperature": 0, "max_new_tokens": 6})
    assert resp.choices[0].message.content == ref["text"]
    assert resp.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"] > 18  # three frame pairs of 6 tokens


def test_same_image_twice_hits_the_prefix_cache(client):
    url = data_url(png_bytes(120, 90, 11))
    first = client.chat.completions.create(model="m", messages=image_message(url), **GREEDY)
    second = client.chat.completions.create(model="m", messages=image_message(url), **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    other = client.chat.completions.create(model="m", messages=image_message(data_url(png_bytes(120, 90, 12))),
                                           **GREEDY)
    assert other.usage.prompt_tokens_details.cached_tokens < 20  # the system prompt, not the image


def test_loopback_url_refused_by_default(client, image_host):
    bad_request(client, image_message(image_host[0]), "image 0")


def test_loopback_url_allowed_with_the_flag(start_server, tiny_qwen2_vl_dir, image_host):
    handle = start_server(str(tiny_qwen2_vl_dir), "--chat-template", "qwen2-vl", "--allow-private-media-urls")
    allowed = openai.OpenAI(base_url=handle.base_url, api_key="none", max_retries=0)
    by_url = allowed.chat.completions.create(model="m", messages=image_message(image_host[0]), **GREEDY)
    by_data = allowed.chat.completions.create(model="m", messages=image_message(data_url(image_host[1])), **GREEDY)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content


def test_bad_media_is_a_400_and_the_server_keeps_serving(client, vl_server, tmp_path):
    local = tmp_path / "x.png"
    local.write_bytes(png_bytes(32, 32, 1))
    bad_request(client, image_message(f"file://{local}"), "image 0")
    bad_request(client, image_message(str(local)), "image 0")
    bad_request(client, image_message("data:image/png;base64,%%%not-base64%%%"), "image 0")
    bad_request(client, image_message(data_url(b"this is not an image")), "image 0")
    bad_request(client, image_message(data_url(bomb_png())), "pixels")
    small = data_url(png_bytes(40, 40, 2))
    bad_request(client, image_message(small, small, small), "too many images")
    big = data_url(png_bytes(300, 300, 3))
    bad_request(client, image_message(big, big, text="x " * 100), "after expanding multimodal tokens")
    ok = client.chat.completions.create(model="m", messages=image_message(small), **GREEDY)
    assert ok.choices[0].finish_reason in ("stop", "length") and vl_server.proc.poll() is None


def test_generate_endpoint_takes_image_data(vl_server):
    url = data_url(png_bytes(80, 60, 4))
    text = "Look <|vision_start|><|image_pad|><|vision_end|> here"
    body = {"text": text, "image_data": [url], "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    first = httpx.post(vl_server.url + "/generate", json=body, timeout=60).json()
    again = httpx.post(vl_server.url + "/generate", json=body, timeout=60).json()
    assert len(first["output_ids"]) == 4 and again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1


def image_tokens(model_dir, data: bytes, **kwargs) -> int:
    """How many tokens transformers' processor gives the image, with `kwargs` (min_pixels, max_pixels) as given:
    as the size bounds, which every transformers 5 reads (5.17 ignores a flat max_pixels without min_pixels)."""
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(model_dir)
    own = hf.image_processor.size
    size = {"shortest_edge": kwargs.get("min_pixels", own["shortest_edge"]),
            "longest_edge": kwargs.get("max_pixels", own["longest_edge"])}
    out = hf(text=["<|image_pad|>"], images=[Image.open(io.BytesIO(data)).convert("RGB")], size=size)
    return len(out["input_ids"][0])


def test_mm_processor_kwargs_in_extra_body(client, tiny_qwen2_vl_dir):
    """Per-request pixel bounds change the image's token count as transformers' processor does with them; the same
    settings again reuse the prefix cache (the same image hash), other settings do not."""
    data = png_bytes(150, 100, 21)
    messages = image_message(data_url(data))
    small = {"extra_body": {"mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}}}
    default = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    first = client.chat.completions.create(model="m", messages=messages, **GREEDY, **small)
    again = client.chat.completions.create(model="m", messages=messages, **GREEDY, **small)
    fewer = image_tokens(tiny_qwen2_vl_dir, data) - image_tokens(tiny_qwen2_vl_dir, data, max_pixels=28 * 28 * 4)
    assert fewer > 0 and default.usage.prompt_tokens - first.usage.prompt_tokens == fewer
    assert first.usage.prompt_tokens_details.cached_tokens < 20  # the system prompt, not the image
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    larger = client.chat.completions.create(model="m", messages=messages, **GREEDY,
                                            extra_body={"mm_processor_kwargs": {"min_pixels": 200 * 200}})
    assert larger.usage.prompt_tokens - default.usage.prompt_tokens == (
        image_tokens(tiny_qwen2_vl_dir, data, min_pixels=200 * 200) - image_tokens(tiny_qwen2_vl_dir, data))


def test_bad_mm_processor_kwargs_are_400s(client, vl_server):
    messages = image_message(data_url(png_bytes(40, 40, 22)))
    for kwargs, param, match in [
        ({"max_pixels": 1000, "resample": 0}, "mm_processor_kwargs.resample", "unknown key 'resample'"),
        ({"max_pixels": "1000"}, "mm_processor_kwargs.max_pixels", 'max_pixels must be an integer, got "1000"'),
        ({"max_pixels": 10 ** 9}, "mm_processor_kwargs.max_pixels", "max_pixels must be in [1, 62720]"),
        ({"fps": True}, "mm_processor_kwargs.fps", "fps must be a number"),
        ({"fps": 2, "num_frames": 4}, "mm_processor_kwargs.num_frames", "mutually exclusive"),
        (["max_pixels"], "mm_processor_kwargs", "valid dictionary"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="m", messages=messages, **GREEDY,
                                           extra_body={"mm_processor_kwargs": kwargs})
        assert match in info.value.body["message"] and info.value.body["param"] == param, info.value.body
    body = {"text": "Look <|vision_start|><|image_pad|><|vision_end|>", "image_data": [data_url(png_bytes(40, 40, 23))],
            "mm_processor_kwargs": {"do_resize": False}, "sampling_params": {"max_new_tokens": 2}}
    refused = httpx.post(vl_server.url + "/generate", json=body, timeout=60)
    assert refused.status_code == 400 and "unknown key 'do_resize'" in refused.json()["error"]["message"]
    ok = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    assert ok.choices[0].finish_reason in ("stop", "length") and vl_server.proc.poll() is None


def test_generate_takes_mm_processor_kwargs(vl_server):
    text = "Look <|vision_start|><|image_pad|><|vision_end|> here"
    body = {"text": text, "image_data": [data_url(png_bytes(150, 100, 24))],
            "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
    default = httpx.post(vl_server.url + "/generate", json=body, timeout=60).json()
    small = httpx.post(vl_server.url + "/generate", json={**body, "mm_processor_kwargs": {"max_pixels": 3136}},
                       timeout=60).json()
    assert small["meta_info"]["prompt_tokens"] < default["meta_info"]["prompt_tokens"]


def test_text_model_refuses_images(tiny_text_server):
    text_client = openai.OpenAI(base_url=tiny_text_server.base_url, api_key="none", max_retries=0)
    bad_request(text_client, image_message(data_url(png_bytes(32, 32, 0))), "text model")
    with pytest.raises(openai.BadRequestError, match="text model: it takes no mm_processor_kwargs"):
        text_client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **GREEDY,
                                            extra_body={"mm_processor_kwargs": {"max_pixels": 3136}})


def test_serving_benchmark_with_images(vl_server, capsys):
    from mmserve.bench.serving import main

    metrics = main(["--port", str(vl_server.port), "--dataset", "image", "--image-resolution", "64x48",
                    "--num-prompts", "4", "--input-len", "5", "--output-len", "3", "--max-concurrency", "2"])
    assert metrics["completed"] == 4 and metrics["failed"] == 0
    assert metrics["output_tokens"] == 12 and metrics["mean_ttft_ms"] > 0
    assert "TTFT mean / median / p99" in capsys.readouterr().out
