"""Named chat templates (exact renderings of each format, media placeholders, generation prompts), resolving
`--chat-template`, rendering errors, and message validation, all through SmolLM2's real tokenizer."""

from __future__ import annotations

import jinja2
import jinja2.sandbox
import pytest

from mmserve.tokenizer.chat_template import (
    NAMED_TEMPLATES,
    TEMPLATE_ALIASES,
    check_template_kwargs,
    list_templates,
    render_chat,
    resolve_chat_template,
    validate_messages,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What now?"},
]

TEXT_PARTS = [{"type": "text", "text": "What "}, {"type": "text", "text": "now?"}]

# The text each format's assistant turn starts with; for the [INST] formats it closes the user turn.
ASSISTANT_HEADER = {
    "chatml": "<|im_start|>assistant\n",
    "chatml-llava": "<|im_start|>assistant\n",
    "vicuna_v1.1": "ASSISTANT:",
    "llama-2": " [/INST]",
    "llama-3-instruct": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama_3_vision": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen": "<|im_start|>assistant\n",
    "qwen2-vl": "<|im_start|>assistant\n",
    "gme-qwen2-vl": "<|im_start|>assistant\n<|endoftext|>",  # GME's embedding prompt pools the end-of-text
    "internvl-2-5": "<|im_start|>assistant\n",
    "gemma-it": "<start_of_turn>model\n",
    "mistral": " [/INST]",
    "deepseek": "<｜Assistant｜>",
    "phi-3": "<|assistant|>\n",
    "janus-pro": "<|Assistant|>:",
    "phi-4-mm": "<|assistant|>",
    "glm-4v": "<|assistant|>\n",
    "glm-4.5v": "<|assistant|>",  # the model writes the newline before its thinking
    "qwen3-omni": "<|im_start|>assistant\n",
}
# What a format writes after the last turn when no generation prompt follows.
CONVERSATION_END = {"phi-4-mm": "<|endoftext|>"}


def _canonical(name: str) -> str:
    return TEMPLATE_ALIASES.get(name, name)


def test_registry_has_the_documented_names() -> None:
    assert set(ASSISTANT_HEADER) <= set(list_templates())
    assert list_templates() == sorted(NAMED_TEMPLATES)
    assert NAMED_TEMPLATES["llama3"] == NAMED_TEMPLATES["llama-3-instruct"]
    assert NAMED_TEMPLATES["qwen2"] == NAMED_TEMPLATES["qwen"]


@pytest.mark.parametrize("name", list_templates())
def test_every_template_renders_a_conversation(tokenizer, name: str) -> None:
    header = ASSISTANT_HEADER[_canonical(name)]
    with_prompt = render_chat(tokenizer, CONVERSATION, name, add_generation_prompt=True)
    without = render_chat(tokenizer, CONVERSATION, name, add_generation_prompt=False)
    for text in ("You are terse.", "Hi", "Hello!", "What now?"):
        assert text in with_prompt
    assert with_prompt.endswith(header)
    assert with_prompt.startswith(without.removesuffix(CONVERSATION_END.get(_canonical(name), "")))
    # List-of-parts content renders exactly as the same text given as a string.
    parts = CONVERSATION[:3] + [{"role": "user", "content": TEXT_PARTS}]
    if _canonical(name) == "janus-pro":  # Janus's hub template joins a turn's text parts with a space
        with_prompt = with_prompt.replace("What now?", "What  now?")
    assert render_chat(tokenizer, parts, name) == with_prompt
    # A conversation without a system message renders too.
    assert render_chat(tokenizer, CONVERSATION[1:], name).endswith(header)


