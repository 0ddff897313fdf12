"""Error responses of the HTTP server: bad requests (400), the API key (401), unknown routes and methods
(404/405). Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, whether it comes
from request validation, the front end or the engine process, and none of them takes the server down.

One server (a tiny random Qwen2 with SmolLM2's tokenizer, context 1024, `--api-key sk-test`) serves the
whole module; requests go through raw httpx (to control bodies and headers) and the official openai client."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

API_KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT_LEN = 1024  # max_position_embeddings of the tiny models
VOCAB_SIZE = 49152
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    return start_server(str(tiny_model_dir("qwen2")), "--api-key", API_KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as oai:
        yield oai


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def assert_error(response: Any, status: int) -> dict[str, Any]:
    """Check an error response (an httpx response, or an openai `APIStatusError`) is OpenAI-shaped with
    `status`; returns the inner `error` object."""
    if isinstance(response, openai.APIStatusError):
        exc, response = response, response.response
        assert exc.status_code == status, f"{exc.status_code}: {exc.body}"
        assert isinstance(exc.body, dict) and "message" in exc.body, exc.body  # the client unwraps "error"
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error  # as OpenAI's: a string or null
    return error


def chat_error(client: openai.OpenAI, model: str, status: int = 400, **kwargs: Any) -> dict[str, Any]:
    """Send a chat request through the openai client that must fail with `status`; returns the error object."""
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("max_tokens", 4)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, **kwargs)
    return assert_error(info.value, status)


# ----- 400: sampling parameters -----

@pytest.mark.parametrize(("name", "value"), [
    ("temperature", -0.5),
    ("top_p", 0.0),
    ("top_p", 2.0),
    ("n", 0),
    ("presence_penalty", 3.0),
])
def test_bad_sampling_value_names_parameter(client, model, name, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=4, **{name: value})
    error = assert_error(info.value, 400)
    assert name in error["message"], error
    assert error["type"] == "invalid_request_error", error


def test_bad_sampling_value_raw_http(http):
    """The same check without the client's own request building: the raw body as sent."""
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "temperature": -1, "max_tokens": 4})
    error = assert_error(r, 400)
    assert "temperature" in error["message"], error
    assert error["code"] is None, error  # a generic 400 has no code to act on (it was the integer 400)


def test_bad_sampling_value_refused_before_streaming(http):
    """A streaming request with a bad value gets a JSON 400, not a 200 event stream."""
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "temperature": -1, "stream": True})
    error = assert_error(r, 400)
    assert "temperature" in error["message"], error


def test_negative_max_tokens(client, model):
    error = chat_error(client, model, max_tokens=-1)
    assert "max_tokens" in error["message"], error


def test_top_logprobs_out_of_range(client, model):
    error = chat_error(client, model, logprobs=True, top_logprobs=50)
    assert "top_logprobs" in error["message"], error


def test_top_logprobs_without_logprobs(client, model):
    error = chat_error(client, model, top_logprobs=5)
    assert "top_logprobs" in error["message"] and "logprobs" in error["message"], error


def test_invalid_regex(client, model):
    error = chat_error(client, model, extra_body={"regex": "([a-z]+"})
    assert error["param"] == "regex" and "invalid regex" in error["message"], error


# ----- 400: messages -----

@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "robot", "content": "beep"}], "role"),
    ([], "messages"),
    ([{"role": "user"}], "content"),
], ids=["unknown-role", "empty-list", "no-content"])
def test_bad_messages(client, model, messages, needle):
    error = chat_error(client, model, messages=messages)
    assert needle in error["message"], error


def test_unknown_role_raw_http(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "beep"}]})
    error = assert_error(r, 400)
    assert "robot" in error["message"], error


# ----- 400: bodies that are not a request -----

def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    error = assert_error(r, 400)
    assert "JSON" in error["message"], error


@pytest.mark.parametrize("payload", [b"[1, 2, 3]", b'"hello"', b"42", b"null"])
def test_json_not_an_object(http, payload):
    r = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    assert_error(r, 400)


