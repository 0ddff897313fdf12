"""Engine: the in-process Python API. Runs an EngineCore (model + scheduler) in a background thread and
turns prompts into text with the same front-end logic as the server (mmserve.tokenizer.request_state).

    with Engine(model_path="path/to/model") as engine:
        engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 16})
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import torch

from mmserve.config import ServerArgs
from mmserve.engine_core import EngineCore
from mmserve.layers.pooler import shorten
from mmserve.messages import AbortRequest, GenerateRequest, TokenOutput
from mmserve.models.loader import split_gguf
from mmserve.multimodal.inputs import to_wire
from mmserve.multimodal.processor import media_parts
from mmserve.multimodal.tower_inputs import TWO_TOWER_ARCHITECTURES, TowerInputs
from mmserve.sampling_params import SamplingParams
from mmserve.tokenizer.chat_template import render_chat, resolve_chat_template, validate_messages
from mmserve.tokenizer.embedding_input import check_item, item_conversation
from mmserve.tokenizer.request_state import RequestState

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class Engine:
    """Generate with a model in this process. Keyword arguments are the server's flags (see ServerArgs)."""

    def __init__(self, **kwargs: Any):
        self.args = ServerArgs(**kwargs)
        if self.args.dp_size > 1 or self.args.nnodes > 1:
            raise ValueError("Engine runs one replica on this host: --dp-size and --nnodes are the server's "
                             "(`mmserve serve`)")
        self._followers: list[Any] = []  # the processes of tensor-parallel ranks 1.. (rank 0 is this process)
        self._mirror: Any = None
        self._wire = msgspec.msgpack.Encoder()
        self._inbox: queue.Queue = queue.Queue()
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._prompt_pool: ThreadPoolExecutor | None = None  # processes several prompts' media at once (_encoded)
        self._error: BaseException | None = None
        # The core is built in the thread that steps it. On the CPU, a model stepped from another thread than the
        # one that loaded it ran 1.4x slower on 2 cores (torch's OpenMP team belongs to the loading thread); the
        # engine process does the same (engine_process._serve).
        built = threading.Event()
        self._thread = threading.Thread(target=self._build_and_loop, args=(built,), name="mmserve-scheduler",
                                        daemon=True)
        self._thread.start()
        built.wait()
        if self._error is not None:
            raise self._error
        self.tokenizer = self.core.tokenizer
        self.model_config = self.core.model_config
        self.device = self.core.device
        try:
            self.chat_template = resolve_chat_template(self.args.chat_template, self.tokenizer)
            self.processor = None
            if self.core.is_multimodal:
                from mmserve.multimodal.processor import MultimodalProcessor

                folder, _ = split_gguf(self.core.checkpoint)
                self.processor = MultimodalProcessor(self.args, self.core.processor_spec, self.model_config.hf_config,
                                                     folder)
            self.towers = None  # a two-tower embedder's (CLIP's) images: multimodal/tower_inputs.py
            if TWO_TOWER_ARCHITECTURES.intersection(self.model_config.architectures):
                self.towers = TowerInputs(self.args, split_gguf(self.core.checkpoint)[0])
        except BaseException:  # the scheduler thread already holds the model: stop it and free that first
            self.shutdown()
            raise
        ready = self.core.ready()
        logger.info("engine ready: %s, %s, context %d, KV cache %d tokens", self.args.model_path, ready.dtype,
                    ready.context_len, ready.max_total_tokens)

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    # ----- public API -----

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logits: bool = False,
        image_data: Any = None,
        video_data: Any = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        audio_data: Any = None,
    ) -> dict[str, Any] | list[Any] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict back) or a list of prompts (a list back, in order).

        With `n` > 1 a prompt gives a list of n results. With `stream=True` (one prompt, n == 1) an iterator
        of chunks whose "text" pieces concatenate to the final text. `image_data`: for a vision-language model,
        the images of a single prompt (one, or a list of PIL images, bytes, data/http URLs or allowed paths), whose
        places the prompt marks with the model's image placeholder (see `chat` for the easy way); for a list of
        prompts, a list with each prompt's images (None, one or a list). `video_data` likewise: videos as data/http
        URLs, allowed paths, bytes, or frame arrays [T, H, W, 3] (used as given); `audio_data` likewise: audio clips as
        data/http URLs, allowed paths, bytes, {"data", "format"} (OpenAI's input_audio), or mono float32 arrays at the
        model's sampling rate (used as given). `mm_processor_kwargs`: this call's
        media settings (e.g. `max_pixels`, `fps`; the model family's list, as the server's request field).

        Several prompts with media are processed `--mm-processor-workers` at a time, each submitted once ready."""
        if self.model_config.is_embedding:
            raise ValueError(f"{self.args.model_path} is served as an embedding model: use encode(), not generate()")
        if prompt is not None and input_ids is not None:
            raise ValueError("give either prompt or input_ids, not both")
        if prompt is None and input_ids is None:
            raise ValueError("give a prompt or input_ids")
        single = isinstance(prompt, str) or (input_ids is not None and len(input_ids) > 0
                                             and isinstance(input_ids[0], int))
        if image_data is not None or video_data is not None or audio_data is not None or mm_processor_kwargs:
            prompts = [prompt] if single else prompt
            if prompts is None or not all(isinstance(p, str) for p in prompts):
                raise ValueError("image_data, video_data, audio_data and mm_processor_kwargs go with text prompts")
            settings = self._media_settings(mm_processor_kwargs)
            jobs = list(zip(prompts, _per_prompt(image_data, prompts, single, "image"),
                            _per_prompt(video_data, prompts, single, "video"),
                            _per_prompt(audio_data, prompts, single, "audio"), strict=True))
            count = len(jobs)
        else:
            if single:
                token_lists = [list(input_ids) if input_ids is not None else self._encode(prompt)]
            elif input_ids is not None:
                token_lists = [list(ids) for ids in input_ids]
            else:
                token_lists = [self._encode(p) for p in prompt]
            count, jobs = len(token_lists), None
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * count
        if len(params_list) != count:
            raise ValueError(f"got {len(params_list)} sampling_params for {count} prompts")
        parsed = [SamplingParams.from_dict(p) for p in params_list]
        if stream and (count != 1 or parsed[0].n != 1):
            raise ValueError("stream=True takes one prompt with n == 1")
        # prompts with media are processed on a pool and each is submitted as soon as it is ready, in order, so the
        # engine starts on the first while later ones are still being decoded and resized
        inputs = (self._encoded(jobs, settings) if jobs is not None
                  else ((ids, None) for ids in token_lists))
        groups: list[list[tuple[RequestState, queue.Queue]]] = []
        try:
            for (ids, mm), p in zip(inputs, parsed, strict=True):
                groups.append([self._submit(ids, p.nth_sample(i), return_logits, mm) for i in range(p.n)])
        except BaseException:  # a later prompt's media failed: the ones already submitted must not run on
            for group in groups:
                for state, _ in group:
                    self.abort(state.rid)
            raise
        if stream:
            return self._stream(*groups[0][0])
        results = [[self._wait(*sub) for sub in group] for group in groups]
        results = [group[0] if len(group) == 1 else group for group in results]
        return results[0] if single else results

    def encode(self, prompt: str | list[str] | list[int] | list[list[int]] | dict[str, Any] | list[dict[str, Any]],
               dimensions: int | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Pooled vectors of an embedding model (a score head: one score per label), as OpenAI's embeddings take
        input: a string, token ids or a multimodal item give one result, a list of them a list in order. An item
        `{"text": ..., "image": ...}` (a URL, allowed path, bytes or PIL image) is a multimodal embedder's input
        (tokenizer/embedding_input.py). `dimensions` keeps the first that many values and normalises them again
        (Matryoshka embeddings). A result is {"embedding": [...], "meta_info": {"prompt_tokens": n}}."""
        if not self.model_config.is_embedding:
            raise ValueError(f"{self.args.model_path} is served as a generative model: start the Engine with "
                             "is_embedding=True for embeddings")
        single = isinstance(prompt, (str, dict)) or (isinstance(prompt, list) and bool(prompt)
                                                     and isinstance(prompt[0], int))
        inputs = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not inputs:
            raise ValueError("give a string, token ids, a multimodal item, or a non-empty list of them")
        encoded = [self._embedding_input(p, f"input[{i}]") for i, p in enumerate(inputs)]
        if not all(ids and all(isinstance(t, int) for t in ids) for ids, _ in encoded):
            raise ValueError("each input must be a non-empty string, a non-empty list of token ids or an item")
        pending = []
        for ids, mm in encoded:
            rid, outputs = uuid.uuid4().hex, queue.Queue()
            with self._lock:
                self._queues[rid] = outputs
            self._inbox.put(GenerateRequest(rid, ids, embed=True, mm_inputs=mm))
            pending.append((rid, outputs))
        results = []
        try:
            for rid, outputs in pending:
                out = self._final_output(outputs)
                vector = out.embedding if dimensions is None else shorten(out.embedding, dimensions)
                results.append({"embedding": vector, "meta_info": {"id": rid, "prompt_tokens": out.prompt_tokens}})
        finally:
            for rid, _ in pending[len(results):]:  # a failed one: the others need not run on
                self.abort(rid)
        return results[0] if single else results

    def _embedding_input(self, value: Any, where: str) -> tuple[list[int], Any]:
        """One embedding input as (token ids, wire media inputs or None); an item is rendered as one user turn."""
        if isinstance(value, str):
            return self._encode(value), None
        if not isinstance(value, dict):
            return list(value), None
        check_item(value, where)
        if self.towers is not None:
            if value.get("image") is None:
                return self._encode(value["text"]), None
            if value.get("text"):
                raise ValueError(f"{where}: {self.args.model_path} embeds a text or an image, not both in one input")
            ids, mm = self.towers.image(value["image"], where)
            return ids, to_wire(mm)
        if value.get("image") is not None and self.processor is None:
            raise ValueError(f"{where}: {self.args.model_path} is a text model: it takes no images")
        if self.chat_template is None:
            raise ValueError(f"{where}: an embedding item is rendered by the chat template, and this model has "
                             "none (pass chat_template, e.g. gme-qwen2-vl)")
        text = render_chat(self.tokenizer, item_conversation(value), self.chat_template)
        if value.get("image") is None:
            return self.tokenizer.encode(text, add_special_tokens=False), None
        return self._encode_multimodal(text, [value["image"]], [], [], None)

    def _final_output(self, outputs: queue.Queue) -> TokenOutput:
        """An embedding request's one output; raises its error."""
        while True:
            try:
                out: TokenOutput = outputs.get(timeout=1.0)
            except queue.Empty:
                if self._error is not None:
                    raise RuntimeError(f"the engine stopped: {self._error!r}") from self._error
                continue
            if out.error_status is not None:
                raise (ValueError if out.error_status < 500 else RuntimeError)(out.finished_reason["message"])
            if out.finished_reason is not None:
                return out

    def chat(self, messages: list[dict[str, Any]], sampling_params: dict[str, Any] | None = None,
             stream: bool = False, mm_processor_kwargs: dict[str, Any] | None = None, **template_kwargs: Any):
        """Apply the chat template (with the generation prompt) and generate. Content parts of type image_url
        (url: data/http URL or allowed path) or image (a PIL image) go to the model's processor, with
        `mm_processor_kwargs` as in `generate`."""
        validate_messages(messages)
        media = media_parts(messages)
        if not media:
            if mm_processor_kwargs:
                self._media_settings(mm_processor_kwargs)  # checked (and refused by a text model) all the same
            ids = self.apply_chat_template(messages, **template_kwargs)
            return self.generate(input_ids=ids, sampling_params=sampling_params, stream=stream)
        text = render_chat(self.tokenizer, messages, self.chat_template, **template_kwargs)
        return self.generate(text, sampling_params, stream=stream,
                             image_data=[src for kind, src in media if kind == "image"],
                             video_data=[src for kind, src in media if kind == "video"],
                             audio_data=[src for kind, src in media if kind == "audio"],
                             mm_processor_kwargs=mm_processor_kwargs)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        validate_messages(messages)
        text = render_chat(self.tokenizer, messages, self.chat_template, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def abort(self, rid: str) -> None:
        self._inbox.put(AbortRequest(rid))

    def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._prompt_pool is not None:
            self._prompt_pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "processor", None) is not None:
            self.processor.close()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            logger.warning("the scheduler thread did not stop within 60 s")
        # Drop the model and the KV cache now rather than whenever the Engine object is collected. The model's
        # parameters hold their layers' weight_loader methods, a reference cycle that only the collector frees.
        del self.core
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ----- front end -----

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def _media_settings(self, kwargs: dict[str, Any] | None):
        if not kwargs:
            return None
        if self.processor is None:
            raise ValueError(f"{self.args.model_path} is a text model: it takes no mm_processor_kwargs")
        return self.processor.settings_for(kwargs)

    def _encode_multimodal(self, text: str, images: list[Any], videos: list[Any], audios: list[Any],
                           settings: Any) -> tuple[list[int], Any]:
        media = [("image", x) for x in images] + [("video", x) for x in videos] + [("audio", x) for x in audios]
        if not media:
            return self._encode(text), None
        if self.processor is None:
            raise ValueError(f"{self.args.model_path} is a text model: it takes no images, videos or audio")
        ids, mm = self.processor.process(text, media, settings)
        return ids, to_wire(mm)

    def _encoded(self, jobs: list[tuple[str, list[Any], list[Any], list[Any]]],
                 settings: Any) -> Iterator[tuple[list[int], Any]]:
        """Each (prompt, images, videos, audio clips) as token ids and wire media inputs, in order; with several,
        processed on a pool of --mm-processor-workers threads (decoding and the torchvision processors release the
        GIL)."""
        if len(jobs) == 1:
            yield self._encode_multimodal(*jobs[0], settings)
            return
        if self._prompt_pool is None:
            self._prompt_pool = ThreadPoolExecutor(max(1, self.args.mm_processor_workers),
                                                   thread_name_prefix="mmserve-prompts")
        futures = [self._prompt_pool.submit(self._encode_multimodal, *job, settings) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:  # on a failure, the prompts not yet started are dropped
            for future in futures:
                future.cancel()

    def _submit(self, ids: list[int], params: SamplingParams, return_logits: bool,
                mm_inputs: Any = None) -> tuple[RequestState, queue.Queue]:
        if self._error is not None or self._stopped.is_set():
            raise RuntimeError("the engine is not running") from self._error
        rid = uuid.uuid4().hex
        state = RequestState.create(rid, params, ids, self.tokenizer)
        outputs: queue.Queue = queue.Queue()
        with self._lock:
            self._queues[rid] = outputs
        self._inbox.put(GenerateRequest(rid, ids, params.to_dict(), return_logits=return_logits, mm_inputs=mm_inputs))
        return state, outputs

    def _next(self, state: RequestState, outputs: queue.Queue) -> None:
        """Wait for the request's next output and fold it in; raises the request's error."""
        while True:
            try:
                out: TokenOutput = outputs.get(timeout=1.0)
                break
            except queue.Empty:
                if self._error is not None:
                    raise RuntimeError(f"the engine stopped: {self._error!r}") from self._error
        if out.error_status is not None:  # refused (4xx: the caller's input) or failed in the engine (5xx)
            error = ValueError if out.error_status < 500 else RuntimeError
            raise error(out.finished_reason["message"])
        state.absorb(out)

    def _wait(self, state: RequestState, outputs: queue.Queue) -> dict[str, Any]:
        state.defer_text = True  # the text is read once, at the end
        while not state.finished:
            self._next(state, outputs)
        return state.result()

    def _stream(self, state: RequestState, outputs: queue.Queue) -> Iterator[dict[str, Any]]:
        try:
            while not state.finished:
                self._next(state, outputs)
                yield state.chunk()
        finally:
            if not state.finished:  # the consumer stopped early: free the request's resources
                self.abort(state.rid)

    # ----- scheduler thread -----

    def _build_and_loop(self, built: threading.Event) -> None:
        try:
            if self.args.tp_size > 1:
                self._join_ranks()
            self.core = EngineCore(self.args)
        except BaseException as exc:  # noqa: BLE001 - raised again by __init__ in the caller's thread
            self._error = exc
            self._leave_ranks()
            return
        finally:
            built.set()
        try:
            self._loop()
        finally:
            self._leave_ranks()

    def _join_ranks(self) -> None:
        """Tensor parallelism: start ranks 1.. as processes and make this thread rank 0 of their group."""
        from mmserve.distributed.launch import local_places, rendezvous, start_ranks
        from mmserve.distributed.mirror import Mirror
        from mmserve.distributed.parallel_state import get_cpu_group, init_distributed

        places = local_places(self.args, 0, rendezvous(self.args))
        self._followers = start_ranks(self.args, places[1:])
        self.args = dataclasses.replace(self.args, device=places[0].device)
        init_distributed(0, self.args.tp_size, places[0].init_method, self.args.resolved_device())
        self._mirror = Mirror(get_cpu_group())

    def _leave_ranks(self) -> None:
        """Tell ranks 1.. to stop, wait for them, and leave the process group."""
        if self.args.tp_size == 1:
            return
        from mmserve.distributed.parallel_state import destroy_distributed

        if self._mirror is not None:
            try:
                self._mirror.stop()
            except Exception:  # noqa: BLE001 - a rank that died already ended the broadcast
                logger.warning("the other ranks did not take the stop message", exc_info=True)
        start = time.perf_counter()
        if getattr(self, "core", None) is not None:
            self.core.runner.release_graphs()
        destroy_distributed()  # while the other ranks leave theirs
        left = time.perf_counter() - start
        for proc in self._followers:
            proc.join(timeout=20)
            if proc.is_alive():
                logger.warning("tensor-parallel rank process %d did not exit; killing it", proc.pid)
                proc.kill()
        logger.info("tensor-parallel ranks stopped (process group left in %.1f s, ranks joined in %.1f s)", left,
                    time.perf_counter() - start - left)
        self._followers, self._mirror = [], None

    def _loop(self) -> None:
        core = self.core
        try:
            while not self._stopped.is_set():
                self._take_messages(block=not core.has_work())
                if core.has_work():
                    self._deliver(core.step())
        except BaseException as exc:  # surface the failure to every waiting caller
            logger.exception("scheduler loop failed")
            self._error = exc

    def _take_messages(self, block: bool) -> None:
        """Hand the inbox's messages to the core; with tensor parallelism, to the other ranks first (an empty
        list when there are none, which keeps their loops turning with this one)."""
        msgs = []
        try:
            msgs.append(self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait())
            while True:
                msgs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if self._mirror is not None:
            self._mirror.publish([self._wire.encode(msg) for msg in msgs])
        for msg in msgs:
            self._deliver(self.core.handle(msg))

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            with self._lock:
                q = self._queues.get(out.rid) if out.finished_reason is None else self._queues.pop(out.rid, None)
            if q is not None:
                q.put(out)


def _per_prompt(data: Any, prompts: list[str], single: bool, kind: str) -> list[list[Any]]:
    """Each prompt's list of `kind` items from the user's image_data / video_data: for one prompt, one item or a
    list; for several, a list with one entry per prompt (None, one item or a list)."""
    def as_list(entry: Any) -> list[Any]:
        return [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]

    if single:
        return [as_list(data)]
    if data is None:
        return [[] for _ in prompts]
    if not isinstance(data, (list, tuple)) or len(data) != len(prompts):
        raise ValueError(f"{kind}_data for {len(prompts)} prompts must be a list of {len(prompts)} entries "
                         f"(each None, one {kind} or a list)")
    return [as_list(entry) for entry in data]
