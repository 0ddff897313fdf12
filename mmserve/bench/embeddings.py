"""Issue 21's GPU row: embedding throughput, sequences per second of prompts of one length through `Engine.encode`,
at a real embedder's shape (a preset), beside transformers' `AutoModel` on the same weights in the same process.

    python -m mmserve.bench.embeddings --preset gte-qwen2-1.5b --tokenizer-dir DIR [--sequences 1024]
        [--input-len 512] [--runs 3] [--no-hf]

Every sequence is --input-len random token ids, new ones each run, so the prefix cache never helps. mmserve gets
them all in one `encode` call; transformers gets batches of --hf-batch-size (no padding: the lengths are equal),
pools the last token and L2-normalises, as the model is served. With random weights (a preset's), transformers
draws them and saves them in a temporary folder beside the config before the engine starts (removed at the end), so
both sides load the same tensors and the first four sequences' embeddings are compared (their cosines printed).
Each mmserve figure is the median of --runs runs, with min-max beside it; the transformers rows (--hf-runs each,
none with --no-hf) run after the engine is shut down and its memory freed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmserve.bench.fastpath import (
    Figure,
    PromptSource,
    Row,
    add_table_args,
    build_table,
    device_name,
    floor_row,
    fmt_number,
    parse_only,
    parse_table_args,
    report,
    start_table,
    sync,
)
from mmserve.bench.offline import progress, say
from mmserve.config import ServerArgs

# floor: the GPU's copy bandwidth over the weights' bytes; E1: embedding throughput
ROW_IDS = ("floor", "E1")
_CHECKED = 4  # sequences whose embeddings are compared with transformers'
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}
NOTES = [
    "floor: one large device-to-device copy timed with CUDA events (host copy on the CPU), read + write bytes, over "
    "the bytes of the engine's parameters (a batch-1 decode bound, shown for the GPU's scale)",
    "E1: sequences / wall seconds of one encode call with every sequence (embeddings back on the host); "
    "transformers: AutoModel on the same weights, batches of --hf-batch-size, last token, L2-normalised, copied "
    "to the host",
    "vs transformers: times faster (our rate over theirs)",
]


def shared_weights(server_args: ServerArgs) -> ServerArgs:
    """For --load-format dummy, a fresh folder with the model folder's config and tokenizer and transformers'
    random weights saved in it, loaded by the engine as a checkpoint: mmserve's own random weights differ from
    transformers', and comparing embeddings needs the same tensors on both sides."""
    from transformers import AutoModel

    from mmserve.config import resolve_dtype
    from mmserve.models.loader import load_hf_config, resolve_model_path

    folder = resolve_model_path(server_args.model_path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: a dummy-weight comparison needs a model folder (a .gguf has weights: drop "
                         "--load-format dummy)")
    out = Path(tempfile.mkdtemp(prefix="mmserve-embeddings-"))
    for f in folder.iterdir():
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy(f, out / f.name)
    config = load_hf_config(folder)
    device = server_args.resolved_device()
    say(f"transformers: drawing random weights for {server_args.model_path}, saving them to {out}")
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=resolve_dtype(server_args.dtype, config, device))
    model.save_pretrained(out)
    del model
    _free(device)
    return dataclasses.replace(server_args, model_path=str(out), load_format="auto")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Checked:
    """The sequences whose embeddings both sides compute, with mmserve's embeddings of them."""

    ids: list[list[int]]
    embeddings: list[list[float]]


def cosines(ours: list[list[float]], theirs: torch.Tensor) -> list[float]:
    """Cosine similarity of each of our embeddings with transformers' (rows of `theirs`), in float64."""
    a = torch.tensor(ours, dtype=torch.float64)
    return F.cosine_similarity(a, theirs.to(torch.float64), dim=-1).tolist()


# ----- mmserve -----


def run_mmserve(args: argparse.Namespace, server_args: ServerArgs, only: set[str], floor_bw: Figure
                ) -> tuple[dict[str, Row], dict[str, Any], Checked]:
    """The table's rows, the environment, and the sequences transformers checks with their embeddings; the engine
    is shut down and its memory freed after."""
    from mmserve.engine import Engine

    say(f"mmserve: loading {args.preset or server_args.model_path}")
    with Engine(**vars(server_args)) as engine:
        if not engine.model_config.is_embedding:
            raise ValueError(f"{server_args.model_path} is a generative model; this benchmark needs an embedder "
                             "(e.g. --preset gte-qwen2-1.5b, or --is-embedding)")
        device = engine.device
        rows = {"floor": floor_row(engine, floor_bw)}
        vocab = engine.model_config.vocab_size
        prompts = PromptSource(vocab, args.seed)
        checked_ids = prompts.take(_CHECKED, args.input_len)
        checked = Checked(checked_ids, [o["embedding"] for o in engine.encode(checked_ids)])
        env = {"device": device_name(device), "dtype": str(engine.model_config.dtype).removeprefix("torch."),
               "vocab_size": vocab}
        if "E1" in only:
            rows["E1"] = measure_encode(engine, args, prompts)
    del engine
    _free(device)
    if device.type == "cuda":
        say(f"mmserve: shut down, {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB still allocated")
    return rows, env, checked


