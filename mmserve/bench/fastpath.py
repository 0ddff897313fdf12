"""Issue 15's GPU-speed targets in one table: the batch-1 decode floor of this GPU, batch-1 decode (T1), time to
first token for unseen and seen prompt lengths (T1'), and offline throughput (T2, T3), each against its target and,
where one exists, against transformers' `generate` on the same weights in the same process.

    python -m mmserve.bench.fastpath --preset llama-3.1-8b --tokenizer-dir DIR [--only T1,T1p,T2] [--runs 3]

Each mmserve figure is the median of --runs runs, with min-max beside it; each run uses fresh random prompts, so
the prefix cache never helps. Every request is greedy and ignores EOS, so it generates exactly the tokens asked for.
The floor row always runs (T1 is shown as a percentage of it). The transformers rows (--hf-runs each, none with
--no-hf) run after the engine is shut down and its memory freed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmserve.bench.offline import load_hf_model, progress, random_prompts, say
from mmserve.bench.presets import add_preset_args, apply_preset
from mmserve.config import ServerArgs

ROW_IDS = ("floor", "T1", "T1p", "T2", "T3")
_COPY_REPEATS = 10


@dataclass
class Figure:
    """One measurement's runs; shown as the median with min-max beside it."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def cell(self, unit: str = "") -> str:
        text = fmt_number(self.median)
        if len(self.runs) > 1:
            text += f" [{fmt_number(min(self.runs))}–{fmt_number(max(self.runs))}]"
        return f"{text} {unit}".rstrip()

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.runs), "max": max(self.runs), "runs": self.runs}


@dataclass
class Row:
    id: str
    workload: str
    unit: str
    ours: Figure
    hf: Figure | None = None
    detail: str = ""  # more text for the mmserve cell
    extra: dict[str, Any] = field(default_factory=dict)  # more numbers for the JSON
    higher_is_better: bool = True  # False for times

    @property
    def ratio(self) -> float | None:
        """How many times better than transformers: our rate over theirs, or their time over ours."""
        if self.hf is None:
            return None
        return self.ours.median / self.hf.median if self.higher_is_better else self.hf.median / self.ours.median


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[Row], bool | None]  # None: cannot tell (a needed reference is missing)


def _t1p_met(row: Row) -> bool:
    return row.ours.median <= 20.0 and row.extra["unseen_over_seen"] <= 1.2


def _t2_met(row: Row) -> bool | None:
    if row.ours.median < 20_000:
        return False
    return None if row.ratio is None else row.ratio >= 3.0


TARGETS: dict[str, Target] = {
    "T1": Target("≥ 160 tok/s", lambda row: row.ours.median >= 160),
    "T1p": Target("≤ 20 ms unseen, ratio ≤ 1.2", _t1p_met),
    "T2": Target("≥ 20,000 tok/s and ≥ 3× transformers", _t2_met),
    "T3": Target("≥ 23,000 tok/s", lambda row: row.ours.median >= 23_000),
}


