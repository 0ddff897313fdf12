"""TokenizerManager: the API server's side of the engine. It tokenizes, starts the engine process, sends it
requests over ZMQ, and turns the output batches it receives into per-request RequestStates that the HTTP
handlers await. It also watches the engine process, so a crash fails requests instead of hanging them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
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

from mmserve.config import ServerArgs, is_embedding_model
from mmserve.engine_core import load_tokenizer_for
from mmserve.messages import (
    AbortRequest,
    EngineReady,
    EngineStats,
    FromEngine,
    GenerateRequest,
    OutputBatch,
    TokenOutput,
    WireMultimodal,
)
from mmserve.multimodal.inputs import to_wire
from mmserve.multimodal.processor import MediaSettings, MediaSettingsError, MultimodalProcessor
from mmserve.sampling_params import SamplingParams
from mmserve.server.errors import APIError
from mmserve.tokenizer.chat_template import render_chat, resolve_chat_template, validate_messages
from mmserve.tokenizer.request_state import RequestState

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0
_RESTART_WINDOW_S = 600


def _model_config_and_processor(args: ServerArgs) -> tuple[Any, MultimodalProcessor | None]:
    """The model's HF config, and its media processor when its architecture takes media (found by architecture
    name in the processor registry, without model code; launch_server refuses an unknown architecture)."""
    from mmserve.config import architectures_of
    from mmserve.models.loader import load_hf_config, resolve_model_path, split_gguf
    from mmserve.multimodal.processors import ProcessorRegistry

    checkpoint = resolve_model_path(args.model_path, args.revision)
    hf_config = load_hf_config(checkpoint, args.trust_remote_code)
    spec = ProcessorRegistry.resolve(architectures_of(hf_config))
    if spec is None:
        return hf_config, None
    return hf_config, MultimodalProcessor(args, spec, hf_config, split_gguf(checkpoint)[0])


class EngineDead(Exception):
    pass


class EngineReplica:
    """One engine: the processes of its tensor-parallel ranks on this host, and the two sockets to its rank 0."""

    def __init__(self, index: int):
        self.index = index
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.push: zmq.asyncio.Socket | None = None
        self.pull: zmq.asyncio.Socket | None = None
        self.receiver: asyncio.Task | None = None
        self.info: EngineReady | None = None
        self.stats: EngineStats | None = None
        self.error: str | None = None
        self.generation = 0  # times started; each start gets its own sockets
        self.restarts: list[float] = []  # monotonic times of recent restarts
        self.load = 0  # requests in flight here

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    @property
    def exit_code(self) -> int | None:
        return next((p.exitcode for p in self.procs if not p.is_alive()), None)

    @property
    def healthy(self) -> bool:
        receiving = self.receiver is not None and not self.receiver.done()
        return self.error is None and self.info is not None and receiving

    def stop(self) -> None:
        """Stop the rank processes (if alive) and close the sockets."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for sock in (self.push, self.pull):
            if sock is not None:
                sock.close(linger=0)


class Balancer:
    """Which replica takes a new request (--load-balance-method): the least loaded healthy one; round robin; or, for
    `prefix`, the replica that last took a prompt with the same first tokens (its prefix cache likely holds them)
    unless it has more than `_PREFIX_SLACK` requests over the least loaded one."""

    _PREFIX_TOKENS = 32
    _PREFIX_SLACK = 8
    _PREFIX_ENTRIES = 65536

    def __init__(self, method: str, replicas: list[EngineReplica]):
        self.method, self.replicas = method, replicas
        self._turn = 0
        self._homes: collections.OrderedDict[int, EngineReplica] = collections.OrderedDict()

    def pick(self, input_ids: list[int]) -> EngineReplica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        ready = [r for r in self.replicas if r.healthy] or self.replicas
        if self.method == "round_robin":
            self._turn += 1
            return ready[self._turn % len(ready)]
        least = min(ready, key=lambda r: r.load)
        if self.method != "prefix" or len(input_ids) < self._PREFIX_TOKENS:
            return least
        key = hash(tuple(input_ids[: self._PREFIX_TOKENS]))
        home = self._homes.get(key)
        if home is None or home not in ready or home.load > least.load + self._PREFIX_SLACK:
            home = least
        self._homes[key] = home
        self._homes.move_to_end(key)
        if len(self._homes) > self._PREFIX_ENTRIES:
            self._homes.popitem(last=False)
        return home


