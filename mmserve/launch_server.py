"""`python -m mmserve.launch_server --model-path MODEL --port 30000` (SGLang's entry point and flag names);
`mmserve serve [MODEL]` is the same."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys

from mmserve.config import ServerArgs

_GRACEFUL_SHUTDOWN_S = 30


def run_server(args: ServerArgs) -> None:
    import uvicorn

    from mmserve.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    # On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (up to the timeout), then runs the
    # app's shutdown, which stops the engine process. Its own handlers re-raise the signal afterwards, so the
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