# ----- measurements -----


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = _COPY_REPEATS) -> Figure:
    """Bytes per second of one large copy on `device`, counting what is read and what is written (the traffic a
    decode step's weight reads compete with); a host copy on the CPU."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = []
    for i in range(repeats + 2):  # the first two warm the copy engine's path and the allocator
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            took = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            took = time.perf_counter() - t0
        if i >= 2:
            seconds.append(took)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Figure([2 * nbytes / s for s in seconds])


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_speed(engine: Any, ids: list[int] | None, max_new_tokens: int, **request: Any) -> tuple[float, float]:
    """(time to first token in seconds, decode tok/s) of one streamed request: the tokens after the first chunk over
    the time from the first chunk to the last. `request`: more arguments of `Engine.generate` (a prompt and its
    images instead of `ids`)."""
    sync(engine.device)
    start = time.perf_counter()
    first_at = last_at = 0.0
    first_count = count = 0
    for chunk in engine.generate(input_ids=ids, sampling_params=greedy(max_new_tokens), stream=True, **request):
        if not chunk["output_ids"]:
            continue
        last_at = time.perf_counter()
        count += len(chunk["output_ids"])
        if not first_count:
            first_at, first_count = last_at, count
    assert count == max_new_tokens, f"asked for {max_new_tokens} tokens, got {count}"
    assert last_at > first_at, "every token came in the first chunk: no decode time to measure"
    return first_at - start, (count - first_count) / (last_at - first_at)


def ttft(engine: Any, ids: list[int] | None = None, **request: Any) -> float:
    """Seconds for one request of one output token; `request` as for `decode_speed`."""
    sync(engine.device)
    start = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params=greedy(1), **request)
    return time.perf_counter() - start


def offline_throughput(engine: Any, prompts: list[list[int]], output_len: int, label: str) -> float:
    """Total (prompt + output) tok/s of all prompts submitted in one `generate` call."""
    stats = engine.scheduler.stats
    before = (stats.generated_tokens, stats.cached_tokens, stats.retractions)
    with progress(f"{label} tokens generated", lambda: stats.generated_tokens - before[0],
                  len(prompts) * output_len):
        sync(engine.device)
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(output_len))
        sync(engine.device)
        seconds = time.perf_counter() - start
    generated = sum(len(o["output_ids"]) for o in outs)
    tok_s = (generated + sum(map(len, prompts))) / seconds
    cached, retracted = stats.cached_tokens - before[1], stats.retractions - before[2]
    say(f"  {label}: {seconds:.2f} s, {fmt_number(tok_s)} total tok/s, {generated} tokens out"
        + (f", {cached} prompt tokens from the cache" if cached else "")
        + (f", {retracted} retractions" if retracted else ""))
    return tok_s


def greedy(max_new_tokens: int) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PromptSource:
    """Random prompts, a fresh seed per call, so no two measurements share a prefix."""

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size = vocab_size
        self._seeds = itertools.count(seed * 1_000_003)

    def take(self, num: int, length: int) -> list[list[int]]:
        return random_prompts(self.vocab_size, num, length, next(self._seeds))

    def one(self, length: int) -> list[int]:
        return self.take(1, length)[0]


def unseen_lengths(base: int, count: int, seen: set[int]) -> Iterator[int]:
    """`count` prompt lengths around `base` (base - 8 + 7k) that are not in `seen`."""
    found = 0
    for n in itertools.count(max(1, base - 8), 7):
        if n not in seen:
            found += 1
            yield n
            if found == count:
                return


# ----- mmserve -----


def run_mmserve(args: argparse.Namespace, server_args: ServerArgs, only: set[str], floor_bw: Figure
                ) -> tuple[dict[str, Row], dict[str, Any]]:
    from mmserve.engine import Engine

    rows: dict[str, Row] = {}
    say(f"mmserve: loading {args.preset or server_args.model_path}")
    with Engine(**vars(server_args)) as engine:
        device = engine.device
        rows["floor"] = floor_row(engine, floor_bw)
        floor = rows["floor"].ours
        prompts = PromptSource(engine.model_config.vocab_size, args.seed)
        warm_up(engine, args, only, prompts)

        if "T1" in only:
            say(f"T1: batch 1, {args.t1_input_len} in / {args.t1_output_len} out, {args.runs} runs")
            ttfts, speeds = [], []
            for i in range(args.runs):
                first, speed = decode_speed(engine, prompts.one(args.t1_input_len), args.t1_output_len)
                ttfts.append(first * 1000)
                speeds.append(speed)
                say(f"  run {i + 1}: {speed:.1f} decode tok/s, first token {first * 1000:.1f} ms")
            t1 = Figure(speeds)
            rows["T1"] = Row("T1", f"batch 1, {args.t1_input_len} in / {args.t1_output_len} out, decode", "tok/s", t1,
                             detail=f"{100 * t1.median / floor.median:.0f}% of floor",
                             extra={"pct_of_floor": 100 * t1.median / floor.median, "ttft_ms": Figure(ttfts).to_json()})

        if "T1p" in only:
            seen_lengths = {args.t1_input_len, args.t1p_input_len, args.t2_input_len, args.t3_input_len}
            lengths = list(unseen_lengths(args.t1p_input_len, args.runs, seen_lengths))
            say(f"T1': time to first token, unseen lengths {lengths} vs seen length {args.t1p_input_len}")
            unseen, seen = [], []
            for n in lengths:
                unseen.append(1000 * ttft(engine, prompts.one(n)))
                seen.append(1000 * ttft(engine, prompts.one(args.t1p_input_len)))
                say(f"  length {n}: {unseen[-1]:.1f} ms; length {args.t1p_input_len} again: {seen[-1]:.1f} ms")
            unseen_fig, seen_fig = Figure(unseen), Figure(seen)
            ratio = unseen_fig.median / seen_fig.median
            rows["T1p"] = Row("T1p", f"time to first token, ~{args.t1p_input_len} in, unseen length", "ms", unseen_fig,
                              detail=f"seen {seen_fig.cell('ms')}, ratio {ratio:.2f}",
                              extra={"seen": seen_fig.to_json(), "unseen_over_seen": ratio, "unseen_lengths": lengths})

        for row_id, num, n_in, n_out in (("T2", args.t2_prompts, args.t2_input_len, args.t2_output_len),
                                         ("T3", args.t3_prompts, args.t3_input_len, args.t3_output_len)):
            if row_id not in only:
                continue
            say(f"{row_id}: {num} prompts x {n_in} in / {n_out} out, all at once")
            runs = [offline_throughput(engine, prompts.take(num, n_in), n_out, f"{row_id} run {i + 1}")
                    for i in range(args.runs)]
            rows[row_id] = Row(row_id, f"{num} × {n_in} in / {n_out} out, offline, total", "tok/s", Figure(runs))

        env = {"device": device_name(device), "dtype": str(engine.model_config.dtype).removeprefix("torch."),
               "vocab_size": engine.model_config.vocab_size}
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        say(f"mmserve: shut down, {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB still allocated")
    return rows, env


def floor_row(engine: Any, floor_bw: Figure) -> Row:
    """The batch-1 decode floor: `floor_bw` (copy_bandwidth) over the bytes of the engine's parameters."""
    model_bytes = weight_bytes(engine.runner.model)
    copy = "copy" if engine.device.type == "cuda" else "host copy"
    return Row("floor", f"batch-1 decode floor = {copy} bandwidth / weight bytes "
               f"({fmt_number(floor_bw.median / 1e9)} GB/s / {model_bytes / 1e9:.2f} GB)", "tok/s",
               Figure([bw / model_bytes for bw in floor_bw.runs]),
               extra={"copy_bytes_per_s": floor_bw.to_json(), "weight_bytes": model_bytes})