def measure_encode(engine: Any, args: argparse.Namespace, prompts: PromptSource) -> Row:
    """E1: --runs times, sequences per second of one `encode` call with --sequences new prompts."""
    say(f"mmserve: warm-up, {args.sequences} sequences")  # the whole batch, so its allocations come first
    engine.encode(prompts.take(args.sequences, args.input_len))
    say(f"E1: {args.sequences} sequences x {args.input_len} tokens, one encode call, {args.runs} runs")
    runs, dimensions = [], 0
    for i in range(args.runs):
        batch = prompts.take(args.sequences, args.input_len)
        sync(engine.device)
        start = time.perf_counter()
        outs = engine.encode(batch)
        sync(engine.device)
        seconds = time.perf_counter() - start
        tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        assert tokens == args.sequences * args.input_len, f"{tokens} prompt tokens pooled"
        dimensions = len(outs[0]["embedding"])
        runs.append(args.sequences / seconds)
        say(f"  run {i + 1}: {seconds:.2f} s, {runs[-1]:,.1f} seq/s")
    figure = Figure(runs)
    return Row("E1", f"{args.sequences} × {args.input_len} tokens, one encode call", "seq/s", figure,
               detail=f"{fmt_number(figure.median * args.input_len)} tok/s",
               extra={"sequences": args.sequences, "input_len": args.input_len, "dimensions": dimensions})


# ----- transformers -----


class HFEmbedder:
    """transformers' bare model (`AutoModel`) of the checkpoint: the last token's final hidden state,
    L2-normalised, as mmserve pools a decoder embedder."""

    def __init__(self, server_args: ServerArgs):
        from transformers import AutoModel

        from mmserve.config import resolve_dtype
        from mmserve.models.loader import load_hf_config, resolve_model_path, split_gguf

        path = resolve_model_path(server_args.model_path)
        self.device = server_args.resolved_device()
        dtype = resolve_dtype(server_args.dtype, load_hf_config(path), self.device)
        say(f"transformers: loading {server_args.model_path}")
        folder, gguf = split_gguf(path)
        self.model = AutoModel.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(self.device).eval()

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """The embeddings of equal-length `prompts` as one batch, on the host in float32."""
        ids = torch.tensor(prompts, device=self.device)
        hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return F.normalize(hidden[:, -1].float(), dim=-1).cpu()

    def seconds(self, prompts: list[list[int]], batch_size: int) -> float:
        """Seconds to embed all `prompts` in batches of `batch_size`, one batch after another."""
        sync(self.device)
        start, finished = time.perf_counter(), 0
        with progress("sequences done", lambda: finished, len(prompts)):
            for i in range(0, len(prompts), batch_size):
                self.embed(prompts[i : i + batch_size])
                finished = min(len(prompts), i + batch_size)
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        del self.model
        _free(self.device)


def run_hf(args: argparse.Namespace, server_args: ServerArgs, only: set[str], vocab: int, checked: Checked
           ) -> tuple[Figure | None, list[float]]:
    """transformers' seq/s over --hf-runs runs (with E1), and the cosines of its embeddings of the checked
    sequences with mmserve's."""
    hf = HFEmbedder(server_args)
    agreement = cosines(checked.embeddings, hf.embed(checked.ids))
    say(f"embeddings of the first {_CHECKED} sequences, cosine with mmserve's: "
        + ", ".join(f"{c:.6f}" for c in agreement))
    if "E1" not in only:
        hf.close()
        return None, agreement
    prompts = PromptSource(vocab, args.seed + 1)
    batch = min(args.hf_batch_size, args.sequences)
    say("transformers: warm-up")
    hf.embed(prompts.take(batch, args.input_len))
    say(f"transformers E1: {args.sequences} sequences x {args.input_len} tokens, batches of {batch}, "
        f"{args.hf_runs} runs")
    runs = []
    for i in range(args.hf_runs):
        seconds = hf.seconds(prompts.take(args.sequences, args.input_len), batch)
        runs.append(args.sequences / seconds)
        say(f"  run {i + 1}: {seconds:.2f} s, {runs[-1]:,.1f} seq/s")
    hf.close()
    return Figure(runs), agreement


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_args(parser, f"Rows to run, comma-separated, from {', '.join(ROW_IDS)} (default: all; floor always "
                   "runs).", 32, "E1")
    counts = [("sequences", 1024), ("input-len", 512)]
    for name, default in counts:
        parser.add_argument(f"--{name}", type=int, default=default, help=f"(default: {default})")
    args = parse_table_args(parser, argv, counts)
    only = parse_only(args.only, parser, ROW_IDS, aliases={})
    server_args, bandwidth = start_table(args, parser)
    saved = None  # the folder of saved random weights (gigabytes at a real shape), removed at the end
    if not args.no_hf and server_args.load_format == "dummy":
        server_args = shared_weights(server_args)
        saved = Path(server_args.model_path)
    notes = list(NOTES)
    try:
        rows, env, checked = run_mmserve(args, server_args, only, bandwidth)
        if not args.no_hf:
            figure, agreement = run_hf(args, server_args, only, env["vocab_size"], checked)
            env["cosine_vs_transformers"] = agreement
            if "E1" in rows:
                rows["E1"].hf = figure
            notes.append(f"the first {_CHECKED} sequences' embeddings vs transformers': cosine "
                         + ", ".join(f"{c:.6f}" for c in agreement))
    finally:
        if saved is not None:
            shutil.rmtree(saved, ignore_errors=True)

    ordered = [rows[r] for r in ROW_IDS if r in rows]
    cells, records = build_table(ordered, args.no_hf, {}, hf_row_ids=("E1",))
    command = shlex.join(["python", "-m", "mmserve.bench.embeddings", *(sys.argv[1:] if argv is None else argv)])
    report(args, server_args, env, cells, records, [*notes, f"command: {command}"])


if __name__ == "__main__":
    main()
