"""TokenizerManager: the API server's side of the engine. It tokenizes, starts the engine process, sends it
requests over ZMQ, and turns the output batches it receives into per-request RequestStates that the HTTP
handlers await. It also watches the engine process, so a crash fails requests instead of hanging them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from mmserve.config import ServerArgs
from mmserve.engine_core import load_tokenizer_for
from mmserve.messages import (
    AbortRequest,
    EngineReady,
    EngineStats,
    FromEngine,
    GenerateRequest,
    OutputBatch,
    WireMultimodal,
)
from mmserve.multimodal.inputs import to_wire
from mmserve.multimodal.processor import MultimodalProcessor
from mmserve.sampling_params import SamplingParams
from mmserve.server.errors import APIError
from mmserve.tokenizer.chat_template import render_chat, resolve_chat_template, validate_messages
from mmserve.tokenizer.request_state import RequestState

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0


def _multimodal_processor(args: ServerArgs) -> MultimodalProcessor | None:
    """The model's media processor when its architecture takes media (found without loading the weights)."""
    from mmserve.config import architectures_of
    from mmserve.models.loader import load_hf_config, resolve_model_path, split_gguf
    from mmserve.models.registry import ModelRegistry

    checkpoint = resolve_model_path(args.model_path, args.revision)
    hf_config = load_hf_config(checkpoint, args.trust_remote_code)
    model_cls = ModelRegistry.resolve(architectures_of(hf_config))
    if not hasattr(model_cls, "multimodal_inputs"):
        return None
    return MultimodalProcessor(args, model_cls, hf_config, split_gguf(checkpoint)[0])


class EngineDead(Exception):
    pass


