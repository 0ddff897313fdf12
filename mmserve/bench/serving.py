"""Online serving benchmark: concurrent streaming chat requests against a running server, one table printed.

    python -m mmserve.bench.serving --port 30000 --dataset image --image-resolution 448x448 --num-prompts 64

Datasets: `random` (random words) and `image` (random words plus random-pixel PNG images sent as data URLs,
like SGLang's bench_serving image dataset). EOS is ignored so each request generates exactly --output-len tokens.
One small request of the same kind goes first: a server that cannot serve them (a text model asked for images,
a wrong API key) stops the benchmark with the server's own words instead of a table of failures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
          "near an old river under grey skies").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def random_png_url(width: int, height: int, rng: np.random.Generator) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_requests(args: argparse.Namespace, num: int | None = None, seed: int | None = None) -> list[list[dict]]:
    """`num` (default --num-prompts) chats of the dataset's kind, from `seed` (default --seed)."""
    seed = args.seed if seed is None else seed
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    width, height = (int(x) for x in args.image_resolution.lower().split("x"))
    requests = []
    for _ in range(args.num_prompts if num is None else num):
        text = " ".join(rng.choice(_WORDS) for _ in range(args.input_len))
        content: list[dict] = []
        if args.dataset == "image":
            content = [{"type": "image_url", "image_url": {"url": random_png_url(width, height, np_rng)}}
                       for _ in range(args.image_count)]
        requests.append([{"role": "user", "content": [*content, {"type": "text", "text": text}]}])
    return requests


async def one_request(client: httpx.AsyncClient, url: str, messages: list[dict], args: argparse.Namespace) -> Result:
    body = {"model": args.model, "messages": messages, "max_tokens": args.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    result = Result(ok=False)
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"{resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = True
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


class ServerRefused(Exception):
    """The server cannot serve the benchmark's requests; the message says why, in the server's words."""


async def check_server(client: httpx.AsyncClient, base: str, args: argparse.Namespace) -> None:
    """Send one request of the benchmark's kind (its own prompt, so the run's prefix cache is untouched) and raise
    ServerRefused with the server's error if it fails."""
    [messages] = build_requests(args, num=1, seed=args.seed + 1_000_003)
    body = {"model": args.model, "messages": messages, "max_tokens": 1, "temperature": 0}
    try:
        resp = await client.post(base + "/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        raise ServerRefused(f"cannot reach the server at {base}: {exc!r}") from None
    if resp.status_code == 200:
        return
    try:
        reason = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        reason = resp.text[:300]
    raise ServerRefused(f"the server at {base} refused a request of the {args.dataset} dataset with "
                        f"{resp.status_code}: {reason}")


async def run(args: argparse.Namespace) -> dict[str, float]:
    base = args.base_url or f"http://{args.host}:{args.port}"
    requests = build_requests(args)
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    rng = random.Random(args.seed + 1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        await check_server(client, base, args)
        async def limited(messages: list[dict]) -> Result:
            async with limit:
                return await one_request(client, base + "/v1/chat/completions", messages, args)

        tasks = []
        start = time.perf_counter()
        for messages in requests:
            tasks.append(asyncio.create_task(limited(messages)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    done = [r for r in results if r.ok]
    itls = [x for r in done for x in r.itls]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) * 1000 if values else float("nan")

    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "request_throughput": len(done) / duration,
        "input_tokens": sum(r.prompt_tokens for r in done), "output_tokens": sum(r.output_tokens for r in done),
        "output_throughput": sum(r.output_tokens for r in done) / duration,
        "mean_ttft_ms": statistics.fmean(r.ttft for r in done) * 1000 if done else float("nan"),
        "median_ttft_ms": pct([r.ttft for r in done], 50), "p99_ttft_ms": pct([r.ttft for r in done], 99),
        "mean_itl_ms": statistics.fmean(itls) * 1000 if itls else float("nan"),
        "median_itl_ms": pct(itls, 50), "p99_itl_ms": pct(itls, 99),
        "mean_e2e_ms": statistics.fmean(r.latency for r in done) * 1000 if done else float("nan"),
        "errors": [r.error for r in results if not r.ok][:3],
    }


def print_table(args: argparse.Namespace, m: dict) -> None:
    media = f", {args.image_count} image(s) {args.image_resolution}" if args.dataset == "image" else ""
    print(f"\n{args.num_prompts} requests ({args.dataset}{media}, {args.input_len} words in, {args.output_len} "
          f"tokens out), rate {args.request_rate}, max concurrency {args.max_concurrency or 'unbounded'}")
    rows = [("completed / failed", f"{m['completed']} / {m['failed']}"), ("duration (s)", f"{m['duration_s']:.2f}"),
            ("requests/s", f"{m['request_throughput']:.2f}"), ("input tokens", m["input_tokens"]),
            ("output tokens/s", f"{m['output_throughput']:.1f}"),
            ("TTFT mean / median / p99 (ms)", f"{m['mean_ttft_ms']:.1f} / {m['median_ttft_ms']:.1f} / "
                                              f"{m['p99_ttft_ms']:.1f}"),
            ("ITL mean / median / p99 (ms)", f"{m['mean_itl_ms']:.2f} / {m['median_itl_ms']:.2f} / "
                                             f"{m['p99_itl_ms']:.2f}"),
            ("E2E latency mean (ms)", f"{m['mean_e2e_ms']:.1f}")]
    for name, value in rows:
        print(f"{name:<32}{value:>24}")
    for err in m["errors"]:
        print("error:", err)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dataset", choices=["random", "image"], default="random")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64, help="Words of text per prompt.")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--image-resolution", default="448x448")
    parser.add_argument("--image-count", type=int, default=1)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second.")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        metrics = asyncio.run(run(args))
    except ServerRefused as exc:
        print(f"bench.serving: {exc}", file=sys.stderr)
        sys.exit(1)
    print_table(args, metrics)
    return metrics


if __name__ == "__main__":
    main()