EXPECTED = {
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat now?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama-3-instruct": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nWhat now?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma-it": "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
                "<start_of_turn>model\nHello!<end_of_turn>\n"
                "<start_of_turn>user\nWhat now?<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "<s>[INST] You are terse.\n\nHi [/INST] Hello!</s>[INST] What now? [/INST]",
    "vicuna_v1.1": "<s>You are terse. USER: Hi ASSISTANT: Hello!</s>USER: What now? ASSISTANT:",
    "llama-2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] What now? [/INST]",
    "deepseek": "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                "<｜User｜>What now?<｜Assistant｜>",
    "phi-3": "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
             "<|user|>\nWhat now?<|end|>\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_rendering(tokenizer, name: str) -> None:
    assert render_chat(tokenizer, CONVERSATION, name) == EXPECTED[name]


def test_qwen2_vl_image_and_video(tokenizer) -> None:
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/b.mp4"}},
        {"type": "text", "text": "Compare them."},
    ]}]
    # No system message: Qwen's default one is injected.
    assert render_chat(tokenizer, messages, "qwen2-vl") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "Compare them.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("name", "placeholder"), [
    ("chatml-llava", "<image>\n"),
    ("vicuna_v1.1", "<image>\n"),
    ("llama_3_vision", "<|image|>"),
    ("gemma-it", "<start_of_image>"),
    ("mistral", "[IMG]"),
    ("qwen2-vl", "<|vision_start|><|image_pad|><|vision_end|>"),
])
def test_image_placeholders(tokenizer, name: str, placeholder: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert placeholder + "Describe." in render_chat(tokenizer, messages, name)


@pytest.mark.parametrize("name", ["chatml", "llama-3-instruct", "qwen", "phi-3"])
def test_text_templates_refuse_media(tokenizer, name: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    with pytest.raises(ValueError, match="has no image placeholder"):
        render_chat(tokenizer, messages, name)


def test_gemma_vicuna_without_system(tokenizer) -> None:
    assert render_chat(tokenizer, CONVERSATION[1:2], "gemma-it") == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert render_chat(tokenizer, CONVERSATION[1:2], "vicuna_v1.1") == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:")


def test_chatml_matches_smollm2_own_template(tokenizer) -> None:
    # SmolLM2's own template is ChatML plus a default system prompt when the conversation has none, so the two
    # agree exactly when a system message is given and differ only by that prompt otherwise.
    own = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_chat(tokenizer, CONVERSATION, resolve_chat_template("chatml", tokenizer)) == own
    assert render_chat(tokenizer, CONVERSATION, None) == own
    own_no_system = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False, add_generation_prompt=True)
    ours_no_system = render_chat(tokenizer, CONVERSATION[1:], "chatml")
    assert own_no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert own_no_system.endswith(ours_no_system) and own_no_system != ours_no_system


def test_same_output_in_a_plain_jinja_environment(tokenizer) -> None:
    # Whitespace is controlled inside the templates, not by transformers' trim_blocks/lstrip_blocks.
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = raise_exception
    for name in ASSISTANT_HEADER:
        plain = env.from_string(NAMED_TEMPLATES[name]).render(messages=CONVERSATION, add_generation_prompt=True)
        assert plain == render_chat(tokenizer, CONVERSATION, name), name


def test_roles_and_tools(tokenizer) -> None:
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(tokenizer, developer, "chatml").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert render_chat(tokenizer, developer, "gemma-it").startswith("<bos><start_of_turn>user\nBe brief.\n\nHi")

    tool_turns = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "24C"},
    ]
    validate_messages(tool_turns)
    assert render_chat(tokenizer, tool_turns, "qwen") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    llama = render_chat(tokenizer, tool_turns, "llama-3-instruct")
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n18C<|eot_id|>' in llama
    assert '{"name": "weather", "parameters": {"city": "Rome"}}' in llama


