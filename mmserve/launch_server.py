"""`python -m mmserve.launch_server --model-path MODEL --port 30000` (SGLang's entry point and flag names);
`mmserve serve [MODEL]` is the same. Start-up fails fast: the port is bound and the arguments checked before the
model loads, and what is wrong is one line on stderr with exit code 2. Also what the server adds to uvicorn: a
deadline on reading requests, a ready line once it listens, and a shutdown that ends what is still running with
an error rather than cutting it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mmserve.config import ServerArgs
from mmserve.server.errors import raw_error_response

logger = logging.getLogger("mmserve.server")

_GRACEFUL_SHUTDOWN_S = 30.0
_FLUSH_S = 3.0  # after the grace period, for the requests ended by it to send their last bytes


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request: its head and body must arrive within
    `read_timeout_s` of its first byte (of the connection, for the first one), or the connection is closed, with a
    408 unless an answer has started. uvicorn only times out idle keep-alive connections, so a client sending a
    header line a minute (slowloris) could otherwise hold a connection forever. Protocol errors get an
    OpenAI-shaped 400 instead of plain text."""

    read_timeout_s = 60.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._answering():
            self._disarm()
        elif self._deadline is None:  # the first bytes of a request
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle.response_complete or self._answering():  # idle: uvicorn's keep-alive timeout takes over
            self._disarm()
        elif self._deadline is None:  # a pipelined request, being read
            self._arm()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_error_response(400, "Bad Request", f"invalid HTTP request: {msg}"))
        self.transport.close()

    def _answering(self) -> bool:
        """Whether the current request has been read whole and the app is answering it."""
        return self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            if cycle is not None and not cycle.response_complete:  # the app, waiting for the body, hears a disconnect
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(raw_error_response(408, "Request Timeout", f"the request did not arrive within "
                                                    f"{self.read_timeout_s:g} s (--request-read-timeout)"))
        logger.info("closed a connection from %s: its request did not arrive within %g s",
                    self.client and self.client[0], self.read_timeout_s)
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, but what is still running at the end of the grace period is ended with an error of its
    own (a stream gets an error event and [DONE], a plain request a 503) instead of being cut; uvicorn's own
    timeout, a little later, only cancels what did not end in spite of that."""

    def __init__(self, config: uvicorn.Config, app: Any, grace_s: float):
        super().__init__(config)
        self.app, self.grace_s = app, grace_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        ready_line = getattr(self.app.state, "ready_line", None)
        if self.started and ready_line:  # now it listens: a client that reads the line can connect
            logger.info(ready_line)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace_s, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_requests(self) -> None:
        count = self.app.state.manager.fail_all("the server is shutting down: the request was stopped before it "
                                                "finished")
        if count:
            logger.warning("the shutdown grace period (%g s) is over: ended %d request(s) still running",
                           self.grace_s, count)


def run_server(args: ServerArgs) -> None:
    """Serve until SIGTERM or SIGINT. What can be found wrong before the model loads (a busy port, a device this
    machine lacks, a folder without a model, ...) raises ValueError, in a second rather than after the loading."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.node_rank > 0:
        check_before_loading(args)
        serve_ranks_of_this_node(args)
        return
    sock = bind_socket(args.host, args.port)
    try:
        args = dataclasses.replace(args, port=sock.getsockname()[1])  # the real one, for --port 0
        check_before_loading(args)
        from mmserve.server.app import create_app

        logger.info("loading the tokenizer of %s", args.model_path)
        app = create_app(args)
    except BaseException:
        sock.close()
        raise
    grace = float(os.environ.get("MMSERVE_SHUTDOWN_GRACE_S", _GRACEFUL_SHUTDOWN_S))  # tests shorten it
    protocol = type("ReadDeadlineProtocol", (ReadDeadlineProtocol,), {"read_timeout_s": args.request_read_timeout})
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=protocol,
                            timeout_graceful_shutdown=grace + _FLUSH_S)
    server = _Server(config, app, grace)
    # On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (up to the grace period), then runs
    # the app's shutdown, which stops the engine process. Its own handlers re-raise the signal afterwards, so the
    # process would die by it; ours only ask it to exit, and a clean stop exits 0.
    server.capture_signals = contextlib.nullcontext

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(1)
    fatal = app.state.manager.fatal_error
    if fatal:  # the engine kept dying: exit non-zero so a supervisor restarts the whole server
        print(f"mmserve: {fatal}", file=sys.stderr)
        sys.exit(1)


