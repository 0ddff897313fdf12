"""The `mmserve` command: `mmserve serve [MODEL]` starts the OpenAI-compatible server; `mmserve generate PROMPT`
runs one prompt through the in-process engine and prints the answer."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mmserve.config import ServerArgs


def _generate(args: argparse.Namespace) -> int:
    from mmserve.engine import Engine

    server_args = ServerArgs.from_cli_args(args)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    with Engine(**vars(server_args)) as engine:
        if args.raw:
            out = engine.generate(args.prompt, params, stream=not args.json)
        else:
            out = engine.chat([{"role": "user", "content": args.prompt}], params, stream=not args.json)
        if args.json:
            print(json.dumps({"text": out["text"], "meta_info": out["meta_info"]}, indent=2))
            return 0
        for chunk in out:
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmserve", description="Serve and run vision-language models and LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a model over HTTP (OpenAI-compatible). No model: SmolLM2 default.")
    ServerArgs.add_cli_args(serve, positional_model=True)
    gen = sub.add_parser("generate", help="Generate an answer to one prompt (chat template applied).")
    gen.add_argument("prompt", help="The user message (or raw prompt with --raw).")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--raw", action="store_true", help="Complete the text as is, without the chat template.")
    gen.add_argument("--json", action="store_true", help="Print the whole result as JSON instead of streaming.")
    ServerArgs.add_cli_args(gen)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "warning").upper(), format="%(levelname)s %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from mmserve.launch_server import run_server

            server_args = ServerArgs.from_cli_args(args)
            if getattr(args, "model_path", None) is None and getattr(args, "model", None) is None:
                print(f"no model given: serving the default SmolLM2-135M-Instruct ({server_args.model_path})",
                      file=sys.stderr)
            run_server(server_args)
            return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
