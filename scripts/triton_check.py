"""Check the Triton attention backend against the torch backend at real shapes, then time both per layer call.

On a GPU (from the repository root):   python scripts/triton_check.py [--sweep] [--skip-check] [--skip-timing]
  1. correctness: paged decode and extend at head dims 64/80/128/256, GQA ratios 1/4/7/8, lengths 1..8192, with and
     without sliding windows, extend with bidirectional spans (256-token images, as Gemma 3's), and encoder-only
     layers, in bfloat16. Both backends are compared with the torch backend run in float32 on the
     same data; the Triton error must stay within max(2 x the torch-bf16 error, 2e-2), and no output may be NaN/inf.
  2. timing: one layer's decode and extend attention (the kernels alone, KV already in the pool; metadata prepared
     once per step as in the engine, not timed), median of CUDA-event timings, torch vs triton, as one table.
  3. --sweep: the same timing cases for a grid of block sizes / warps / stages / split lengths, best first.
On a CPU it runs the correctness part on tiny shapes in Triton's interpreter (TRITON_INTERPRET=1), without timing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. before their module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmserve.attention.base import Attention, AttentionBackend, AttentionType  # noqa: E402
from mmserve.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from mmserve.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from mmserve.attention.triton_kernels import DecodeBlocks, ExtendBlocks  # noqa: E402
from mmserve.cache.kv_pool import KVPool, ReqToTokenPool  # noqa: E402
from mmserve.forward_batch import ForwardBatch, ForwardMode  # noqa: E402

DECODE, EXTEND = ForwardMode.DECODE, ForwardMode.EXTEND
BIDI, ENCODER = AttentionType.DECODER_BIDIRECTIONAL, AttentionType.ENCODER_ONLY


@dataclass
class Case:
    mode: ForwardMode
    heads: int
    kv_heads: int
    head_dim: int
    lens: list[tuple[int, int]]  # (seq_len, extend_len) per request
    window: int | None = None
    attn_type: AttentionType = AttentionType.DECODER
    spans: list[list[tuple[int, int]]] | None = None  # per request, for BIDI layers (see `image_spans`)

    def describe(self) -> str:
        seqs = sorted({s for s, _ in self.lens})
        exts = sorted({e for _, e in self.lens})
        span = lambda xs: str(xs[0]) if len(xs) == 1 else f"{xs[0]}..{xs[-1]}"
        what = f"kv {span(seqs)}" + ("" if self.mode == DECODE else f" new {span(exts)}")
        window = f" w{self.window}" if self.window else ""
        kind = {BIDI: f" spans {sum(map(len, self.spans or []))}", ENCODER: " encoder"}.get(self.attn_type, "")
        return (f"{self.mode.name.lower():6} h{self.heads}/kv{self.kv_heads} d{self.head_dim:<3} B={len(self.lens):<3} "
                f"{what}{window}{kind}")


def image_spans(lens: list[tuple[int, int]], size: int, gap: int) -> list[list[tuple[int, int]]]:
    """Bidirectional spans of `size` tokens every `gap` tokens in each request's new tokens, the first starting two
    tokens before them where a prefix is cached (an image whose start came from the cache)."""
    spans = []
    for seq_len, extend_len in lens:
        prefix = seq_len - extend_len
        start = prefix - 2 if prefix >= 2 else prefix + 1
        spans.append([(a, a + size) for a in range(start, seq_len - size + 1, size + gap)])
    return spans


class Setup:
    """A one-layer KV pool filled with random K/V, requests on scattered slots, and this step's q/k/v."""

    def __init__(self, case: Case, dtype: torch.dtype, device: str, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        total = sum(s for s, _ in case.lens)
        self.case, self.dtype, self.device = case, dtype, device
        self.pool = KVPool(total + 1, 1, case.kv_heads, case.head_dim, dtype, device)
        for buf in (self.pool.k_buffers[0], self.pool.v_buffers[0]):
            buf.copy_(torch.randn(buf.shape, generator=g, device=device, dtype=torch.float32))
        self.table = ReqToTokenPool(len(case.lens), max(s for s, _ in case.lens), device)
        slots = torch.randperm(total, generator=g, device=device) + 1  # scattered, as after much churn
        out_loc, offset = [], 0
        for row, (seq_len, extend_len) in enumerate(case.lens):
            self.table.req_to_token[row, :seq_len] = slots[offset : offset + seq_len]
            out_loc.append(slots[offset + seq_len - extend_len : offset + seq_len])
            offset += seq_len
        self.out_cache_loc = torch.cat(out_loc)
        tokens = sum(e for _, e in case.lens)
        h, kv, d = case.heads, case.kv_heads, case.head_dim
        qkv = torch.randn(tokens, (h + 2 * kv) * d, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.q, self.k, self.v = qkv.split([h * d, kv * d, kv * d], dim=1)  # strided views, as in the model
        self.layer = Attention(h, d, kv, 0, sliding_window=case.window, attn_type=case.attn_type)

    def to(self, dtype: torch.dtype) -> Setup:
        """The same data in another dtype (the float32 reference)."""
        other = object.__new__(Setup)
        other.__dict__.update(self.__dict__)
        other.dtype = dtype
        other.pool = KVPool(self.pool.size, 1, self.case.kv_heads, self.case.head_dim, dtype, self.device)
        other.pool.k_buffers[0].copy_(self.pool.k_buffers[0])
        other.pool.v_buffers[0].copy_(self.pool.v_buffers[0])
        other.q, other.k, other.v = self.q.to(dtype), self.k.to(dtype), self.v.to(dtype)
        return other

    def batch(self, backend: AttentionBackend) -> ForwardBatch:
        lens = self.case.lens
        tokens = sum(e for _, e in lens)
        batch = ForwardBatch(
            mode=self.case.mode, input_ids=torch.zeros(tokens, dtype=torch.int64, device=self.device),
            positions=torch.zeros(tokens, dtype=torch.int64, device=self.device), out_cache_loc=self.out_cache_loc,
            req_pool_indices=torch.arange(len(lens), device=self.device),
            seq_lens=torch.tensor([s for s, _ in lens], device=self.device), seq_lens_cpu=[s for s, _ in lens],
            extend_lens_cpu=[e for _, e in lens], logits_indices=None, bidirectional_spans=self.case.spans,
        )
        backend.bind(self.pool, self.table.req_to_token).init_forward_metadata(batch)
        return batch

    def run(self, backend: AttentionBackend) -> torch.Tensor:
        """The whole layer call (writes this step's k/v, then attends): [tokens, heads * head_dim]."""
        return backend.forward(self.q, self.k, self.v, self.layer, self.batch(backend))

    def attention_call(self, backend: AttentionBackend):
        """A closure running only the attention of one layer (KV already stored), for timing."""
        batch = self.batch(backend)
        backend.forward(self.q, self.k, self.v, self.layer, batch)  # stores k/v, warms masks and kernels up
        h, d = self.case.heads, self.case.head_dim
        q = self.q.view(-1, h, d)
        if self.case.mode == DECODE:
            return lambda: backend.forward_decode(q, self.layer, batch)
        k, v = self.k.view(-1, self.case.kv_heads, d), self.v.view(-1, self.case.kv_heads, d)
        if self.case.attn_type is ENCODER:
            return lambda: backend.forward_encoder(q, k, v, self.layer, batch)
        return lambda: backend.forward_extend(q, self.layer, batch, k, v)


def random_lens(count: int, low: int, high: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=g).tolist()


def check_cases(tiny: bool) -> list[Case]:
    if tiny:  # the interpreter: a few programs per kernel
        return [
            Case(DECODE, 4, 1, 64, [(1, 1), (37, 1), (20, 1)]),
            Case(DECODE, 6, 2, 80, [(30, 1), (5, 1)], window=7),
            Case(EXTEND, 4, 2, 64, [(30, 30), (40, 9), (3, 1)]),
            Case(EXTEND, 4, 4, 80, [(33, 20)], window=6),
            Case(EXTEND, 4, 2, 64, [(30, 30), (40, 25)], None, BIDI, image_spans([(30, 30), (40, 25)], 9, 3)),
            Case(EXTEND, 4, 2, 64, [(40, 25)], 5, BIDI, image_spans([(40, 25)], 9, 3)),
            Case(EXTEND, 4, 2, 64, [(30, 30), (7, 7)], None, ENCODER),
            Case(EXTEND, 4, 2, 64, [(30, 30)], 6, ENCODER),
        ]
    cases = []
    shapes = [(32, 8, 128), (28, 4, 128), (14, 2, 64), (32, 32, 80), (16, 8, 256), (64, 8, 128)]
    for i, (h, kv, d) in enumerate(shapes):
        decode_lens = [1, 8192] + random_lens(14, 2, 8192, i)
        for window in (None, 4096, 100):
            cases.append(Case(DECODE, h, kv, d, [(n, 1) for n in decode_lens], window))
        extend = [(8192, 8192), (8192, 512), (3000, 1), (100, 100), (5000, 2000), (1, 1), (700, 333)]
        for window in (None, 4096, 100):
            cases.append(Case(EXTEND, h, kv, d, extend, window))
        fresh = [(3000, 3000), (300, 300), (1, 1), (700, 700)]
        for lens in (extend, fresh):  # with a cached prefix: the kernel; fresh: the kernel, not flash attention
            for window in (None, 512, 100):
                cases.append(Case(EXTEND, h, kv, d, lens, window, BIDI, image_spans(lens, 256, 200)))
        for window in (None, 100):  # flash attention (non-causal), then the kernel's encoder variant
            cases.append(Case(EXTEND, h, kv, d, fresh, window, ENCODER))
    return cases


def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.float() - ref.float()).abs().max().item()


def run_checks(device: str, tiny: bool) -> bool:
    dtype = torch.bfloat16
    triton_backend = (TritonAttentionBackend(device, max_kv_splits=4, min_split_len=8,
                                             decode_blocks=DecodeBlocks(16, 4, 1),
                                             extend_blocks=ExtendBlocks(16, 16, 4, 1))
                      if tiny else TritonAttentionBackend(device))
    torch_backend = TorchAttentionBackend()
    ok = True
    print(f"{'case':60} {'torch-bf16 err':>15} {'triton-bf16 err':>16}  result")
    for case in check_cases(tiny):
        setup = Setup(case, dtype, device)
        reference = setup.to(torch.float32).run(torch_backend)
        torch_err = max_error(setup.run(torch_backend), reference)
        got = setup.run(triton_backend)
        finite = bool(torch.isfinite(got).all())
        triton_err = max_error(got, reference)
        passed = finite and triton_err <= max(2 * torch_err, 2e-2)
        ok &= passed
        verdict = "ok" if passed else ("NOT FINITE" if not finite else "FAIL")
        print(f"{case.describe():60} {torch_err:15.2e} {triton_err:16.2e}  {verdict}", flush=True)
    return ok


def timing_cases() -> list[Case]:
    cases = []
    for h, kv, d in [(32, 8, 128), (14, 2, 64)]:
        for batch, ctx in [(1, 1024), (1, 8192), (16, 2048), (64, 1024), (64, 4096), (256, 1024)]:
            cases.append(Case(DECODE, h, kv, d, [(ctx, 1)] * batch))
        cases.append(Case(DECODE, h, kv, d, [(n, 1) for n in random_lens(64, 16, 8192, 7)]))
        cases.append(Case(EXTEND, h, kv, d, [(8192, 8192)]))
        cases.append(Case(EXTEND, h, kv, d, [(8192, 2048)]))
        cases.append(Case(EXTEND, h, kv, d, [(512, 512)] * 8))
        cases.append(Case(EXTEND, h, kv, d, [(1152, 128)] * 32))
    cases.append(Case(DECODE, 32, 8, 128, [(8192, 1)] * 16, window=4096))
    cases.append(Case(EXTEND, 32, 8, 128, [(8192, 8192)], window=4096))
    cases.append(Case(DECODE, 16, 8, 256, [(4096, 1)] * 16))
    cases.append(Case(EXTEND, 16, 8, 256, [(4096, 4096)]))
    cases.append(Case(DECODE, 32, 32, 80, [(2048, 1)] * 16))
    cases.append(Case(EXTEND, 32, 32, 80, [(2048, 2048)]))
    # Gemma 3's shape (16/8 heads of 256): a prompt with four images, alone and behind a cached prefix; an encoder
    lens = [(2048, 2048)]
    cases.append(Case(EXTEND, 16, 8, 256, lens, None, BIDI, image_spans(lens, 256, 200)))
    cases.append(Case(EXTEND, 16, 8, 256, lens, 512, BIDI, image_spans(lens, 256, 200)))
    lens = [(4096, 2048)]
    cases.append(Case(EXTEND, 16, 8, 256, lens, None, BIDI, image_spans(lens, 256, 200)))
    cases.append(Case(EXTEND, 16, 16, 64, [(512, 512)] * 16, None, ENCODER))
    return cases


def median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_timing(device: str) -> None:
    dtype = torch.bfloat16
    print(f"\nper layer call, bfloat16, median of 30 ({torch.cuda.get_device_name()})")
    print(f"{'case':60} {'torch ms':>9} {'triton ms':>10} {'speedup':>8}")
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend(device)
    for case in timing_cases():
        setup = Setup(case, dtype, device)
        try:
            torch_ms = f"{median_ms(setup.attention_call(torch_backend)):9.3f}"
        except torch.OutOfMemoryError:
            torch_ms = f"{'OOM':>9}"
        torch.cuda.empty_cache()
        triton_ms = median_ms(setup.attention_call(triton_backend))
        speedup = f"{float(torch_ms) / triton_ms:7.2f}x" if torch_ms.strip() != "OOM" else ""
        print(f"{case.describe():60} {torch_ms} {triton_ms:10.3f} {speedup:>8}", flush=True)
        del setup
        torch.cuda.empty_cache()


def run_sweep(device: str) -> None:
    dtype = torch.bfloat16
    decode_grid = [(DecodeBlocks(n, w, s), split) for n, w, s, split in
                   itertools.product((32, 64, 128), (4, 8), (1, 2, 3), (128, 256, 512))]
    extend_grid = [ExtendBlocks(m, n, w, s) for m, n, w, s in
                   itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))]
    cases = []
    for h, kv, d in [(32, 8, 128), (14, 2, 64)]:
        cases += [Case(DECODE, h, kv, d, [(8192, 1)]), Case(DECODE, h, kv, d, [(4096, 1)] * 64),
                  Case(DECODE, h, kv, d, [(n, 1) for n in random_lens(64, 16, 8192, 7)]),
                  Case(EXTEND, h, kv, d, [(8192, 8192)]), Case(EXTEND, h, kv, d, [(1152, 128)] * 32)]
    cases += [Case(DECODE, 16, 8, 256, [(4096, 1)] * 16), Case(EXTEND, 16, 8, 256, [(4096, 4096)])]
    for case in cases:
        setup = Setup(case, dtype, device)
        results = []
        grid = decode_grid if case.mode == DECODE else [(blocks, 256) for blocks in extend_grid]
        for blocks, split in grid:
            if case.mode == DECODE:
                backend = TritonAttentionBackend(device, min_split_len=split, decode_blocks=blocks)
            else:
                backend = TritonAttentionBackend(device, extend_blocks=blocks)
            try:
                results.append((median_ms(setup.attention_call(backend), repeats=15), blocks, split))
            except Exception as e:  # a configuration past the shared-memory limit fails to compile or launch
                results.append((float("inf"), blocks, f"{split} ({type(e).__name__})"))
        default = TritonAttentionBackend(device)
        default_ms = median_ms(setup.attention_call(default), repeats=15)
        results.sort(key=lambda r: r[0])
        print(f"\n{case.describe()}: default {default_ms:.3f} ms; best:")
        for ms, blocks, split in results[:5]:
            extra = f" min_split_len={split}" if case.mode == DECODE else ""
            print(f"  {ms:8.3f} ms  {blocks}{extra}")
        del setup
        torch.cuda.empty_cache()