def warm_up(engine: Any, args: argparse.Namespace, only: set[str], prompts: PromptSource) -> None:
    say("mmserve: warm-up")
    engine.generate(input_ids=prompts.take(2, args.t1_input_len), sampling_params=greedy(2))
    decode_speed(engine, prompts.one(args.t1_input_len), min(8, args.t1_output_len))
    if "T1p" in only:
        ttft(engine, prompts.one(args.t1p_input_len))  # the seen length, seen
    if only & {"T2", "T3"}:  # the largest batch, so its allocations are made before anything is timed
        engine.generate(input_ids=prompts.take(args.t2_prompts, args.t2_input_len), sampling_params=greedy(4))
    sync(engine.device)


# ----- transformers -----


def run_hf(args: argparse.Namespace, server_args: ServerArgs, only: set[str], vocab_size: int) -> dict[str, Figure]:
    model = load_hf_model(server_args)
    device = next(model.parameters()).device
    prompts = PromptSource(vocab_size, args.seed + 1)
    say("transformers: warm-up")
    hf_generate(model, prompts.take(1, args.t1_input_len), 2)
    if "T2" in only:
        hf_generate(model, prompts.take(min(args.hf_batch_size, args.t2_prompts), args.t2_input_len), 2)
    figures: dict[str, Figure] = {}
    if "T1" in only:
        say(f"transformers T1: batch 1, {args.t1_input_len} in, 1 and {args.t1_output_len} out, {args.hf_runs} runs")
        speeds = []
        for i in range(args.hf_runs):
            ids = prompts.take(1, args.t1_input_len)
            one, full = hf_generate(model, ids, 1), hf_generate(model, ids, args.t1_output_len)
            speeds.append((args.t1_output_len - 1) / (full - one))
            say(f"  run {i + 1}: {speeds[-1]:.1f} decode tok/s ({one * 1000:.1f} ms for 1 token, {full:.2f} s for "
                f"{args.t1_output_len})")
        figures["T1"] = Figure(speeds)
    if "T2" in only:
        # the reference's rate over its first --hf-t2-prompts prompts (whole batches of the same shape run at the
        # same rate; a slow reference, e.g. a mixture of experts looping over experts, need not run them all)
        num = min(args.t2_prompts, args.hf_t2_prompts or args.t2_prompts)
        say(f"transformers T2: {num} prompts x {args.t2_input_len} in / {args.t2_output_len} out, "
            f"batches of {args.hf_batch_size}, {args.hf_runs} runs")
        runs = []
        for i in range(args.hf_runs):
            seconds = hf_batched(model, prompts.take(num, args.t2_input_len), args.t2_output_len, args.hf_batch_size)
            runs.append(num * (args.t2_input_len + args.t2_output_len) / seconds)
            say(f"  run {i + 1}: {seconds:.2f} s, {fmt_number(runs[-1])} total tok/s")
        figures["T2"] = Figure(runs)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def hf_batched(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, batch_size: int) -> float:
    """Seconds for `generate` over all `prompts` in batches of `batch_size`, one batch after another."""
    seconds, finished = 0.0, 0
    with progress("prompts done", lambda: finished, len(prompts)):
        for i in range(0, len(prompts), batch_size):
            part = prompts[i : i + batch_size]
            seconds += hf_generate(model, part, new_tokens)
            finished += len(part)
    return seconds


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for `generate` to make exactly `new_tokens` greedy tokens for each of the equal-length `prompts`
    (one batch, so no padding is needed)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, pad_token_id=0)
    sync(device)
    return time.perf_counter() - start


