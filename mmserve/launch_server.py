"""`python -m mmserve.launch_server --model-path MODEL --port 30000` (SGLang's entry point and flag names);
`mmserve serve [MODEL]` is the same. Also what the server adds to uvicorn: a deadline on reading requests, and a
shutdown that ends what is still running with an error rather than cutting it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
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
    from mmserve.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(args)
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
    server.run()
    if not server.started:
        sys.exit(1)
    fatal = app.state.manager.fatal_error
    if fatal:  # the engine kept dying: exit non-zero so a supervisor restarts the whole server
        print(f"mmserve: {fatal}", file=sys.stderr)
        sys.exit(1)


def parse_args(argv: list[str] | None, positional_model: bool = False, prog: str | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model with an OpenAI-compatible HTTP API.")
    ServerArgs.add_cli_args(parser, positional_model=positional_model)
    ns = parser.parse_args(argv)
    args = ServerArgs.from_cli_args(ns)
    if getattr(ns, "model_path", None) is None and getattr(ns, "model", None) is None:
        print(f"no model given: serving the default SmolLM2-135M-Instruct ({args.model_path})", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> None:
    run_server(parse_args(argv, prog="python -m mmserve.launch_server"))


if __name__ == "__main__":
    main()
