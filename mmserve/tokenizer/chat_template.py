"""Chat templates: the registry of named jinja templates behind `--chat-template NAME`, resolving the flag (a
name, a `.jinja` file, or nothing for the tokenizer's own template), shaping OpenAI-style messages for the template
at hand, rendering a conversation through `tokenizer.apply_chat_template` (`continue_final_message` included), and
validating messages before they reach a template.

Every named template follows Hugging Face's conventions (`messages`, `add_generation_prompt`; content is a
string or a list of parts), so a name, a file and a model's own template are interchangeable. Text parts of a
list are concatenated; image, video and audio parts become the family's placeholder token, which the multimodal
processor later expands. A family without a placeholder refuses media with an error instead of silently
dropping it. Each template writes its family's control tokens (BOS included) as literals, so the text is right
for that family whatever the loaded tokenizer calls its special tokens; the engine therefore encodes the
rendered text with `add_special_tokens=False`.

Every tag uses jinja's `-` whitespace control, so a template renders the same in transformers' environment
(`trim_blocks`, `lstrip_blocks`) and in a plain one.

Templates from the Hub read content in one of two shapes (`content_format`, found once per template from its
syntax tree): "string" templates concatenate `message['content']` (SmolLM2, Llama 3, Qwen2.5), "openai" ones loop
over its parts (Qwen2-VL, and every named template here). `render_chat` renders a shaped copy of the messages
(`messages_for_template`): text parts newline-joined into a string for the former; for the latter, OpenAI's media
parts in the Hugging Face spelling (`{"type": "image"}`, `"video"`, `"audio"`), which is all a hub template checks
for. The caller's messages stay as they were: the media loader reads its sources from them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2 import nodes

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "developer")
PART_TYPES = ("text", "image_url", "image", "video_url", "video", "input_audio", "audio_url")
# Each media part type -> the Hugging Face spelling templates check for (`content['type'] == 'image'`).
MEDIA_PART_TYPES = {"image_url": "image", "image": "image", "video_url": "video", "video": "video",
                    "input_audio": "audio", "audio_url": "audio", "audio": "audio"}

ContentFormat = Literal["string", "openai"]


# ----- building blocks shared by the templates -----

def _jinja_str(text: str) -> str:
    """`text` as a jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _content_macro(name: str, image: str | None = None, video: str | None = None, audio: str | None = None) -> str:
    """`render_content(content)`: a string as is, or a list of parts with media turned into placeholders."""
    no_media = f"raise_exception('the {name} chat template has no %s placeholder; use the model\\'s own template')"
    image_out = _jinja_str(image) if image is not None else no_media % "image"
    video_out = _jinja_str(video) if video is not None else no_media % "video"
    audio_out = _jinja_str(audio) if audio is not None else no_media % "audio"
    return (
        r"{%- macro render_content(content) -%}"
        r"{%- if content is string -%}{{- content -}}"
        # A missing content (an assistant turn with only tool calls) is Undefined: iterable and empty.
        r"{%- elif content is iterable -%}"
        r"{%- for part in content -%}"
        r"{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        r"{%- elif part['type'] in ['image', 'image_url'] -%}{{- " + image_out + " -}}"
        r"{%- elif part['type'] in ['video', 'video_url'] -%}{{- " + video_out + " -}}"
        r"{%- elif part['type'] in ['audio', 'input_audio', 'audio_url'] -%}{{- " + audio_out + " -}}"
        r"{%- else -%}{{- raise_exception('unsupported content part type: ' ~ part['type']) -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- endif -%}"
        r"{%- endmacro -%}"
    )


# `render_tool_calls(message, first_sep, sep, open, close, args_key)`: OpenAI tool calls as one JSON object per
# call, each wrapped in the family's markers; the arguments arrive as a JSON string from the API or as a dict
# from Python callers.
_TOOL_CALLS_MACRO = (
    r"{%- macro render_tool_calls(message, first_sep, sep, open, close, args_key) -%}"
    r"{%- if message['tool_calls'] is defined -%}"
    r"{%- for call in message['tool_calls'] -%}"
    r"{%- set fn = call['function'] if call['function'] is defined else call -%}"
    r"{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}"
    r"{{- (first_sep if loop.first else sep) ~ open -}}"
    r"{{- '{\"name\": ' ~ (fn['name'] | tojson) ~ ', \"' ~ args_key ~ '\": ' ~ args ~ '}' ~ close -}}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{%- endmacro -%}"
)