def test_missing_messages_field(http):
    r = http.post("/v1/chat/completions", json={"model": "x"})
    error = assert_error(r, 400)
    assert "messages" in error["message"], error


# ----- 400: the context length -----

def test_prompt_longer_than_context(http, client, model):
    messages = [{"role": "user", "content": "hello " * 1500}]
    count = http.post("/tokenize", json={"messages": messages}).json()["count"]
    assert count > CONTEXT_LEN
    error = chat_error(client, model, messages=messages, max_tokens=None)
    assert str(count) in error["message"] and str(CONTEXT_LEN) in error["message"], error
    assert error["code"] == "context_length_exceeded", error
    assert error["param"] == "messages", error  # a chat request has no "prompt" field to point at


def test_prompt_plus_max_tokens_beyond_context(client, model):
    error = chat_error(client, model, max_tokens=CONTEXT_LEN)
    assert str(CONTEXT_LEN) in error["message"] and "max_tokens" in error["message"], error
    assert error["param"] == "max_tokens", error
    assert error["code"] == "context_length_exceeded", error


def test_completion_prompt_longer_than_context(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="hello " * 1500, max_tokens=4)
    error = assert_error(info.value, 400)
    assert str(CONTEXT_LEN) in error["message"], error


# ----- 400: /v1/completions -----