class TokenizerManager:
    def __init__(self, args: ServerArgs, metrics: Any = None):
        self.args = args
        self.metrics = metrics
        self.tokenizer = load_tokenizer_for(args)
        self.chat_template = resolve_chat_template(args.chat_template, self.tokenizer)
        self.hf_config, self.mm_processor = _model_config_and_processor(args)
        # an embedding server pools prompts (/v1/embeddings) and generates nothing; a generative one the reverse
        self.is_embedding = is_embedding_model(args, self.hf_config)
        # Threads that prepare one request's media each: they read headers, look up the processor cache and wait
        # for the processor's workers (--mm-processor-workers) to decode and process what is missing.
        self.mm_pool = ThreadPoolExecutor(args.mm_processor_workers, thread_name_prefix="mmserve-media")
        # Threads that render and tokenize long texts while the event loop serves on: `tokenizer.encode` of a fast
        # tokenizer runs the Rust `encode_batch`, which releases the GIL.
        self.tokenize_pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                                thread_name_prefix="mmserve-tokenize")
        self.replicas = [EngineReplica(d) for d in range(args.dp_size)]
        self.balancer = Balancer(args.load_balance_method, self.replicas)
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, EngineReplica] = {}  # request id -> the replica it was sent to
        # Client-visible request id -> the engine ids it expanded to (an ordered set), for requests whose engine
        # ids differ from it (n > 1, several prompts); see submit_group.
        self._groups: dict[str, dict[str, None]] = {}
        self.stopped: str | None = None  # set by fail_all: why later submissions are refused
        self._dir = tempfile.mkdtemp(prefix="mmserve-")
        self._tasks: list[asyncio.Task] = []
        self.fatal_error: str | None = None  # set when the server must exit (an engine keeps dying)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromEngine)

    # ----- lifecycle -----

    async def start(self) -> None:
        """Start the engine processes (every replica's ranks) and wait until each has loaded the model."""
        from mmserve.distributed.launch import check_devices

        check_devices(self.args)
        self._ctx = zmq.asyncio.Context()
        # The engine process reads the tokenizer from a plain folder: converting it again (e.g. from GGUF)
        # would double the start-up time.
        self._tok_dir = os.path.join(self._dir, "tokenizer")
        self.tokenizer.save_pretrained(self._tok_dir)
        # one after another: each replica's start-up takes the memory it finds free on its own GPUs, and on the
        # CPU the replicas would only compete for the cores
        for replica in self.replicas:
            await self._launch(replica)
        self._tasks = [asyncio.create_task(self._watch())]

    async def _launch(self, replica: EngineReplica) -> None:
        """Start a replica's rank processes on a fresh pair of sockets (nothing queued for a dead engine reaches the
        next one) and wait for its rank 0's EngineReady."""
        from mmserve.distributed.launch import local_places, rendezvous, start_ranks

        replica.generation += 1
        tag = f"{replica.index}_{replica.generation}"
        to_engine, from_engine = f"ipc://{self._dir}/to_engine_{tag}", f"ipc://{self._dir}/from_engine_{tag}"
        replica.push = self._ctx.socket(zmq.PUSH)
        replica.push.bind(to_engine)
        replica.pull = self._ctx.socket(zmq.PULL)
        replica.pull.bind(from_engine)
        engine_args = dataclasses.replace(self.args, tokenizer_path=self._tok_dir)
        places = local_places(self.args, replica.index, rendezvous(self.args, replica.index))
        replica.procs = start_ranks(engine_args, places, to_engine, from_engine)
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready = None
        while ready is None:
            if not replica.alive:
                raise RuntimeError(f"the engine process exited during start-up (code {replica.exit_code}); "
                                   "see the log above")
            if time.monotonic() > deadline:
                raise RuntimeError("the engine process did not become ready in time")
            if await replica.pull.poll(500):
                msg = self._decode(await replica.pull.recv())
                if isinstance(msg, EngineReady):
                    ready = msg
        replica.info, replica.stats = ready, None  # a new engine holds nothing yet
        replica.error = None
        replica.receiver = asyncio.create_task(self._receive(replica.pull, replica))

    async def shutdown(self) -> None:
        self.mm_pool.shutdown(wait=False, cancel_futures=True)
        if self.mm_processor is not None:
            self.mm_processor.close()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        for task in [*self._tasks, *(r.receiver for r in self.replicas)]:
            if task is not None:
                task.cancel()
        for replica in self.replicas:
            replica.stop()
        if getattr(self, "_ctx", None) is not None:
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def info(self) -> EngineReady | None:
        """The first replica's EngineReady (every replica serves the same model)."""
        return next((r.info for r in self.replicas if r.info is not None), None)

    @property
    def stats(self) -> EngineStats | None:
        """Gauges summed over the replicas that have reported."""
        reported = [r.stats for r in self.replicas if r.stats is not None]
        if not reported:
            return None
        return EngineStats(*(sum(getattr(st, f) for st in reported) for f in EngineStats.__struct_fields__))

    @property
    def engine_error(self) -> str | None:
        """Why no request can be served now (None when a replica can serve)."""
        if self.fatal_error is not None:
            return self.fatal_error
        if any(r.healthy for r in self.replicas):
            return None
        return next((r.error for r in self.replicas if r.error is not None), None)

    @property
    def engine_pid(self) -> int | None:
        procs = self.replicas[0].procs
        return procs[0].pid if procs else None

    @property
    def healthy(self) -> bool:
        """Whether requests can be served: a replica is up and its outputs are being received."""
        return self.fatal_error is None and any(r.healthy for r in self.replicas)

    # ----- engine traffic -----

    def _decode(self, frame: bytes) -> Any:
        try:
            return self._decoder.decode(frame)
        except msgspec.DecodeError as exc:  # one bad frame is dropped; the loop that reads them must live on
            logger.error("dropped a malformed message from the engine (%d bytes): %s", len(frame), exc)
            return None

    async def _receive(self, pull: zmq.asyncio.Socket, replica: EngineReplica) -> None:
        while True:
            msg = self._decode(await pull.recv())
            if not isinstance(msg, OutputBatch):
                continue
            try:
                self._dispatch(msg, replica)
            except Exception:  # noqa: BLE001 - a bug here must not silence every later output
                logger.exception("could not dispatch an output batch from the engine")

    def _dispatch(self, batch: OutputBatch, replica: EngineReplica) -> None:
        replica.stats = batch.stats
        if self.metrics is not None:
            self.metrics.observe_stats(self.stats)
        for out in batch.outputs:
            if out.finished_reason is None:
                q = self._queues.get(out.rid)
            else:  # the last output removes the request: in-flight counts stay right even if nobody reads it
                q = self._queues.pop(out.rid, None)
                self._release(out.rid)
            if q is not None:
                q.put_nowait(out)

    def _release(self, rid: str) -> EngineReplica | None:
        owner = self._owner.pop(rid, None)
        if owner is not None:
            owner.load -= 1
        return owner

    async def _watch(self) -> None:
        """Notice a dead replica (a dead rank, or a dead receive loop), fail the requests in flight on it, and start
        it again; after `max_engine_restarts` restarts of one replica within ten minutes, ask the server to exit
        with an error instead."""
        while True:
            await asyncio.sleep(0.5)
            for replica in self.replicas:
                if replica.alive and replica.receiver is not None and not replica.receiver.done():
                    continue
                if not await self._restart(replica):
                    return

    async def _restart(self, replica: EngineReplica) -> bool:
        name = "the engine" if len(self.replicas) == 1 else f"engine replica {replica.index}"
        if replica.alive:
            replica.error = f"{name}'s output receiver stopped"
            logger.error("%s: %r", replica.error, replica.receiver.exception() if replica.receiver else None)
        else:
            replica.error = f"{name} process exited (code {replica.exit_code})"
            logger.error("%s; failing %d in-flight requests", replica.error, replica.load)
        self._fail_in_flight(replica.error, replica)
        if replica.receiver is not None:
            replica.receiver.cancel()
        replica.stop()
        now = time.monotonic()
        replica.restarts = [t for t in replica.restarts if now - t < _RESTART_WINDOW_S]
        if len(replica.restarts) >= self.args.max_engine_restarts:
            self._give_up(f"{replica.error}, after {len(replica.restarts)} restarts in the last "
                          f"{_RESTART_WINDOW_S // 60} minutes")
            return False
        replica.restarts.append(now)
        replica.error = f"{name} is restarting after a failure"
        logger.warning("starting a new engine process (restart %d of at most %d in %d minutes)",
                       len(replica.restarts), self.args.max_engine_restarts, _RESTART_WINDOW_S // 60)
        try:
            await self._launch(replica)
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"{name} could not be restarted: {exc}")
            return False
        logger.warning("%s is back", name)
        return True

    def _fail_in_flight(self, reason: str, replica: EngineReplica) -> None:
        for rid in [rid for rid, owner in self._owner.items() if owner is replica]:
            self._release(rid)
            q = self._queues.pop(rid, None)
            if q is not None:
                q.put_nowait(EngineDead(reason))

    def _give_up(self, reason: str) -> None:
        """The engine cannot be kept alive: stop the server (SIGTERM to this process) with `fatal_error` set, so it
        exits non-zero and a supervisor restarts it; /health answers 503 meanwhile."""
        self.fatal_error = reason
        logger.critical("%s; the server exits", reason)
        os.kill(os.getpid(), signal.SIGTERM)

    # ----- requests -----

    def check_capacity(self, extra: int = 1) -> None:
        if not self.healthy:
            raise APIError(503, f"the engine is not available: {self.engine_error or 'starting'}")
        limit = self.args.max_queued_requests
        if limit is not None and self.info is not None:
            running = sum(r.info.max_running_requests for r in self.replicas if r.info is not None)
            if len(self._queues) + extra > running + limit:
                raise APIError(503, "the server is at capacity (the waiting queue is full); retry later")

    def media_settings(self, kwargs: dict[str, Any] | None) -> MediaSettings | None:
        """A request's mm_processor_kwargs checked against the model family's list (a 400 naming the key), before
        any of its media is fetched. None: the server's settings."""
        if not kwargs:
            return None
        if self.mm_processor is None:
            raise APIError(400, f"{self.args.model_path} is a text model: it takes no mm_processor_kwargs",
                           param="mm_processor_kwargs")
        try:
            return self.mm_processor.settings_for(kwargs)
        except MediaSettingsError as exc:
            raise APIError(400, str(exc), param="mm_processor_kwargs" + (f".{exc.key}" if exc.key else "")) from exc

    async def process_media(self, text: str, media: list[tuple[str, Any]],
                            settings: MediaSettings | None = None) -> tuple[list[int], WireMultimodal]:
        """Download media in the processor's download pool, then prepare them (`MultimodalProcessor.process`: cache
        lookups, then decoding and the model's processor in its worker pool) from a thread of `mm_pool`;
        MediaError/ValueError -> 400, MediaBusy (decoded-media memory full for too long) -> 503."""
        from mmserve.multimodal.media import MediaBusy

        if self.mm_processor is None:
            raise APIError(400, f"{self.args.model_path} is a text model: it takes no images or other media",
                           param="messages")
        loop = asyncio.get_running_loop()
        try:
            # Slow downloads wait in their own pool, never in the workers other requests decode in; the first
            # failed download answers at once.
            fetched = await asyncio.gather(*map(asyncio.wrap_future, self.mm_processor.download(media)))
            ids, mm = await loop.run_in_executor(self.mm_pool, self.mm_processor.process, text, list(fetched),
                                                 settings)
        except MediaBusy as exc:
            raise APIError(503, str(exc)) from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return ids, to_wire(mm)

    def submit(self, rid: str, input_ids: list[int], params: SamplingParams, logprob_start_len: int = -1,
               mm_inputs: WireMultimodal | None = None) -> AsyncIterator[RequestState]:
        """Send a request to the engine now; returns an async iterator of its state after every output.

        Submission is eager (capacity is counted from this moment); the iterator aborts the request if its
        consumer stops early. Nothing stays registered when submission fails."""
        if self.is_embedding:
            raise APIError(400, f"{self.args.model_path} is served as an embedding model: it generates nothing; use "
                           "/v1/embeddings (or /classify for a classifier)")
        state = RequestState.create(rid, params, input_ids, self.tokenizer)
        q = self._send(GenerateRequest(rid, input_ids, params.to_dict(), logprob_start_len=logprob_start_len,
                                       mm_inputs=mm_inputs))
        return self._follow(state, q)

    def _send(self, request: GenerateRequest) -> asyncio.Queue:
        """Check capacity, pick the request's replica and send it; returns the queue its outputs arrive on.
        Nothing stays registered when sending fails."""
        self.check_capacity()
        rid = request.rid
        if rid in self._queues:
            raise APIError(400, f"duplicate request id {rid!r}")
        try:
            frame = self._encoder.encode(request)
        except (OverflowError, TypeError, msgspec.EncodeError) as exc:  # e.g. an integer past 64 bits
            raise APIError(400, f"the request holds a value out of range: {exc}") from exc
        replica = self.balancer.pick(request.input_ids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._owner[rid] = replica
        replica.load += 1
        try:
            replica.push.send(frame)
        except BaseException:
            self._queues.pop(rid, None)
            self._release(rid)
            raise
        return q

    async def encode(self, rid: str, input_ids: list[int], mm_inputs: WireMultimodal | None = None) -> TokenOutput:
        """An embedding request: sent now, its one output awaited (an APIError for a refusal). Cancelling the
        caller aborts it in the engine."""
        if self.stopped is not None:
            raise APIError(503, self.stopped)
        q = self._send(GenerateRequest(rid, input_ids, embed=True, mm_inputs=mm_inputs))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, EngineDead):
                    raise APIError(503, str(out))
                if out.error_status is not None:
                    raise APIError(out.error_status, out.finished_reason["message"])
                if out.finished_reason is not None:
                    finished = True
                    return out
        finally:
            if not finished:
                self.cancel(rid)

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
        """Forget a submitted request and abort it in the engine (no-op once it has finished). It will send no
        final output, so the metrics count it as aborted here."""
        if self._queues.pop(rid, None) is None:
            return
        if self.metrics is not None:
            self.metrics.observe_aborted()
        owner = self._release(rid)
        if owner is not None and owner.healthy:
            owner.push.send(self._encoder.encode(AbortRequest(rid)))

    async def abort(self, rid: str) -> list[str]:
        """Abort what a client may name by `rid`: a request by the id the API returned for it (all of its
        engine sub-requests, see `submit_group`) or one sub-request by its own id. Ids match exactly, never by
        prefix, so no client stops another's requests by guessing a common prefix. Returns the ids aborted; each
        request then finishes with reason "abort"."""
        group = self._groups.get(rid)
        targets = [sub for sub in (group if group is not None else [rid]) if sub in self._queues]
        for sub in targets:
            owner = self._owner.get(sub)
            if owner is not None and owner.healthy:
                await owner.push.send(self._encoder.encode(AbortRequest(sub)))
        return targets

    def running_ids(self) -> list[str]:
        return list(self._queues)

    # ----- request groups -----

    def submit_group(self, rid: str, jobs: list[tuple[str, list[int], SamplingParams, int]],
                     mm_inputs: WireMultimodal | None = None) -> list[AsyncIterator[RequestState]]:
        """Submit the engine requests (sub-id, prompt ids, params, logprob_start_len) one client request with id
        `rid` expanded to (n copies `rid-i`, several prompts `rid-pK`), all or none: if one is refused, those
        already sent are cancelled. Returns one iterator per job, as `submit` does."""
        if self.stopped is not None:
            raise APIError(503, self.stopped)
        subs = [job[0] for job in jobs]
        grouped = subs != [rid]
        if rid in self._groups or (grouped and rid in self._queues):
            raise APIError(400, f"duplicate request id {rid!r}")
        gens: list[AsyncIterator[RequestState]] = []
        try:
            for sub, ids, params, start in jobs:
                gens.append(self.submit(sub, ids, params, logprob_start_len=start, mm_inputs=mm_inputs))
        except BaseException:
            for sub in subs[:len(gens)]:
                self.cancel(sub)
            raise
        if not grouped:
            return gens
        if len(self._groups) > 2 * len(self._queues) + 64:  # groups of iterators never started (none expected)
            for name in [name for name, members in self._groups.items() if not members.keys() & self._queues]:
                del self._groups[name]
        self._groups[rid] = dict.fromkeys(subs)
        return [self._in_group(rid, sub, gen) for sub, gen in zip(subs, gens, strict=True)]

    async def _in_group(self, rid: str, sub: str, gen: AsyncIterator[RequestState]) -> AsyncIterator[RequestState]:
        try:
            async for state in gen:
                yield state
        finally:
            await gen.aclose()
            members = self._groups.get(rid)
            if members is not None:
                members.pop(sub, None)
                if not members:
                    del self._groups[rid]

    # ----- stopping -----

    def fail_all(self, message: str) -> int:
        """End every request in flight with a 503 carrying `message` (a stream gets an error event, then
        [DONE]); each one's iterator then aborts it in the engine. Requests still being prepared (tokenized, their
        media loaded) are refused with it when they are submitted. For a server that stops before they finish.
        Returns how many were in flight."""
        self.stopped = message
        for q in self._queues.values():
            q.put_nowait(EngineDead(message))
        return len(self._queues)

    # ----- tokenizing off the event loop -----

    # Texts up to this many characters are tokenized (or rendered) inline, in well under a millisecond or two;
    # longer ones in `tokenize_pool`.
    INLINE_CHARS = 4096

    async def _off_loop(self, size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if size <= self.INLINE_CHARS:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenize_pool, functools.partial(fn, *args, **kwargs))

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`tokenizer.encode(text)`, in a worker thread when the text is long."""
        return await self._off_loop(len(text), self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def render_chat_async(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        """Validate chat messages and render them with the chat template, in a worker thread when they are long."""
        validate_messages(messages)
        return await self._off_loop(_text_chars(messages), render_chat, self.tokenizer, messages, self.chat_template,
                                    **template_kwargs)

    async def decode_async(self, ids: list[int]) -> str:
        return await self._off_loop(len(ids), self.tokenizer.decode, ids)

    @functools.cached_property
    def max_bytes_per_token(self) -> float | None:
        """`max_bytes_per_token(self.tokenizer)`, computed once (a fraction of a second: first read it off the
        event loop)."""
        return max_bytes_per_token(self.tokenizer)


def max_bytes_per_token(tokenizer: Any) -> float | None:
    """An upper bound of the UTF-8 bytes of text one token can stand for, so a text longer than `context_len`
    times this certainly exceeds the context and can be refused without tokenizing it. None when there is no such
    bound: a tokenizer that can map much text to few tokens (an unknown-token fallback, a normalizer or
    pre-tokenizer that drops text, added tokens that swallow whitespace) or one that is not a fast tokenizer.
    Decodes the whole vocabulary once."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
        shrink = _normalizer_shrink(spec.get("normalizer"))
        if shrink is None or not _keeps_all_text(spec):
            return None
        ids = sorted(set(backend.get_vocab(with_added_tokens=True).values()))
        longest = max(len(text.encode("utf-8", "surrogatepass"))
                      for text in backend.decode_batch([[i] for i in ids], skip_special_tokens=False))
    except Exception as exc:  # noqa: BLE001 - an unusual tokenizer only loses the early check
        logger.warning("no early prompt-size check for this tokenizer: %s", exc)
        return None
    # + 4: decoding a token alone may drop a leading space (Metaspace, Strip decoders)
    return (longest + 4) * shrink