def _split_system(name: str) -> str:
    """Set `has_system`, `system_text` and `turns` (the messages after a leading system/developer message).

    For formats that only have a place for one leading system prompt, a system message anywhere else is an
    error rather than something to drop."""
    return (
        r"{%- set has_system = messages[0]['role'] in ['system', 'developer'] -%}"
        r"{%- set system_text = render_content(messages[0]['content']) if has_system else '' -%}"
        r"{%- set turns = messages[1:] if has_system else messages -%}"
        r"{%- for message in turns -%}"
        r"{%- if message['role'] in ['system', 'developer'] -%}"
        f"{{{{- raise_exception('the {name} chat template takes a system message only as the first message') -}}}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
    )


def _alternation_check(name: str) -> str:
    """Inside a loop over `turns`: strict user/assistant alternation, as formats without other roles need."""
    return (
        r"{%- if message['role'] not in ['user', 'assistant'] -%}"
        f"{{{{- raise_exception('the {name} chat template has no ' ~ message['role'] ~ ' role') -}}}}"
        r"{%- endif -%}"
        r"{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        f"{{{{- raise_exception('the {name} chat template needs roles alternating user/assistant/user/..."
        r" (after an optional system message)') -}}"
        r"{%- endif -%}"
    )


# ----- the families -----

def _chatml(name: str, image: str | None = None, video: str | None = None, audio: str | None = None,
            default_system: str | None = None, qwen_tools: bool = False, prompt_end: str = "") -> str:
    """ChatML (`<|im_start|>role\\n...<|im_end|>\\n`). Qwen's flavour injects a default system prompt (Qwen2,
    Qwen2-VL; not Qwen3-Omni) and sends tool results back as a user turn of `<tool_response>` blocks, consecutive
    results merged. `prompt_end` follows the generation prompt (GME's embedder pools the `<|endoftext|>` written
    there)."""
    src = _content_macro(name, image, video, audio) + _TOOL_CALLS_MACRO
    if default_system is not None:
        src += (
            r"{%- if messages[0]['role'] not in ['system', 'developer'] -%}"
            r"{{- '<|im_start|>system\n' ~ " + _jinja_str(default_system) + r" ~ '<|im_end|>\n' -}}"
            r"{%- endif -%}"
        )
    src += r"{%- for message in messages -%}"
    if qwen_tools:
        src += (
            r"{%- if message['role'] == 'tool' -%}"
            r"{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
            r"{{- '\n<tool_response>\n' ~ render_content(message['content']) ~ '\n</tool_response>' -}}"
            r"{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}"
            r"{%- else -%}"
        )
    src += (
        r"{%- set role = 'system' if message['role'] == 'developer' else message['role'] -%}"
        r"{%- set text = render_content(message['content']) -%}"
        r"{{- '<|im_start|>' ~ role ~ '\n' ~ text -}}"
        r"{{- render_tool_calls(message, '\n' if text else '', '\n', '<tool_call>\n', '\n</tool_call>',"
        r" 'arguments') -}}"
        r"{{- '<|im_end|>\n' -}}"
    )
    if qwen_tools:
        src += r"{%- endif -%}"
    src += (
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' ~ " + _jinja_str(prompt_end) + r" -}}"
        r"{%- endif -%}"
    )
    return src


def _llama3(name: str, image: str | None = None) -> str:
    """Llama 3 headers; content is trimmed as Meta's format does; tool results use the `ipython` role."""
    return (
        _content_macro(name, image) + _TOOL_CALLS_MACRO
        + r"{{- '<|begin_of_text|>' -}}"
        r"{%- for message in messages -%}"
        r"{%- set role = {'developer': 'system', 'tool': 'ipython'}.get(message['role'], message['role']) -%}"
        r"{{- '<|start_header_id|>' ~ role ~ '<|end_header_id|>\n\n' -}}"
        r"{{- render_content(message['content']) | trim -}}"
        r"{{- render_tool_calls(message, '', '\n', '', '', 'parameters') -}}"
        r"{{- '<|eot_id|>' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
    )


def _llama2(name: str) -> str:
    """`<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nuser [/INST] answer </s>`: the system prompt lives inside the
    first instruction; the assistant header is the `[/INST]` closing each user turn."""
    return (
        _content_macro(name) + _split_system(name)
        + r"{%- for message in turns -%}"
        + _alternation_check(name)
        + r"{%- if message['role'] == 'user' -%}"
        r"{%- set sys = '<<SYS>>\n' ~ (system_text | trim) ~ '\n<</SYS>>\n\n' if has_system and loop.first else '' -%}"
        r"{{- '<s>[INST] ' ~ sys ~ (render_content(message['content']) | trim) ~ ' [/INST]' -}}"
        r"{%- else -%}"
        r"{{- ' ' ~ (render_content(message['content']) | trim) ~ ' </s>' -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
    )


def _mistral(name: str) -> str:
    """Mistral instruct (`<s>[INST] user [/INST] answer</s>`); the format has no system role, so a system
    prompt opens the first instruction. Images are Pixtral's `[IMG]`."""
    return (
        _content_macro(name, image="[IMG]") + _split_system(name)
        + r"{{- '<s>' -}}"
        r"{%- for message in turns -%}"
        + _alternation_check(name)
        + r"{%- if message['role'] == 'user' -%}"
        r"{%- set sys = (system_text | trim) ~ '\n\n' if has_system and loop.first else '' -%}"
        r"{{- '[INST] ' ~ sys ~ (render_content(message['content']) | trim) ~ ' [/INST]' -}}"
        r"{%- else -%}"
        r"{{- ' ' ~ (render_content(message['content']) | trim) ~ '</s>' -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
    )


def _gemma(name: str) -> str:
    """Gemma turns (`<start_of_turn>user|model`); no system role, so a system prompt opens the first user
    turn. Images are Gemma 3's `<start_of_image>`."""
    return (
        _content_macro(name, image="<start_of_image>") + _split_system(name)
        + r"{{- '<bos>' -}}"
        r"{%- for message in turns -%}"
        + _alternation_check(name)
        + r"{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        r"{%- set prefix = (system_text | trim) ~ '\n\n' if has_system and loop.first else '' -%}"
        r"{{- '<start_of_turn>' ~ role ~ '\n' ~ prefix ~ (render_content(message['content']) | trim)"
        r" ~ '<end_of_turn>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
    )


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def _vicuna(name: str) -> str:
    """Vicuna v1.1 (`<s>SYSTEM USER: ... ASSISTANT: ...</s>`), also LLaVA 1.5's format; its images are
    `<image>` on a line of their own before the text, as LLaVA was trained."""
    return (
        _content_macro(name, image="<image>\n") + _split_system(name)
        + r"{{- '<s>' ~ ((system_text | trim) if has_system else " + _jinja_str(_VICUNA_SYSTEM) + r") ~ ' ' -}}"
        r"{%- for message in turns -%}"
        + _alternation_check(name)
        + r"{%- if message['role'] == 'user' -%}"
        r"{{- 'USER: ' ~ render_content(message['content']) ~ ' ' -}}"
        r"{%- else -%}"
        r"{{- 'ASSISTANT: ' ~ render_content(message['content']) ~ '</s>' -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def _deepseek(name: str) -> str:
    """DeepSeek V2/V3 chat: the system prompt follows BOS with no header; no tool role here."""
    return (
        _content_macro(name) + _split_system(name)
        + r"{{- '<｜begin▁of▁sentence｜>' ~ system_text -}}"
        r"{%- for message in turns -%}"
        r"{%- if message['role'] == 'user' -%}"
        r"{{- '<｜User｜>' ~ render_content(message['content']) -}}"
        r"{%- elif message['role'] == 'assistant' -%}"
        r"{{- '<｜Assistant｜>' ~ render_content(message['content']) ~ '<｜end▁of▁sentence｜>' -}}"
        r"{%- else -%}"
        f"{{{{- raise_exception('the {name} chat template has no ' ~ message['role'] ~ ' role') -}}}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
    )


def _role_check(name: str) -> str:
    """Inside a loop over `messages`: set `role` (a developer message is a system one) and refuse roles other than
    system, user and assistant, for formats without a tool role."""
    return (
        r"{%- set role = 'system' if message['role'] == 'developer' else message['role'] -%}"
        r"{%- if role not in ['system', 'user', 'assistant'] -%}"
        f"{{{{- raise_exception('the {name} chat template has no ' ~ role ~ ' role') -}}}}"
        r"{%- endif -%}"
    )


def _phi(name: str, sep: str = "\n", image: str | None = None, audio: str | None = None,
         end_of_text: str = "") -> str:
    """Phi-3 (`<|role|>\\n...<|end|>\\n`), system messages included (Phi-3.5 and later use them).
    Phi-4-multimodal writes the same turns without the newlines (`sep`), its media parts in place, and closes a
    conversation not handed to the model (no generation prompt) with `end_of_text`."""
    return (
        _content_macro(name, image=image, audio=audio)
        + r"{%- for message in messages -%}"
        + _role_check(name)
        + r"{{- '<|' ~ role ~ '|>' ~ " + _jinja_str(sep) + r" ~ render_content(message['content']) ~ '<|end|>' ~ "
        + _jinja_str(sep) + r" -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|assistant|>' ~ " + _jinja_str(sep) + r" -}}"
        r"{%- else -%}{{- " + _jinja_str(end_of_text) + r" -}}"
        r"{%- endif -%}"
    )


_GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
_GLM_VIDEO = "<|begin_of_video|><|video|><|end_of_video|>"


def _glm4v(name: str, thinking_switch: bool = False) -> str:
    """GLM-4.1V (`[gMASK]<sop>`, then `<|role|>\\n` before each message; no end-of-turn token: the next role token
    ends a turn), media wrapped in their begin/end tokens where they stand. GLM-4.5V (`thinking_switch`) writes its
    generation prompt without the newline, which the model writes before its thinking, and `enable_thinking=False`
    as "/nothink" after each user turn and an empty think block after the prompt."""
    no_thinking = "(enable_thinking is defined and not enable_thinking)"
    src = (
        _content_macro(name, image=_GLM_IMAGE, video=_GLM_VIDEO)
        + r"{{- '[gMASK]<sop>' -}}"
        r"{%- for message in messages -%}"
        + _role_check(name)
        + r"{{- '<|' ~ role ~ '|>\n' ~ render_content(message['content']) -}}"
    )
    if thinking_switch:
        src += r"{%- if role == 'user' and " + no_thinking + r" -%}{{- '/nothink' -}}{%- endif -%}"
    src += r"{%- endfor -%}{%- if add_generation_prompt -%}"
    if thinking_switch:
        src += r"{{- '<|assistant|>' ~ ('\n<think></think>' if " + no_thinking + r" else '') -}}"
    else:
        src += r"{{- '<|assistant|>\n' -}}"
    return src + r"{%- endif -%}"


# The system prompt transformers' JanusProcessor puts before every prompt (`use_default_system_prompt`, set in the
# converted Janus-Pro checkpoints)
JANUS_SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                       "that the user provides, and assist the user with a variety of tasks using natural "
                       "language.\n\n")


def _janus(name: str) -> str:
    """Janus-Pro: the processor's default system prompt, then the hub template's turns (`<|User|>: ...\\n\\n`,
    `<|Assistant|>: ...<｜end▁of▁sentence｜>`, other roles capitalised). Within a turn, texts are trimmed at the
    turn's ends and joined by a space; an image is `<image_placeholder>` on its own line."""
    return (
        r"{%- macro render_parts(parts) -%}"
        r"{%- if parts is string -%}{{- parts.strip() -}}"
        r"{%- else -%}"
        r"{%- for part in parts -%}"
        r"{%- if part['type'] in ['image', 'image_url'] -%}"
        r"{{- ('' if loop.first else '\n') ~ '<image_placeholder>' ~ ('' if loop.last else '\n') -}}"
        r"{%- elif part['type'] == 'text' -%}"
        r"{%- set text = part['text'].lstrip() if loop.first else part['text'] -%}"
        r"{%- set text = text.rstrip() if loop.last else text -%}"
        r"{{- (' ' if not loop.first and parts[loop.index0 - 1]['type'] == 'text' else '') ~ text -}}"
        r"{%- else -%}"
        f"{{{{- raise_exception('the {name} chat template takes text and image parts only') -}}}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- endif -%}"
        r"{%- endmacro -%}"
        + "{{- " + _jinja_str(JANUS_SYSTEM_PROMPT) + " -}}"
        r"{%- for message in messages -%}"
        r"{%- set role = message['role'] | lower -%}"
        r"{%- if role == 'user' -%}{{- '<|User|>: ' -}}"
        r"{%- elif role == 'assistant' -%}"
        # no space after the header of a final, empty assistant message the prompt ends in
        r"{%- set first = message['content'] if message['content'] is string else message['content'][0] -%}"
        r"{%- set empty = first == '' or (first['type'] == 'text' and first['text'] == '') -%}"
        r"{{- '<|Assistant|>:' ~ ('' if loop.last and not add_generation_prompt and empty else ' ') -}}"
        r"{%- else -%}{{- message['role'] | capitalize ~ ': ' -}}"
        r"{%- endif -%}"
        r"{{- render_parts(message['content']) -}}"
        r"{%- if not loop.last or add_generation_prompt -%}"
        r"{{- '\n\n' if role == 'user' else '<｜end▁of▁sentence｜>' -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|Assistant|>:' -}}{%- endif -%}"
    )


_QWEN_SYSTEM = "You are a helpful assistant."
# InternVL 2.5 / 3 / 3.5's default system prompt (its own chat code and SGLang's `internvl-2-5`)
_INTERNVL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                    "多模态大语言模型。")

_CANONICAL: dict[str, str] = {
    "chatml": _chatml("chatml"),
    "chatml-llava": _chatml("chatml-llava", image="<image>\n", video="<video>\n"),  # LLaVA-OneVision's hub form
    "vicuna_v1.1": _vicuna("vicuna_v1.1"),
    "llama-2": _llama2("llama-2"),
    "llama-3-instruct": _llama3("llama-3-instruct"),
    "llama_3_vision": _llama3("llama_3_vision", image="<|image|>"),
    "qwen": _chatml("qwen", default_system=_QWEN_SYSTEM, qwen_tools=True),
    # SGLang's name for Qwen2/2.5-VL and Qwen3-Omni alike: audio clips take Qwen3-Omni's placeholder
    "qwen2-vl": _chatml("qwen2-vl", image="<|vision_start|><|image_pad|><|vision_end|>",
                        video="<|vision_start|><|video_pad|><|vision_end|>",
                        audio="<|audio_start|><|audio_pad|><|audio_end|>", default_system=_QWEN_SYSTEM,
                        qwen_tools=True),
    # Qwen3-Omni's hub template exactly: qwen2-vl's turns and media without the default system prompt
    "qwen3-omni": _chatml("qwen3-omni", image="<|vision_start|><|image_pad|><|vision_end|>",
                          video="<|vision_start|><|video_pad|><|vision_end|>",
                          audio="<|audio_start|><|audio_pad|><|audio_end|>", qwen_tools=True),
    # gme-Qwen2-VL's embedding prompts (an embedding server renders each input as one user turn)
    "gme-qwen2-vl": _chatml("gme-qwen2-vl", image="<|vision_start|><|image_pad|><|vision_end|>",
                            video="<|vision_start|><|video_pad|><|vision_end|>", default_system=_QWEN_SYSTEM,
                            prompt_end="<|endoftext|>"),
    "internvl-2-5": _chatml("internvl-2-5", image="<IMG_CONTEXT>\n", video="<video>\n",
                            default_system=_INTERNVL_SYSTEM),
    "gemma-it": _gemma("gemma-it"),
    "mistral": _mistral("mistral"),
    "deepseek": _deepseek("deepseek"),
    "phi-3": _phi("phi-3"),
    # the placeholders transformers' Phi4MultimodalProcessor expands (the remote-code `<|image_1|>` spelling is not)
    "phi-4-mm": _phi("phi-4-mm", sep="", image="<|image|>", audio="<|audio|>", end_of_text="<|endoftext|>"),
    "glm-4v": _glm4v("glm-4v"),
    "glm-4.5v": _glm4v("glm-4.5v", thinking_switch=True),
    "janus-pro": _janus("janus-pro"),
}

# Other spellings users bring from SGLang, vLLM and model cards.
TEMPLATE_ALIASES: dict[str, str] = {
    "llama3": "llama-3-instruct",
    "llama-3": "llama-3-instruct",
    "llama-3-chat": "llama-3-instruct",
    "llama-3.2-vision": "llama_3_vision",
    "llama2": "llama-2",
    "llama-2-chat": "llama-2",
    "qwen2": "qwen",
    "qwen2.5": "qwen",
    "qwen2.5-vl": "qwen2-vl",
    "internvl2_5": "internvl-2-5",  # lmdeploy's name
    "gemma": "gemma-it",
    "gemma3": "gemma-it",
    "mistral-instruct": "mistral",
    "pixtral": "mistral",
    "vicuna": "vicuna_v1.1",
    "llava": "vicuna_v1.1",
    "deepseek-v3": "deepseek",
    "phi3": "phi-3",
    "phi4-mm": "phi-4-mm",
    "phi-4-multimodal": "phi-4-mm",
    "glm4v": "glm-4v",
    "glm-4.1v": "glm-4v",
    "glm4.5v": "glm-4.5v",
    "qwen3-omni-moe": "qwen3-omni",
    "janus": "janus-pro",
}

NAMED_TEMPLATES: dict[str, str] = {**_CANONICAL, **{alias: _CANONICAL[t] for alias, t in TEMPLATE_ALIASES.items()}}


# ----- the content shape a template reads -----

class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant tokens), so templates using it
    parse; for reading a template's structure only its body matters."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        return nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True), lineno=lineno)


_PARSER = jinja2.Environment(extensions=[jinja2.ext.loopcontrols, _GenerationTag])
# Filters that keep a list a list (of messages, or of content parts).
_LIST_FILTERS = frozenset({"selectattr", "rejectattr", "select", "reject", "list", "reverse", "sort", "unique"})


def _key(node: nodes.Node) -> Any:
    """The constant a subscript or attribute uses (`x['content']`, `x.content`, `x[0]`), else None."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    return node.arg.value if isinstance(node.arg, nodes.Const) else None


class _ContentReader:
    """Follows what the template's variables hold -- the message list, one message, a message's content, one
    part of it -- through `for` loops, `set`, filters, subscripts and macro arguments, and answers whether the
    template reads content as a list of parts: a loop over a message's content, or a part read by key
    (`message['content'][0]['text']`). A name is given the first role found for it; templates reuse names
    (`content` often holds the rendered string), and a wrong guess only picks the other shape."""

    def __init__(self, tree: nodes.Template):
        self.tree = tree
        self.macros = {m.name: [arg.name for arg in m.args] for m in tree.find_all(nodes.Macro)}
        self.roles: dict[str, str] = {"messages": "messages"}

    def role(self, node: nodes.Node | None) -> str | None:
        """What `node` evaluates to: "messages", "message", "content", "part", or None (anything else)."""
        if isinstance(node, nodes.Name):
            return self.roles.get(node.name)
        if isinstance(node, nodes.Filter) and node.node is not None:
            inner = self.role(node.node)
            if node.name in ("first", "last"):
                return {"messages": "message", "content": "part"}.get(inner)
            return inner if node.name in _LIST_FILTERS and inner in ("messages", "content") else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            inner = self.role(node.node)
            return inner if inner in ("messages", "content") else None
        if isinstance(node, (nodes.Getitem, nodes.Getattr)):
            inner, key = self.role(node.node), _key(node)
            if inner == "messages" and not isinstance(key, str):
                return "message"
            if inner == "message" and key == "content":
                return "content"
            if inner == "content" and not isinstance(key, str):
                return "part"
        return None

    def bind(self, target: nodes.Node | str, role: str | None) -> None:
        name = target if isinstance(target, str) else getattr(target, "name", None)
        if role is not None and isinstance(name, str):
            self.roles.setdefault(name, role)

    def reads_parts(self) -> bool:
        kinds = (nodes.For, nodes.Assign, nodes.Call, nodes.Getitem, nodes.Getattr)
        while True:  # until no variable gains a role: aliases of aliases, macros called with aliases
            known = len(self.roles)
            for node in self.tree.find_all(kinds):
                if isinstance(node, nodes.For):
                    role = self.role(node.iter)
                    if role == "content":
                        return True
                    self.bind(node.target, "message" if role == "messages" else None)
                elif isinstance(node, nodes.Assign):
                    self.bind(node.target, self.role(node.node))
                elif isinstance(node, nodes.Call):
                    params = self.macros.get(getattr(node.node, "name", None), [])
                    for param, arg in zip(params, node.args, strict=False):  # defaults, varargs
                        self.bind(param, self.role(arg))
                    for kw in node.kwargs:
                        if kw.key in params:
                            self.bind(kw.key, self.role(kw.value))
                elif self.role(node.node) == "part" and isinstance(_key(node), str):
                    return True
            if len(self.roles) == known:
                return False


@functools.lru_cache(maxsize=32)
def content_format(template: str) -> ContentFormat:
    """How `template` reads a message's content: "openai" if it handles a list of parts (it loops over the
    content, or reads a part by key), else "string". A template that does not parse is called "string";
    rendering it reports the syntax error."""
    try:
        tree = _PARSER.parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    return "openai" if _ContentReader(tree).reads_parts() else "string"


def _parsed_arguments(calls: Any) -> Any:
    """Tool calls with arguments given as a JSON string (as the OpenAI API sends them) turned into the object they
    spell: templates write them with `arguments | tojson`, which would quote a string once more."""
    if not isinstance(calls, list):
        return calls
    parsed = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                arguments = json.loads(fn["arguments"])
            except ValueError:
                arguments = None
            if isinstance(arguments, dict):
                call = {**call, "function": {**fn, "arguments": arguments}}
        parsed.append(call)
    return parsed


def _flattened(content: list, where: str) -> str:
    """The text parts of `content` newline-joined, for a template that takes a string."""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in MEDIA_PART_TYPES:
            media = MEDIA_PART_TYPES[kind]
            raise ValueError(f"{where}.content[{j}] is {'a' if media == 'video' else 'an'} {media} part, but this "
                             "chat template takes text only (each message's content as one string); serve the model "
                             "with a multimodal template (--chat-template, e.g. qwen2-vl)")
        else:
            raise ValueError(f"{where}.content[{j}] must be a text part for this chat template, got {part!r:.80}")
    return "\n".join(texts)


def _template_part(part: Any) -> Any:
    """A content part as Hugging Face templates expect it: media as `{"type": "image"|"video"|"audio"}` (the
    source stays with the caller's message), anything else as it is."""
    kind = part.get("type") if isinstance(part, dict) else None
    return {"type": MEDIA_PART_TYPES[kind]} if kind in MEDIA_PART_TYPES else part


def messages_for_template(messages: list[Any], fmt: ContentFormat) -> list[Any]:
    """A copy of OpenAI-style `messages` shaped for a template reading content as `fmt` (see `content_format`);
    `messages` itself is left as it is. Shapes not understood here are passed on for the template to judge."""
    shaped = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            shaped.append(message)
            continue
        message = dict(message)
        content = message.get("content")
        if fmt == "string" and isinstance(content, list):
            message["content"] = _flattened(content, f"messages[{i}]")
        elif fmt == "string" and content is None:
            message["content"] = ""  # an assistant turn with only tool calls; `+ message['content']` needs a string
        elif isinstance(content, list):
            message["content"] = [_template_part(part) for part in content]
        if "tool_calls" in message:
            message["tool_calls"] = _parsed_arguments(copy.deepcopy(message["tool_calls"]))
        shaped.append(message)
    return shaped


def _check_continuation(messages: Any, add_generation_prompt: bool | None) -> None:
    """`continue_final_message` continues the last message, which must be the assistant's, with text."""
    if add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true: the first continues "
                         "the last (assistant) message, the second starts a new one")
    last = messages[-1] if isinstance(messages, list) and messages else None
    role = last.get("role") if isinstance(last, dict) else None
    if role != "assistant":
        raise ValueError(f"continue_final_message needs the last message to be an assistant message (the text to "
                         f"continue), got {role!r}")
    content = last.get("content")
    if not (isinstance(content, str) or isinstance(content, list)
            and any(isinstance(p, dict) and p.get("type") == "text" for p in content)):
        raise ValueError("continue_final_message needs text in the last message to continue; it has none")


# ----- public API -----

def list_templates() -> list[str]:
    """Every name `--chat-template` accepts, aliases included, sorted."""
    return sorted(NAMED_TEMPLATES)


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates in one tokenizer: the default one serves chat
        template = template.get("default")
    return template if isinstance(template, str) else None


def resolve_chat_template(spec: str | None, tokenizer: Any) -> str | None:
    """The jinja source for `--chat-template spec`: None -> the tokenizer's own template (None if it has
    none), a registered name -> that template, a `.jinja` path or any existing file -> its text."""
    if spec is None:
        return _tokenizer_template(tokenizer)
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if spec.endswith(".jinja"):
        raise ValueError(f"chat template file {spec!r} does not exist")
    raise ValueError(f"unknown chat template {spec!r}: give a path to a .jinja file or one of "
                     f"{', '.join(list_templates())}")


def render_chat(tokenizer: Any, messages: list[dict], template: str | None, add_generation_prompt: bool | None = None,
                continue_final_message: bool = False, **kwargs: Any) -> str:
    """The prompt text for `messages`, rendered by `template` (jinja source or a registered name; None ->
    the tokenizer's own) from a copy shaped for it (`messages_for_template`). Template failures, such as a format's
    role-order check, become `ValueError`.

    `add_generation_prompt` (default: true unless continuing) ends the prompt with the assistant's header;
    `continue_final_message` instead ends it inside the last message, an assistant one, right after its text
    (the end-of-turn tokens the template writes after it cut off), so the model continues that text.

    Messages are not validated here (models' own templates accept more than `validate_messages` does); the
    API layer calls `validate_messages` first."""
    if template in NAMED_TEMPLATES:
        template = NAMED_TEMPLATES[template]
    if template is None:
        template = _tokenizer_template(tokenizer)
    if template is None:
        raise ValueError(f"this model has no chat template; pass --chat-template NAME (one of "
                         f"{', '.join(list_templates())}) or a path to a .jinja file")
    if continue_final_message:
        _check_continuation(messages, add_generation_prompt)
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    if isinstance(messages, list):
        messages = messages_for_template(messages, content_format(template))
    try:
        # transformers marks the final message's text, renders, and cuts the text at the mark
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except jinja2.TemplateError as e:  # raise_exception, syntax errors, sandbox violations
        raise ValueError(f"chat template failed to render: {e}") from e
    except (TypeError, KeyError, AttributeError) as e:  # a template doing arithmetic on an unexpected value
        raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from e
    except ValueError as e:
        if not continue_final_message:
            raise
        # e.g. a template that rewrites the final message, so its text is not found in the rendering; transformers'
        # message goes on with the whole rendered prompt, which the client does not need back
        raise ValueError(f"continue_final_message: {str(e).splitlines()[0]}") from e


# Variables a template may be given through the API's chat_template_kwargs although the renderer names them too:
# they only reach the template.
_TEMPLATE_VARIABLES = frozenset({"add_generation_prompt", "continue_final_message", "tools", "documents"})
# Names transformers passes on below apply_chat_template (to its jinja renderer, and to jinja's render).
_INNER_ARGUMENTS = frozenset({"conversations", "messages"})


def check_template_kwargs(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """Refuse template variables that would collide with the renderer's own arguments (`render_chat`'s and
    `apply_chat_template`'s, e.g. `messages`, `template`, `tokenize`): they would replace them (or make the call
    fail) instead of reaching the template. `ValueError` names the key."""
    reserved = _INNER_ARGUMENTS.union(*(
        (name for name, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD)
        for fn in (render_chat, tokenizer.apply_chat_template)))
    for key in kwargs:
        if key in reserved - _TEMPLATE_VARIABLES:
            raise ValueError(f"chat_template_kwargs.{key} is not allowed: {key!r} is an argument of the chat "
                             "template renderer itself, not a template variable")


def validate_messages(messages: Any) -> None:
    """Check OpenAI-style chat messages; `ValueError` names the offending field, e.g. `messages[2].role`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ALLOWED_ROLES)}, got {role!r}")
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise ValueError(f"{where}.content is missing (only an assistant message with tool_calls may omit it)")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}.content must be a string or a list of content parts, "
                             f"got {type(content).__name__}")
        for j, part in enumerate(content):
            part_where = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise ValueError(f"{part_where} must be an object with a type, got {type(part).__name__}")
            kind = part.get("type")
            if kind not in PART_TYPES:
                raise ValueError(f"{part_where}.type must be one of {', '.join(PART_TYPES)}, got {kind!r}")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{part_where}.text must be a string")