# ----- the table -----


def build_table(rows: list[Row], hf_skipped: bool, targets: dict[str, Target] = TARGETS,
                hf_row_ids: tuple[str, ...] = ("T1", "T2")) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """The printed cells (a header first) and the same rows for the JSON; `hf_row_ids`: the rows that have a
    transformers reference (shown as skipped with --no-hf)."""
    cells = [["id", "workload", "mmserve (median [min–max])", "transformers", "vs transformers", "target", "met?"]]
    records = []
    for row in rows:
        target = targets.get(row.id)
        met = target.check(row) if target is not None else None
        ours = row.ours.cell(row.unit) + (f", {row.detail}" if row.detail else "")
        hf = row.hf.cell(row.unit) if row.hf is not None else ("skipped" if hf_skipped and row.id in hf_row_ids
                                                                 else "—")
        ratio = f"{row.ratio:.2f}×" if row.ratio is not None else "—"
        shown_met = "—" if target is None else {True: "yes", False: "no", None: "?"}[met]
        cells.append([row.id, row.workload, ours, hf, ratio, target.text if target else "—", shown_met])
        records.append({"id": row.id, "workload": row.workload, "unit": row.unit, "mmserve": row.ours.to_json(),
                        "transformers": row.hf.to_json() if row.hf is not None else None, "ratio": row.ratio,
                        "target": target.text if target else None, "met": met, **row.extra})
    return cells, records


def format_table(cells: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def parse_only(text: str | None, parser: argparse.ArgumentParser, row_ids: tuple[str, ...] = ROW_IDS,
               aliases: dict[str, str] | None = None) -> set[str]:
    """The rows of --only (any case; `aliases`, lower case, name rows too), and the floor, which always runs."""
    if not text:
        return set(row_ids)
    by_lower = {r.lower(): r for r in row_ids} | ({"t1'": "T1p"} if aliases is None else aliases)
    wanted = {w.strip().lower() for w in text.split(",") if w.strip()}
    unknown = sorted(wanted - set(by_lower))
    if unknown:
        parser.error(f"--only: unknown row(s) {', '.join(unknown)}; choose from {', '.join(row_ids)}")
    return {by_lower[w] for w in wanted} | {"floor"}


def add_table_args(parser: argparse.ArgumentParser, only_help: str, hf_batch_size: int, hf_batch_for: str) -> None:
    """The options every table command shares (bench.fastpath, bench.multimodal)."""
    parser.add_argument("--only", help=only_help)
    parser.add_argument("--runs", type=int, default=3, help="Runs of each mmserve measurement (default: 3).")
    parser.add_argument("--hf-runs", type=int, default=1, help="Runs of each transformers measurement (default: 1).")
    parser.add_argument("--no-hf", action="store_true", help="Skip the transformers reference.")
    parser.add_argument("--hf-batch-size", type=int, default=hf_batch_size,
                        help=f"transformers' batch for {hf_batch_for} (default: {hf_batch_size}).")
    parser.add_argument("--json", type=Path, help="Also write the table to this file as JSON.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-mib", type=int, default=2048, help="Size of the copy that measures bandwidth for "
                        "the floor row, in MiB (default: 2048).")


def parse_table_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                     counts: list[tuple[str, int]]) -> argparse.Namespace:
    """Parse with the preset and server options added, checking the shared options and the `counts` (>= 1)."""
    add_preset_args(parser)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.hf_runs < 1 or args.hf_batch_size < 1 or args.copy_mib < 1:
        parser.error("--runs, --hf-runs, --hf-batch-size and --copy-mib must be at least 1")
    if min(getattr(args, name.replace("-", "_")) for name, _ in counts) < 1:
        parser.error("prompt counts and lengths must be at least 1")
    return args