def run_decode_sweep(device: str) -> None:
    """Decode at the batch sizes of offline throughput runs (many requests, short to medium contexts): block
    sizes, warps, stages, and how many programs the split count aims for (the default aims for 4 per SM)."""
    dtype = torch.bfloat16
    cases = [Case(DECODE, 32, 8, 128, [(384, 1)] * 256), Case(DECODE, 32, 8, 128, [(n, 1) for n in
             random_lens(256, 256, 768, 3)]), Case(DECODE, 32, 8, 128, [(1024, 1)] * 128),
             Case(DECODE, 32, 8, 128, [(2048, 1)] * 32), Case(DECODE, 32, 8, 128, [(200, 1)] * 1)]
    grid = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (1, 4, 16)))
    for case in cases:
        setup = Setup(case, dtype, device)
        kv_bytes = sum(s for s, _ in case.lens) * case.kv_heads * case.head_dim * 2 * 2
        default = TritonAttentionBackend(device)
        default_ms = median_ms(setup.attention_call(default), repeats=15)
        results = []
        for block_n, warps, stages, aim in grid:
            backend = TritonAttentionBackend(device, decode_blocks=DecodeBlocks(block_n, warps, stages))
            backend.target_programs = default.target_programs * aim
            try:
                results.append((median_ms(setup.attention_call(backend), repeats=15), block_n, warps, stages, aim))
            except Exception as e:  # noqa: BLE001 - past the shared-memory limit
                results.append((float("inf"), block_n, warps, stages, f"{aim} ({type(e).__name__})"))
        results.sort(key=lambda r: r[0])
        print(f"\n{case.describe()}: default {default_ms:.3f} ms ({kv_bytes / default_ms / 1e6:.0f} GB/s); best:")
        for ms, block_n, warps, stages, aim in results[:6]:
            print(f"  {ms:8.3f} ms ({kv_bytes / ms / 1e6:5.0f} GB/s)  block_n={block_n} warps={warps} "
                  f"stages={stages} programs x{aim}")
        del setup
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel configurations")
    parser.add_argument("--sweep-decode", action="store_true", help="time decode configurations at large batches")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    if not args.skip_check:
        ok = run_checks(device, tiny=device == "cpu")
        print("correctness:", "all ok" if ok else "FAILURES above")
    if device == "cuda" and not args.skip_timing:
        run_timing(device)
    if device == "cuda" and args.sweep:
        run_sweep(device)
    if device == "cuda" and args.sweep_decode:
        run_decode_sweep(device)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
