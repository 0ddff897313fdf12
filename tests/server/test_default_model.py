"""`mmserve serve` with no model serves the real SmolLM2-135M-Instruct (GGUF wheel) and says so."""

import openai


def test_default_model_answers_paris(start_server):
    handle = start_server(None)
    assert "serving the default SmolLM2-135M-Instruct" in handle.log()
    client = openai.OpenAI(base_url=handle.base_url, api_key="none")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=24)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=24,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == resp.choices[0].message.content
    assert handle.stop() == 0