def start_table(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[ServerArgs, Figure]:
    """Logging, the preset's folder, the server arguments, and the floor's copy bandwidth, printed."""
    logging.basicConfig(level=getattr(args, "log_level", ServerArgs.log_level).upper(), format="%(message)s")
    apply_preset(args, parser)
    server_args = ServerArgs.from_cli_args(args)
    device = server_args.resolved_device()
    say(f"floor: copying {args.copy_mib} MiB on {device}, {_COPY_REPEATS} times")
    bandwidth = copy_bandwidth(device, args.copy_mib * 2**20)
    say(f"  {bandwidth.median / 1e9:,.0f} GB/s (read + write)")
    return server_args, bandwidth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_args(parser, f"Rows to run, comma-separated, from {', '.join(ROW_IDS)} (default: all; floor always "
                   "runs).", 64, "T2")
    parser.add_argument("--hf-t2-prompts", type=int, default=None,
                        help="Time transformers on only the first N of T2's prompts (its rate; default: all).")
    sizes = [("t1-input-len", 128), ("t1-output-len", 256), ("t1p-input-len", 128), ("t2-prompts", 256),
             ("t2-input-len", 512), ("t2-output-len", 128), ("t3-prompts", 1000), ("t3-input-len", 256),
             ("t3-output-len", 256)]
    for name, default in sizes:
        parser.add_argument(f"--{name}", type=int, default=default, help=f"(default: {default})")
    args = parse_table_args(parser, argv, sizes)
    if args.t1_output_len < 2:
        parser.error("--t1-output-len must be at least 2 (decode speed needs tokens after the first)")
    only = parse_only(args.only, parser)
    server_args, bandwidth = start_table(args, parser)
    rows, env = run_mmserve(args, server_args, only, bandwidth)
    if not args.no_hf and only & {"T1", "T2"}:
        for row_id, figure in run_hf(args, server_args, only, env["vocab_size"]).items():
            rows[row_id].hf = figure

    ordered = [rows[r] for r in ROW_IDS if r in rows]
    cells, records = build_table(ordered, args.no_hf)
    notes = [
        "floor: one large device-to-device copy timed with CUDA events (host copy on the CPU), read + write bytes, "
        "over the bytes of the engine's parameters",
        "T1: one streamed request; decode tok/s = tokens after the first / (last token's arrival - first's); "
        "transformers: (N - 1) / (time of generate for N tokens - for 1 token)",
        "T1p: ms to the one output token of a single request; unseen = a prompt length not run before",
        "T2, T3: total tok/s = (prompt + output tokens) / seconds of one generate call with every prompt; "
        "transformers: batches of --hf-batch-size, one after another",
        "targets are issue 15's, for llama-3.1-8b on an H100",
    ]
    report(args, server_args, env, cells, records, notes)


def report(args: argparse.Namespace, server_args: ServerArgs, env: dict[str, Any], cells: list[list[str]],
           records: list[dict[str, Any]], notes: list[str]) -> None:
    """Print the table, its notes and a line on the machine and versions; with --json, write them to that file."""
    import transformers

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    env |= {"model": args.preset or server_args.model_path, "torch": torch.__version__,
            "transformers": transformers.__version__, "date": now, "runs": args.runs, "hf_runs": args.hf_runs}
    if any(r["met"] is None and r["target"] is not None for r in records):
        notes = [*notes, "?: the figure meets its part of the target; the comparison with transformers was not run"]
    print()
    print(format_table(cells))
    for note in notes:
        print(f"  {note}")
    print(f"{env['device']} | model {env['model']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"dtype {env['dtype']} | {now}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": records, "env": env, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
