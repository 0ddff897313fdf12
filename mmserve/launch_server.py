"""`python -m mmserve.launch_server --model-path MODEL --port 30000` (SGLang's entry point and flag names);
`mmserve serve [MODEL]` is the same."""

from __future__ import annotations

import argparse
import logging
import sys

from mmserve.config import ServerArgs

_GRACEFUL_SHUTDOWN_S = 30


def run_server(args: ServerArgs) -> None:
    import uvicorn

    from mmserve.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(args)
    # uvicorn stops accepting on SIGTERM/SIGINT, lets in-flight requests finish (up to the timeout), then runs
    # the app's shutdown, which stops the engine process.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)


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