@pytest.mark.parametrize(("name", "messages", "match"), [
    ("llama-2", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternating"),
    ("mistral", [{"role": "assistant", "content": "a"}], "alternating"),
    ("gemma-it", [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only as the first"),
    ("gemma-it", [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "has no tool role"),
    ("deepseek", [{"role": "tool", "content": "b"}], "has no tool role"),
    ("chatml", [{"role": "user", "content": [{"type": "input_audio"}]}], "has no audio placeholder"),
])
def test_render_errors_name_the_cause(tokenizer, name: str, messages: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=f"chat template failed to render: .*{match}"):
        render_chat(tokenizer, messages, name)


def test_render_without_any_template(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", None)
    no_template = r"this model has no chat template; pass --chat-template NAME \(one of .*chatml"
    with pytest.raises(ValueError, match=no_template):
        render_chat(tokenizer, CONVERSATION, None)
    assert resolve_chat_template(None, tokenizer) is None


def test_render_syntax_error_is_a_value_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="chat template failed to render"):
        render_chat(tokenizer, CONVERSATION, "{% for m in messages %}{{ m['content'] }")


def test_resolve_chat_template(tokenizer, tmp_path) -> None:
    assert resolve_chat_template(None, tokenizer) == tokenizer.chat_template
    assert resolve_chat_template("gemma-it", tokenizer) == NAMED_TEMPLATES["gemma-it"]
    assert resolve_chat_template("llama3", tokenizer) == NAMED_TEMPLATES["llama-3-instruct"]

    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    template = resolve_chat_template(str(path), tokenizer)
    assert render_chat(tokenizer, CONVERSATION[1:3], template) == "[user] Hi\n[assistant] Hello!\n"

    with pytest.raises(ValueError, match="does not exist"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), tokenizer)
    with pytest.raises(ValueError, match="unknown chat template 'nope'.*chatml.*qwen2-vl"):
        resolve_chat_template("nope", tokenizer)


@pytest.mark.parametrize(("messages", "match"), [
    ([], "messages must be a non-empty list"),
    ("hello", "messages must be a non-empty list"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "robot", "content": "c"}],
     r"messages\[2\]\.role must be one of system, user, assistant, tool, developer, got 'robot'"),
    ([{"content": "a"}], r"messages\[0\]\.role must be one of .*, got None"),
    ([{"role": "user"}], r"messages\[0\]\.content is missing"),
    ([{"role": "assistant", "content": None}], r"messages\[0\]\.content is missing"),
    ([{"role": "user", "content": None, "tool_calls": [{"id": "1"}]}], r"messages\[0\]\.content is missing"),
    ([{"role": "user", "content": 42}], r"messages\[0\]\.content must be a string or a list .*got int"),
    ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content\[0\] must be an object"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "pdf"}]}],
     r"messages\[0\]\.content\[1\]\.type must be one of text, image_url, .*, got 'pdf'"),
    ([{"role": "user", "content": [{"text": "a"}]}], r"messages\[0\]\.content\[0\]\.type must be one of"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\.content\[0\]\.text must be a string"),
])
def test_validate_messages_errors(messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)


def test_validate_messages_accepts_valid_input() -> None:
    validate_messages(CONVERSATION)
    validate_messages([
        {"role": "developer", "content": "x"},
        {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}, {"type": "image"},
            {"type": "video_url", "video_url": {"url": "v"}}, {"type": "video"},
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
            {"type": "audio_url", "audio_url": {"url": "w"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "ok"},
    ])


@pytest.mark.parametrize("key", ["tokenizer", "messages", "template", "conversation", "conversations", "chat_template",
                                 "tokenize", "return_dict", "padding", "tokenizer_kwargs"])
def test_template_kwargs_colliding_with_the_renderer(tokenizer, key: str) -> None:
    with pytest.raises(ValueError, match=f"chat_template_kwargs.{key} is not allowed"):
        check_template_kwargs(tokenizer, {"enable_thinking": False, key: True})


def test_template_kwargs_that_are_template_variables(tokenizer) -> None:
    kwargs = {"enable_thinking": False, "add_generation_prompt": False, "tools": [], "documents": [], "bos_token": "x"}
    check_template_kwargs(tokenizer, kwargs)
    text = render_chat(tokenizer, CONVERSATION, "chatml", **kwargs)
    assert not text.endswith("<|im_start|>assistant\n")


# an embedding template's generation prompt ends after the assistant header (gme's <|endoftext|>): nothing continues it
@pytest.mark.parametrize("name", [name for name in ASSISTANT_HEADER if name != "gme-qwen2-vl"])
def test_continue_final_message_with_every_named_template(tokenizer, name: str) -> None:
    prefill = [*CONVERSATION, {"role": "assistant", "content": "Well, "}]
    text = render_chat(tokenizer, prefill, name, continue_final_message=True)
    # the full rendering cut after the text (the trailing space goes where the template trims content)
    full = render_chat(tokenizer, prefill, name, add_generation_prompt=False)
    # Janus's and GLM-4V's formats close no last turn (the next turn's header would)
    ends_turn = len(full) > len(text) or name in ("janus-pro", "glm-4v", "glm-4.5v")
    assert full.startswith(text) and text.rstrip().endswith("Well,") and ends_turn, (text, full)
    # which is the conversation before it with the generation prompt, and the text
    assert text.startswith(render_chat(tokenizer, CONVERSATION, name).rstrip())


def test_add_generation_prompt_defaults_to_true_unless_continuing(tokenizer) -> None:
    assert render_chat(tokenizer, CONVERSATION, "chatml", add_generation_prompt=None) == EXPECTED["chatml"]
    prefill = [*CONVERSATION, {"role": "assistant", "content": "Fine"}]
    assert render_chat(tokenizer, prefill, "chatml", continue_final_message=True) == (
        render_chat(tokenizer, prefill, "chatml", add_generation_prompt=False).removesuffix("<|im_end|>\n"))


@pytest.mark.parametrize("part", [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                  {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}])
def test_named_templates_name_audio_parts(tokenizer, part: dict) -> None:
    """A template without an audio placeholder refuses a clip by name; qwen2-vl (SGLang's name for Qwen3-Omni too)
    writes Qwen3-Omni's."""
    with pytest.raises(ValueError, match="has no audio placeholder"):
        render_chat(tokenizer, [{"role": "user", "content": [part]}], "llama_3_vision")
    text = render_chat(tokenizer, [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}], "qwen2-vl")
    assert "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Hi<|im_end|>" in text
