"""The HTTP server against the in-process Engine on the same model: one request at a time, streamed, so both give
the time to first token and the time per output token of the same step loop. The two should match; a gap is
overhead of the server path (process layout, IPC, the API process), which this benchmark exists to catch.

    python -m mmserve.bench.server_vs_engine --input-len 128 --output-len 64           # the default SmolLM2
    python -m mmserve.bench.server_vs_engine --preset llama-3.1-8b --tokenizer-dir DIR # random weights, real shape

Each phase runs alone (the Engine is shut down before the server starts). Every figure is the median of --runs
requests with the min-max beside it; prompts are random token ids of --input-len, EOS is ignored.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mmserve.bench.offline import random_prompts
from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs


def _timings(stamps: list[float], start: float, tokens: int) -> tuple[float, float]:
    """(time to first token, time per output token after the first), seconds, from chunk arrival times."""
    ttft = stamps[0] - start
    tpot = (stamps[-1] - stamps[0]) / max(1, tokens - 1)
    return ttft, tpot


def run_engine(server_args: ServerArgs, prompts: list[list[int]], output_len: int) -> list[tuple[float, float]]:
    from mmserve.engine import Engine

    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    out = []
    with Engine(**vars(server_args)) as engine:
        engine.generate(input_ids=prompts[0], sampling_params={**params, "max_new_tokens": 4})  # warm-up
        for ids in prompts[1:]:
            start, stamps = time.perf_counter(), []
            for chunk in engine.generate(input_ids=ids, sampling_params=params, stream=True):
                if chunk["output_ids"]:
                    stamps.append(time.perf_counter())
            out.append(_timings(stamps, start, output_len))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(server_args: ServerArgs, extra: list[str], prompts: list[list[int]], output_len: int,
               log_path: Path) -> list[tuple[float, float]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mmserve.launch_server", "--model-path", server_args.model_path, "--port", str(port),
           "--dtype", server_args.dtype, "--load-format", server_args.load_format, *extra]
    if server_args.tokenizer_path:
        cmd += ["--tokenizer-path", server_args.tokenizer_path]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                tail = "".join(open(log_path).readlines()[-25:])
                raise RuntimeError(f"the server exited ({proc.returncode}); the end of {log_path}:\n{tail}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log_path}")
            time.sleep(0.5)
        out = []
        with httpx.Client(timeout=600) as client:
            for i, ids in enumerate(prompts):
                body = {"prompt": ids, "max_tokens": 4 if i == 0 else output_len, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                start, stamps = time.perf_counter(), []
                with client.stream("POST", url + "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    for line in resp.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                            stamps.append(time.perf_counter())
                if i:  # the first request warms up
                    # one event per step (its text may be empty while a character is incomplete); ignore_eos makes
                    # the token count exactly output_len
                    out.append(_timings(stamps, start, output_len))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _fmt(values: list[float], scale: float = 1000.0) -> str:
    values = [v * scale for v in values]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-len", type=int, default=128, help="Prompt length in tokens.")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_preset_args(parser)
    parser.add_argument("--server-flags", default="", help="Extra flags for the server only, as one string.")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    apply_preset(args, parser)
    server_args = ServerArgs.from_cli_args(args)
    from mmserve.models.loader import load_hf_config, resolve_model_path

    config = load_hf_config(resolve_model_path(server_args.model_path))
    vocab = (getattr(config, "text_config", None) or config).vocab_size
    # one warm-up prompt, then --runs measured ones, the same for both paths (separate processes: no shared cache)
    prompts = random_prompts(min(vocab, 32000), args.runs + 1, args.input_len, args.seed)
    print(f"engine phase: {args.runs} requests of {args.input_len} in / {args.output_len} out", file=sys.stderr,
          flush=True)
    engine = run_engine(server_args, prompts, args.output_len)
    print("server phase", file=sys.stderr, flush=True)
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = run_server(server_args, shlex.split(args.server_flags), prompts, args.output_len, log)
    device = server_args.resolved_device()
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    print(f"\nmodel {args.preset or server_args.model_path} | dtype {server_args.dtype} | device {name} | batch 1, "
          f"{args.input_len} in / {args.output_len} out | median (min-max) of {args.runs}")
    print(f"{'path':<34}{'TTFT ms':>24}{'time per output token ms':>30}")
    rows = [("in-process Engine (streamed)", engine), ("HTTP server, /v1/completions stream", server)]
    for label, runs in rows:
        print(f"{label:<34}{_fmt([r[0] for r in runs]):>24}{_fmt([r[1] for r in runs]):>30}")
    ratio = statistics.median(r[1] for r in server) / statistics.median(r[1] for r in engine)
    print(f"server / engine time per output token: {ratio:.2f}")


if __name__ == "__main__":
    main()