def test_completion_suffix_not_supported(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hello", suffix="world", max_tokens=4)
    error = assert_error(info.value, 400)
    assert "suffix" in error["message"], error


def test_completion_empty_prompt_list(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=[], max_tokens=4)
    error = assert_error(info.value, 400)
    assert "prompt" in error["message"], error


# ----- 400: SGLang-native and tokenizer routes -----

@pytest.mark.parametrize("body", [
    {"text": "Hello", "input_ids": [1, 2, 3]},
    {},
    {"sampling_params": {"max_new_tokens": 4}},
], ids=["both", "neither", "neither-with-params"])
def test_generate_needs_exactly_one_prompt(http, body):
    error = assert_error(http.post("/generate", json=body), 400)
    assert "text" in error["message"] and "input_ids" in error["message"], error


def test_generate_out_of_vocab_input_id(http):
    r = http.post("/generate", json={"input_ids": [1, VOCAB_SIZE], "sampling_params": {"max_new_tokens": 4}})
    error = assert_error(r, 400)
    assert str(VOCAB_SIZE) in error["message"], error


def test_generate_bad_sampling_params(http):
    r = http.post("/generate", json={"text": "Hello", "sampling_params": {"temperature": -1}})
    error = assert_error(r, 400)
    assert "temperature" in error["message"], error


@pytest.mark.parametrize("tokens", [[VOCAB_SIZE], [-1], [1, 2, 10**9]])
def test_detokenize_out_of_range(http, tokens):
    error = assert_error(http.post("/detokenize", json={"tokens": tokens}), 400)
    assert str(VOCAB_SIZE) in error["message"], error


@pytest.mark.parametrize("body", [{}, {"prompt": "Hi", "messages": HELLO}], ids=["neither", "both"])
def test_tokenize_needs_exactly_one(http, body):
    error = assert_error(http.post("/tokenize", json=body), 400)
    assert "prompt" in error["message"] and "messages" in error["message"], error


# ----- 400: refusals by the engine process, on streaming requests -----

@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"input_ids": [1, VOCAB_SIZE], "stream": True, "sampling_params": {"max_new_tokens": 4}}),
    ("/v1/completions", {"prompt": [1, VOCAB_SIZE], "stream": True, "max_tokens": 4}),
    ("/generate", {"text": "Hello", "logprob_start_len": 100, "stream": True}),
], ids=["generate-oov", "completions-oov", "generate-logprob-start"])
def test_stream_refused_by_engine_is_openai_shaped(server, path, body):
    """The engine refuses these at admission, before any token: the client must get the same JSON 400 as
    without `stream`, not a 200 event stream cut off without a word (or a plain-text 500)."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as fresh:  # a broken stream spoils keep-alive
        r = fresh.post(path, json=body)
    assert_error(r, 400)


# ----- 401 -----

@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("POST", "/generate"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": API_KEY}],
                         ids=["no-header", "wrong-key", "no-bearer"])
def test_auth_required(server, method, path, headers):
    body = {"messages": HELLO, "prompt": "Hi", "text": "Hi"} if method == "POST" else None
    r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
    error = assert_error(r, 401)
    assert error["type"] == "authentication_error", error


def test_auth_error_code_is_a_string(server):
    error = assert_error(httpx.get(server.url + "/v1/models", timeout=30), 401)
    assert error["code"] == "invalid_api_key", error


def test_auth_wrong_key_openai_client(server, model):
    with openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model=model, messages=HELLO, max_tokens=4)
        assert_error(info.value, 401)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert_error(info.value, 401)


def test_health_needs_no_key(server):
    r = httpx.get(server.url + "/health", timeout=30)
    assert r.status_code == 200, r.text


def test_right_key_is_accepted(http):
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["max_model_len"] == CONTEXT_LEN


# ----- 404 / 405 -----

@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("POST", "/v1/nope"), ("GET", "/nope/deeper")])
def test_unknown_route(http, method, path):
    error = assert_error(http.request(method, path), 404)
    assert path in error["message"], error


def test_retrieve_model(client, model, http, tiny_model_dir):
    """GET /v1/models/{id}: the card of the one model served (its id is the model folder's name), and an
    OpenAI-shaped 404 for any other id, hub-style ids with a slash included."""
    assert model == tiny_model_dir("qwen2").name
    card = client.models.retrieve(model)
    assert (card.id, card.object, card.owned_by) == (model, "model", "mmserve")
    assert http.get(f"/v1/models/{model}").json()["max_model_len"] == CONTEXT_LEN
    for unknown in ("gpt-4o", "org/some-model"):
        error = assert_error(http.get(f"/v1/models/{unknown}"), 404)
        assert error["code"] == "model_not_found" and unknown in error["message"], error
        assert model in error["message"], error  # says what is served
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert assert_error(info.value, 404)["code"] == "model_not_found"


def test_unknown_route_openai_client(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/nope", cast_to=object)
    assert_error(info.value, 404)


def test_media_policy_errors_name_the_flag_that_allows_them(tmp_path):
    """What a client is told when the server refuses a media URL or path names the server flag that would allow
    it (the message reaches the client as a 400 from the chat route)."""
    from mmserve.multimodal.media import MediaError, MediaPolicy, load_image

    with pytest.raises(MediaError, match="--allow-private-media-urls"):
        load_image("http://127.0.0.1:9/image.png", MediaPolicy(), label="image 1")
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        load_image(str(tmp_path / "image.png"), MediaPolicy(), label="image 1")


def test_metrics_off_is_openai_shaped(http):
    """The server runs without --enable-metrics: /metrics with the key is a 404 that says so."""
    error = assert_error(http.get("/metrics"), 404)
    assert "metrics" in error["message"], error


def test_wrong_method(http):
    r = http.get("/v1/chat/completions")
    assert r.status_code in (404, 405), r.text
    error = assert_error(r, r.status_code)
    assert "GET" in error["message"], error


# ----- the server survived all of the above -----

def test_server_still_serves(server, client, model, http):
    """After every bad request, a good one still works and the process is alive."""
    completion = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert completion.choices[0].message.content, completion
    assert completion.usage.completion_tokens == 8, completion.usage
    r = http.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200
    assert server.proc.poll() is None, server.log()


def test_wrong_json_types_are_refused_not_coerced(http):
    for field, value in [("top_k", True), ("max_tokens", "5"), ("n", 1.5), ("stream", "yes")]:
        resp = http.post("/v1/chat/completions", json={"messages": HELLO, field: value})
        assert_error(resp, 400)
        assert field in resp.json()["error"]["message"]
