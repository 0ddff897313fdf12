"""Request bodies of the HTTP API (pydantic). Field names follow OpenAI's API, plus SGLang's extras
(top_k, min_p, repetition_penalty, ignore_eos, ...) that clients pass through `extra_body`.
Unknown fields are accepted and ignored, as OpenAI-compatible servers commonly do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


def find_lone_surrogate(value: Any) -> str | None:
    """Where (e.g. `messages[0].content`) the first string holding a lone UTF-16 surrogate is, or None. JSON lets
    a body spell one (`"\\ud800"` without its pair) and Python keeps it, but it is no Unicode text: no tokenizer
    or encoder takes it."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():  # O(1) for an ASCII string: most text skips the encode
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
        elif isinstance(v, dict):
            for key, item in v.items():
                name = str(key).encode("utf-8", "backslashreplace").decode()  # the path itself must encode
                path = f"{where}.{name}" if where else name
                if isinstance(key, str) and find_lone_surrogate(key) is not None:
                    return path
                if isinstance(item, (str, list, dict)):
                    stack.append((path, item))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v) if isinstance(item, (str, list, dict)))
    return None


class _Body(BaseModel):
    # strict: a JSON true is not the integer 1, and "5" is not 5
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _no_lone_surrogates(self) -> _Body:
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        where = find_lone_surrogate({**fields, **(self.__pydantic_extra__ or {})})
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "{where}: the text holds a lone UTF-16 surrogate (a \\ud800-"
                                      "\\udfff escape without its pair), which is not valid Unicode", {"where": where})
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # SGLang extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    json_schema: Any = None
    ebnf: str | None = None
    rid: str | None = None
    logit_bias: dict[str, Any] | None = None  # token id (a string) -> bias in [-100, 100]
    # vLLM extras
    min_tokens: int | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    # vLLM's constrained decoding (older and newer names); beam search is refused with a 400 rather than ignored
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    use_beam_search: bool | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # vLLM's; None: true unless continue_final_message
    continue_final_message: bool = False  # vLLM's: the prompt ends inside the last (assistant) message
    response_format: dict[str, Any] | None = None
    separate_reasoning: bool = True  # SGLang's: with --reasoning-parser, thinking goes to reasoning_content
    tools: list[Any] | None = None
    tool_choice: Any = None  # only "none" so far: tool calling has its own issue
    functions: list[Any] | None = None  # OpenAI's deprecated names for tools and tool_choice: refused
    function_call: Any = None
    media_io_kwargs: dict[str, Any] | None = None  # vLLM's; refused
    # vLLM's: how this request's media are prepared (min_pixels, max_pixels, fps, num_frames, ...; the model family's
    # list, see mmserve.multimodal.processor)
    mm_processor_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class GenerateRequestBody(_Body):
    text: str | list[str] | None = None
    image_data: str | list[str] | None = None  # data/http URLs or allowed paths; the text holds the placeholders
    audio_data: str | list[str] | None = None  # the same for audio clips
    mm_processor_kwargs: dict[str, Any] | None = None  # as in chat completions
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    rid: str | None = None


class TokenizeRequest(_Body):
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Body):
    tokens: list[int] = Field(default_factory=list)
    model: str | None = None


class AbortBody(_Body):
    rid: str


class EmbeddingRequest(_Body):
    """OpenAI's embeddings body; multimodal items `{"text": ..., "image": url}` (one, or a list that may mix them with
    texts) for multimodal embedders (checked in server/embeddings_api.py)."""

    input: str | list[str] | list[int] | list[list[int]] | dict[str, Any] | list[str | dict[str, Any]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    rid: str | None = None


class ClassifyRequest(_Body):
    """vLLM's and SGLang's classify body (`input`), SGLang's older `text`, or chat conversations (`messages`: one, or
    a list of them) that the chat template renders, as a reward model scores them."""

    input: str | list[str] | None = None
    text: str | list[str] | None = None
    messages: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None
    model: str | None = None
    rid: str | None = None


class RerankRequest(_Body):
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = True
    model: str | None = None


FinishReason = Literal["stop", "length", "abort"]