def serve_ranks_of_this_node(args: ServerArgs) -> None:
    """A host other than node 0 of --nnodes: no HTTP server, only its share of the engine's ranks, which follow
    node 0's rank 0. When they exit (node 0 stopped or restarted its engine), start them again to meet node 0's
    next engine at the same rendezvous; stop on SIGTERM/SIGINT."""
    from mmserve.distributed.launch import local_places, rendezvous, start_ranks

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        places = local_places(args, 0, rendezvous(args))
        logger.info("node %d of %d: starting ranks %s", args.node_rank, args.nnodes, [p.rank for p in places])
        procs = start_ranks(args, places)
        while not stopping and any(p.is_alive() for p in procs):
            time.sleep(0.5)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
        if not stopping:
            logger.warning("node %d: the ranks exited (codes %s); starting them again", args.node_rank,
                           [p.exitcode for p in procs])
            time.sleep(1.0)


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's address, bound before the model loads, so a busy port is reported at once (not after the
    loading) and the socket is handed to uvicorn as it is. It listens only once the server is ready: until then
    connections are refused, as health checks expect, rather than left waiting."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart is not held up by TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "the port is in use (another server?); pick another --port",
                  errno.EACCES: "permission denied (ports below 1024 need privileges); pick another --port",
                  errno.EADDRNOTAVAIL: "this machine has no such address; check --host"}.get(
                      exc.errno, exc.strerror or str(exc))
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def check_before_loading(args: ServerArgs) -> None:
    """What can be found wrong in a moment, before the model loads (seconds to minutes): the device, tensor
    parallelism, the model path and what it holds, and for a Hugging Face folder its config (architecture, context
    length). A GGUF file's config takes seconds to parse: its checks happen while loading. Raises ValueError."""
    import torch

    from mmserve.config import ModelConfig, architectures_of
    from mmserve.distributed.launch import check_devices
    from mmserve.models.loader import check_model_files, load_hf_config, resolve_model_path
    from mmserve.models.registry import ModelRegistry

    device = args.resolved_device()
    check_devices(args)
    if args.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use --dtype "
                         "float16")
    checkpoint = resolve_model_path(args.model_path, args.revision)
    check_model_files(checkpoint, need_weights=args.load_format != "dummy")
    if args.tokenizer_path:
        resolve_model_path(args.tokenizer_path, args.revision)
    if checkpoint.suffix != ".gguf":
        hf_config = load_hf_config(checkpoint, args.trust_remote_code)
        ModelRegistry.resolve(architectures_of(hf_config))
        ModelConfig.from_hf(hf_config, args, device)


def parse_args(argv: list[str] | None, positional_model: bool = False, prog: str | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog=prog, usage="%(prog)s [--model-path MODEL] [options]",
                                     description="Serve a model with an OpenAI-compatible HTTP API.")
    ServerArgs.add_cli_args(parser, positional_model=positional_model)
    ns = parser.parse_args(argv)
    args = ServerArgs.from_cli_args(ns)
    say_if_default_model(ns, args)
    return args


def say_if_default_model(ns: argparse.Namespace, args: ServerArgs) -> None:
    if getattr(ns, "model_path", None) is None and getattr(ns, "model", None) is None:
        print(f"no model given: serving the default SmolLM2-135M-Instruct ({args.model_path})", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    try:
        run_server(parse_args(argv, prog="python -m mmserve.launch_server"))
    except ValueError as exc:  # a start-up problem, in the user's words: one line, no traceback
        print(f"mmserve: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