class TokenizerManager:
    def __init__(self, args: ServerArgs, metrics: Any = None):
        self.args = args
        self.metrics = metrics
        self.tokenizer = load_tokenizer_for(args)
        self.chat_template = resolve_chat_template(args.chat_template, self.tokenizer)
        self.mm_processor = _multimodal_processor(args)
        self.mm_pool = ThreadPoolExecutor(max(1, args.mm_processor_workers), thread_name_prefix="mmserve-media")
        self.info: EngineReady | None = None
        self.stats: EngineStats | None = None
        self.engine_error: str | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._dir = tempfile.mkdtemp(prefix="mmserve-")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromEngine)

    # ----- lifecycle -----

    async def start(self) -> None:
        """Start the engine process and wait until it has loaded the model."""
        self._ctx = zmq.asyncio.Context()
        to_engine, from_engine = f"ipc://{self._dir}/to_engine", f"ipc://{self._dir}/from_engine"
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(to_engine)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(from_engine)
        # The engine process reads the tokenizer from a plain folder: converting it again (e.g. from GGUF)
        # would double the start-up time.
        tok_dir = os.path.join(self._dir, "tokenizer")
        self.tokenizer.save_pretrained(tok_dir)
        engine_args = dataclasses.replace(self.args, tokenizer_path=tok_dir)
        spawn = multiprocessing.get_context("spawn")
        from mmserve.engine_process import run_engine_process

        self._proc = spawn.Process(target=run_engine_process, name="mmserve-engine", daemon=True,
                                   args=(msgspec.json.encode(dataclasses.asdict(engine_args)).decode(),
                                         to_engine, from_engine, os.getpid()))
        self._proc.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while self.info is None:
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited during start-up (code {self._proc.exitcode}); "
                                   "see the log above")
            if time.monotonic() > deadline:
                raise RuntimeError("the engine process did not become ready in time")
            if await self._pull.poll(500):
                msg = self._decoder.decode(await self._pull.recv())
                if isinstance(msg, EngineReady):
                    self.info = msg
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]

    async def shutdown(self) -> None:
        self.mm_pool.shutdown(wait=False, cancel_futures=True)
        for task in self._tasks:
            task.cancel()
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        for sock in (getattr(self, "_push", None), getattr(self, "_pull", None)):
            if sock is not None:
                sock.close(linger=0)
        if getattr(self, "_ctx", None) is not None:
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def healthy(self) -> bool:
        return self.engine_error is None and self.info is not None

    # ----- engine traffic -----

    async def _receive(self) -> None:
        while True:
            msg = self._decoder.decode(await self._pull.recv())
            if not isinstance(msg, OutputBatch):
                continue
            self.stats = msg.stats
            if self.metrics is not None:
                self.metrics.observe_stats(msg.stats)
            for out in msg.outputs:
                # The last output removes the request: in-flight counts stay right even if nobody reads it.
                q = self._queues.get(out.rid) if out.finished_reason is None else self._queues.pop(out.rid, None)
                if q is not None:
                    q.put_nowait(out)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._proc is not None and not self._proc.is_alive():
                self.engine_error = f"the engine process exited (code {self._proc.exitcode})"
                logger.error("%s; failing %d in-flight requests", self.engine_error, len(self._queues))
                for q in self._queues.values():
                    q.put_nowait(EngineDead(self.engine_error))
                return

    # ----- requests -----

    def encode_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        validate_messages(messages)
        text = render_chat(self.tokenizer, messages, self.chat_template, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def check_capacity(self, extra: int = 1) -> None:
        if not self.healthy:
            raise APIError(503, f"the engine is not available: {self.engine_error or 'starting'}")
        limit = self.args.max_queued_requests
        if limit is not None and self.info is not None:
            if len(self._queues) + extra > self.info.max_running_requests + limit:
                raise APIError(503, "the server is at capacity (the waiting queue is full); retry later")

    async def process_media(self, text: str, media: list[tuple[str, Any]]) -> tuple[list[int], WireMultimodal]:
        """Load media and run the model's processor in the worker pool; MediaError/ValueError -> 400."""
        if self.mm_processor is None:
            raise APIError(400, f"{self.args.model_path} is a text model: it takes no images or other media",
                           param="messages")
        loop = asyncio.get_running_loop()
        try:
            ids, mm = await loop.run_in_executor(self.mm_pool, self.mm_processor.process, text, media)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return ids, to_wire(mm)

    def submit(self, rid: str, input_ids: list[int], params: SamplingParams, logprob_start_len: int = -1,
               mm_inputs: WireMultimodal | None = None) -> AsyncIterator[RequestState]:
        """Send a request to the engine now; returns an async iterator of its state after every output.

        Submission is eager (capacity is counted from this moment); the iterator aborts the request if its
        consumer stops early."""
        self.check_capacity()
        if rid in self._queues:
            raise APIError(400, f"duplicate request id {rid!r}")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._push.send(self._encoder.encode(
            GenerateRequest(rid, input_ids, params.to_dict(), logprob_start_len=logprob_start_len,
                            mm_inputs=mm_inputs)))
        return self._follow(RequestState.create(rid, params, input_ids, self.tokenizer), q)

    async def _follow(self, state: RequestState, q: asyncio.Queue) -> AsyncIterator[RequestState]:
        start = last = time.perf_counter()
        try:
            while not state.finished:
                out = await q.get()
                if isinstance(out, EngineDead):
                    raise APIError(503, str(out))
                if out.error_status is not None:
                    raise APIError(out.error_status, out.finished_reason["message"])
                now = time.perf_counter()
                if self.metrics is not None and out.new_token_ids:
                    self.metrics.observe_tokens(first=not state.output_ids, seconds=now - last,
                                                count=len(out.new_token_ids))
                last = now
                state.absorb(out)
                yield state
            if self.metrics is not None:
                self.metrics.observe_finished(state, time.perf_counter() - start)
        finally:
            if not state.finished:
                self.cancel(state.rid)

    def cancel(self, rid: str) -> None:
        """Forget a submitted request and abort it in the engine (no-op once it has finished)."""
        if self._queues.pop(rid, None) is not None and self.healthy:
            self._push.send(self._encoder.encode(AbortRequest(rid)))

    async def abort(self, rid: str) -> None:
        await self._push.send(self._encoder.encode(AbortRequest(rid)))

    def running_ids(self) -> list[str]:
        return list(self._queues)