def _text_chars(messages: Any) -> int:
    """Characters of text in chat messages (string contents and text parts), to decide where to render them."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text") or "") for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return total


# Normalizers that never shrink text by more than a known factor (bytes in / bytes out); anything else (Strip,
# Lowercase, Precompiled, BertNormalizer...) may drop text, so no bound. NFKC folds a 4-byte mathematical letter
# to 1 byte; NFC composes 3 Hangul jamo (9 bytes) into a 3-byte syllable.
_NORMALIZER_SHRINK = {"NFC": 4.0, "NFD": 4.0, "NFKC": 4.0, "NFKD": 4.0, "Prepend": 1.0}
# Pre-tokenizers that split text without dropping any of it (Whitespace, BertPreTokenizer, CharDelimiterSplit
# drop characters).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts"}


def _normalizer_shrink(spec: dict[str, Any] | None) -> float | None:
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for inner in spec.get("normalizers", []):
            inner_factor = _normalizer_shrink(inner)
            if inner_factor is None:
                return None
            factor *= inner_factor
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        if pattern is None or not content:  # a regex, or a deletion
            return None
        return max(1.0, len(pattern.encode()) / len(content.encode()))
    return _NORMALIZER_SHRINK.get(kind)


def _keeps_all_text(spec: dict[str, Any]) -> bool:
    """Whether every byte of the input ends up in some token: byte-level BPE, or byte fallback instead of an
    unknown token; no pre-tokenizer that drops text; no added token that swallows whitespace next to it."""
    pre = spec.get("pre_tokenizer")
    pres = [] if pre is None else pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any(p.get("type") not in _KEEPING_PRE_TOKENIZERS or p.get("behavior") == "Removed" for p in pres):
        return False
    model = spec.get("model", {})
    byte_level = any(p.get("type") == "ByteLevel" for p in pres)
    if not (model.get("byte_fallback") or (model.get("type") == "BPE" and byte_level)):
        return False
    return not any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens", []))
