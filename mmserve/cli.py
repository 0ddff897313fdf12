"""The `mmserve` command: `mmserve serve [MODEL]` starts the OpenAI-compatible server; `mmserve generate PROMPT`
runs one prompt through the in-process engine and prints the answer. A problem found before the model loads is
one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mmserve.config import ServerArgs

# `mmserve generate`'s sampling flags: name -> (type, default, help); None stays out of the request.
_SAMPLING_FLAGS = {
    "max_new_tokens": (int, 128, "Most tokens to generate (default: 128)."),
    "temperature": (float, 0.0, "0 is greedy (default: 0)."),
    "top_p": (float, None, "Nucleus sampling: keep the most likely tokens up to this probability (default: 1)."),
    "top_k": (int, None, "Keep the k most likely tokens (default: all)."),
    "repetition_penalty": (float, None, "Above 1 discourages repeating tokens (default: 1)."),
    "seed": (int, None, "Seed of this request's sampling (default: --random-seed)."),
}


def _generate(args: argparse.Namespace) -> int:
    from mmserve.engine import Engine
    from mmserve.launch_server import check_before_loading

    server_args = ServerArgs.from_cli_args(args)
    check_before_loading(server_args)
    params = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description="Serve and run vision-language models and LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", usage="%(prog)s [MODEL] [options]",
                           help="Serve a model over HTTP (OpenAI-compatible). No model: SmolLM2 default.",
                           description="Serve a model with an OpenAI-compatible HTTP API.")
    ServerArgs.add_cli_args(serve, positional_model=True)
    gen = sub.add_parser("generate", usage="%(prog)s PROMPT [options]",
                         help="Generate an answer to one prompt (chat template applied).",
                         description="Generate an answer to one prompt in this process (no server) and print it.")
    gen.add_argument("prompt", help="The user message (or raw prompt with --raw).")
    for name, (kind, default, text) in _SAMPLING_FLAGS.items():
        gen.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    gen.add_argument("--raw", action="store_true", help="Complete the text as is, without the chat template.")
    gen.add_argument("--json", action="store_true", help="Print the whole result as JSON instead of streaming.")
    ServerArgs.add_cli_args(gen, in_process=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            level = getattr(args, "log_level", ServerArgs.log_level)  # the flag's default is not in the namespace
            logging.basicConfig(level=level.upper(), format="%(levelname)s %(message)s")
            return _generate(args)
        if args.command == "serve":
            from mmserve.launch_server import run_server, say_if_default_model

            server_args = ServerArgs.from_cli_args(args)
            say_if_default_model(args, server_args)
            run_server(server_args)  # it sets up logging itself, at --log-level
            return 0
    except ValueError as exc:  # a start-up problem, in the user's words: one line, no traceback
        print(f"mmserve: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
