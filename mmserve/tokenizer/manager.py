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
import signal
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
_RESTART_WINDOW_S = 600


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
        self._receiver: asyncio.Task | None = None
        self._generation = 0  # engine processes started so far; each gets its own sockets
        self._restarts: list[float] = []  # monotonic times of recent engine restarts
        self.fatal_error: str | None = None  # set when the server must exit (the engine keeps dying)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromEngine)

    # ----- lifecycle -----

    async def start(self) -> None:
        """Start the engine process and wait until it has loaded the model."""
        self._ctx = zmq.asyncio.Context()
        # The engine process reads the tokenizer from a plain folder: converting it again (e.g. from GGUF)
        # would double the start-up time.
        self._tok_dir = os.path.join(self._dir, "tokenizer")
        self.tokenizer.save_pretrained(self._tok_dir)
        await self._launch()
        self._tasks = [asyncio.create_task(self._watch())]

    async def _launch(self) -> None:
        """Start an engine process on a fresh pair of sockets (nothing queued for a dead engine reaches the next
        one) and wait for its EngineReady."""
        self._generation += 1
        to_engine = f"ipc://{self._dir}/to_engine_{self._generation}"
        from_engine = f"ipc://{self._dir}/from_engine_{self._generation}"
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(to_engine)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(from_engine)
        engine_args = dataclasses.replace(self.args, tokenizer_path=self._tok_dir)
        spawn = multiprocessing.get_context("spawn")
        from mmserve.engine_process import run_engine_process

        self._proc = spawn.Process(target=run_engine_process, name="mmserve-engine", daemon=True,
                                   args=(msgspec.json.encode(dataclasses.asdict(engine_args)).decode(),
                                         to_engine, from_engine, os.getpid()))
        self._proc.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready = None
        while ready is None:
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited during start-up (code {self._proc.exitcode}); "
                                   "see the log above")
            if time.monotonic() > deadline:
                raise RuntimeError("the engine process did not become ready in time")
            if await self._pull.poll(500):
                msg = self._decode(await self._pull.recv())
                if isinstance(msg, EngineReady):
                    ready = msg
        self.info, self.stats = ready, None  # a new engine holds nothing yet
        self.engine_error = None
        self._receiver = asyncio.create_task(self._receive(self._pull))

    async def shutdown(self) -> None:
        self.mm_pool.shutdown(wait=False, cancel_futures=True)
        for task in [*self._tasks, self._receiver]:
            if task is not None:
                task.cancel()
        self._stop_engine()
        if getattr(self, "_ctx", None) is not None:
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_engine(self) -> None:
        """Stop the engine process (if alive) and close its sockets."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        for sock in (getattr(self, "_push", None), getattr(self, "_pull", None)):
            if sock is not None:
                sock.close(linger=0)

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def healthy(self) -> bool:
        """Whether requests can be served: an engine is up and outputs are being received."""
        receiving = self._receiver is not None and not self._receiver.done()
        return self.engine_error is None and self.info is not None and receiving

    # ----- engine traffic -----

    def _decode(self, frame: bytes) -> Any:
        try:
            return self._decoder.decode(frame)
        except msgspec.DecodeError as exc:  # one bad frame is dropped; the loop that reads them must live on
            logger.error("dropped a malformed message from the engine (%d bytes): %s", len(frame), exc)
            return None

    async def _receive(self, pull: zmq.asyncio.Socket) -> None:
        while True:
            msg = self._decode(await pull.recv())
            if not isinstance(msg, OutputBatch):
                continue
            try:
                self._dispatch(msg)
            except Exception:  # noqa: BLE001 - a bug here must not silence every later output
                logger.exception("could not dispatch an output batch from the engine")

    def _dispatch(self, batch: OutputBatch) -> None:
        self.stats = batch.stats
        if self.metrics is not None:
            self.metrics.observe_stats(batch.stats)
        for out in batch.outputs:
            # The last output removes the request: in-flight counts stay right even if nobody reads it.
            q = self._queues.get(out.rid) if out.finished_reason is None else self._queues.pop(out.rid, None)
            if q is not None:
                q.put_nowait(out)

    async def _watch(self) -> None:
        """Notice a dead engine (or a dead receive loop), fail the requests in flight, and start a new engine;
        after `max_engine_restarts` restarts within ten minutes, ask the server to exit with an error instead."""
        while True:
            await asyncio.sleep(0.5)
            proc_alive = self._proc is not None and self._proc.is_alive()
            if proc_alive and self._receiver is not None and not self._receiver.done():
                continue
            if proc_alive:
                self.engine_error = "the engine's output receiver stopped"
                logger.error("%s: %r", self.engine_error, self._receiver.exception() if self._receiver else None)
            else:
                self.engine_error = f"the engine process exited (code {self._proc.exitcode})"
                logger.error("%s; failing %d in-flight requests", self.engine_error, len(self._queues))
            self._fail_in_flight(self.engine_error)
            if self._receiver is not None:
                self._receiver.cancel()
            self._stop_engine()
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S]
            if len(self._restarts) >= self.args.max_engine_restarts:
                self._give_up(f"{self.engine_error}, after {len(self._restarts)} restarts in the last "
                              f"{_RESTART_WINDOW_S // 60} minutes")
                return
            self._restarts.append(now)
            self.engine_error = "the engine is restarting after a failure"
            logger.warning("starting a new engine process (restart %d of at most %d in %d minutes)",
                           len(self._restarts), self.args.max_engine_restarts, _RESTART_WINDOW_S // 60)
            try:
                await self._launch()
            except Exception as exc:  # noqa: BLE001
                self._give_up(f"the engine could not be restarted: {exc}")
                return
            logger.warning("the engine is back")

    def _fail_in_flight(self, reason: str) -> None:
        queues, self._queues = self._queues, {}
        for q in queues.values():
            q.put_nowait(EngineDead(reason))

    def _give_up(self, reason: str) -> None:
        """The engine cannot be kept alive: stop the server (SIGTERM to this process) with `fatal_error` set, so it
        exits non-zero and a supervisor restarts it; /health answers 503 meanwhile."""
        self.fatal_error = self.engine_error = reason
        logger.critical("%s; the server exits", reason)
        os.kill(os.getpid(), signal.SIGTERM)

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
        consumer stops early. Nothing stays registered when submission fails."""
        self.check_capacity()
        if rid in self._queues:
            raise APIError(400, f"duplicate request id {rid!r}")
        try:
            frame = self._encoder.encode(GenerateRequest(rid, input_ids, params.to_dict(),
                                                         logprob_start_len=logprob_start_len, mm_inputs=mm_inputs))
        except (OverflowError, TypeError, msgspec.EncodeError) as exc:  # e.g. an integer past 64 bits
            raise APIError(400, f"the request holds a value out of range: {exc}") from exc
        state = RequestState.create(rid, params, input_ids, self.tokenizer)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        try:
            self._push.send(frame)
        except BaseException:
            self._queues.pop(rid, None)
            raise
        return self._follow(state, q)

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
