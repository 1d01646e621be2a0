"""Decode attention through a token view at keep ratios 1.0 / 0.5 / 0.3 / 0.1 vs the dense path.

One decode query per layer call over a paged KV cache shaped like Qwen2-0.5B's attention
(14 query heads, 2 KV heads, head size 64, block size 128, vLLM's CPU cache layout for this
machine's ISA). "Dense" is vLLM's own CPU attention kernel over every token
(``ops.cpu_attention_with_kv_cache``); "indexed" is tokenzoom's kernel reading only the
kept positions (a random subset of the sequence, or random aligned runs of 16 tokens; the rest
evicted). Goal (issue #3): indexed
attention at keep ratio r costs at most (r + 0.1) x dense.

    python benchmarks/attention_keep_ratio.py [--seq-lens 1536,3192] [--batches 1,16] [--iters 200]

``--layers 24``: the calls cycle through 24 distinct caches (one per layer of Qwen2-0.5B), so
each reads its KV from memory as in a real decode step, not from a CPU cache left hot by the
previous call (the default, ``--layers 1``, measures that hot case).

"cpp+copy": the same kernel given a token-major copy of every position's K (``ops.KeyCopy``,
what a dycoke request keeps of its visual tokens for the pruned layers on CPU), made once per
request and layer before the timing; the time to make the copies is the "copy build" row
(one-off per request, relative to one dense call over all the layers' caches in turn).

Batch 16: 16 requests (each its own kept subset) in one call of each kernel. "mass": the
per-token scores are computed too (only scoring layers ask for them). Configurations are
timed interleaved, in rounds; ratio_to_dense is the median of the per-round ratios and
ratio_range their spread.

Writes benchmarks/results/attention_keep_ratio.{csv,png} (rows appended to the CSV).
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_ttm import RESULTS, _version, append_csv, machine  # noqa: E402

from vllm_tokenzoom.ops import paged_attention_ref as ref  # noqa: E402

HQ, HKV, HS, BLOCK = 14, 2, 64, 128
RATIOS = (1.0, 0.5, 0.3, 0.1)
PATTERNS = ("random", "runs16")


def make_cache(seq_len: int, batch: int = 1, dtype=torch.float32):
    """A vLLM CPU cache holding ``batch`` sequences of ``seq_len`` random tokens in shuffled
    blocks -> (cache, k_cache, v_cache, block_table [batch, blocks per sequence] int32, isa)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, BLOCK, HS)
    per_seq = -(-seq_len // BLOCK)
    num_blocks = batch * per_seq + 2
    cache = torch.zeros(num_blocks, HKV, 2 * BLOCK, HS, dtype=dtype)
    k_cache, v_cache = cache.chunk(2, dim=2)
    block_table = torch.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    pos = torch.arange(seq_len)
    for row in block_table:
        slots = row.long()[pos // BLOCK] * BLOCK + pos % BLOCK
        ops.cpu_attn_reshape_and_cache(torch.randn(seq_len, HKV, HS, dtype=dtype),
                                       torch.randn(seq_len, HKV, HS, dtype=dtype), k_cache, v_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return cache, k_cache, v_cache, block_table, isa


def dense_call(seq_len, k_cache, v_cache, block_table, isa, query, out):
    """vLLM's CPU attention for query [batch, HQ, HS], one decode token per sequence."""
    from vllm import _custom_ops as ops

    batch = query.shape[0]
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=batch, num_heads=HQ, num_kv_heads=HKV, head_dim=HS,
                                               seq_lens=seq_lens, dtype=query.dtype, query_start_loc=qsl, causal=True,
                                               sliding_window_size=-1, isa=isa, enable_kv_split=True)

    def call():
        ops.cpu_attention_with_kv_cache(query=query, key_cache=k_cache, value_cache=v_cache, output=out,
                                        query_start_loc=qsl, seq_lens=seq_lens, scale=HS ** -0.5, causal=True,
                                        alibi_slopes=None, sliding_window=-1, block_table=block_table,
                                        softcap=0.0, scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
                                        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return call


def interleaved(fns: dict, iters: int, rounds: int = 9) -> dict:
    """Times each callable in rounds, the configurations interleaved (the machine is shared,
    its speed drifts): -> name -> per-round medians (seconds)."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    per_round = max(1, iters // rounds)
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            out[name].append(statistics.median(samples))
    return out


def rotate(calls: list):
    """One callable that runs ``calls`` in turn (a layer after another)."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def keep_mask(seq_len: int, ratio: float, pattern: str = "random") -> torch.Tensor:
    """Multiplicity [seq_len]: ``ratio * seq_len`` positions (and the last) at 1, the rest 0.
    "random": a random subset; "runs16": random aligned runs of 16 tokens (a kept patch row
    or frame part; 16 slots = one cache line of vLLM's transposed K, see the kernel)."""
    m = torch.zeros(seq_len)
    count = max(1, int(ratio * seq_len))
    if pattern == "random":
        m[torch.randperm(seq_len)[:count]] = 1.0
    else:
        runs = torch.randperm(seq_len // 16)[: -(-count // 16)]
        m[(runs[:, None] * 16 + torch.arange(16)).reshape(-1)[:count]] = 1.0
    m[-1] = 1.0
    return m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="1536,3192", help="sequence lengths (dycoke and vanilla 16-frame prompts)")
    ap.add_argument("--batches", default="1,16", help="requests per call (one decode query each)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--layers", type=int, default=1,
                    help="distinct KV caches the calls cycle through, like a model's layers: 1 keeps one layer's "
                         "KV hot in the CPU caches; 24 (Qwen2-0.5B) reads it from memory, as a real decode step does")
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference rows")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.seq_lens = 45, "1536"
    os.environ["TOKENZOOM_KERNELS"] = "cpp"  # the "cpp" rows: the C++ kernel, never a fallback
    from vllm_tokenzoom.ops import copy_keys, indexed_decode_batch, indexed_paged_attention, rows_of
    from vllm_tokenzoom.v1.attention.backends.cpu_kv_layout import kv_offsets

    rows = []
    for seq_len in [int(x) for x in args.seq_lens.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            query = torch.randn(batch, HQ, HS)
            out = torch.empty(batch, HQ, HS)
            layers = [make_cache(seq_len, batch) for _ in range(args.layers)]  # each its own KV, as a model's layers
            isa = layers[0][4]
            k_off, v_off = kv_offsets(isa, torch.float32, BLOCK, HS)
            regions = [cache.view(cache.shape[0], HKV, 2, BLOCK * HS) for cache, *_ in layers]
            fns = {"dense": rotate([dense_call(seq_len, k, v, table, isa, query, torch.empty(batch, HQ * HS))
                                    for _, k, v, table, _ in layers])}
            t0 = time.perf_counter()
            row_of = rows_of(torch.arange(seq_len))  # one per request, shared by its layers' copies
            copies = [[copy_keys(reg[:, :, 0], k_off, table[b], torch.arange(seq_len), row_of) for b in range(batch)]
                      for reg, (*_, table, _) in zip(regions, layers)]
            build_s = time.perf_counter() - t0
            for ratio, pattern, kernel in [(r, p, k) for r in RATIOS for p in PATTERNS for k in ("cpp", "cpp+copy")
                                           if (r < 1 or p == "random") and (k == "cpp" or p == "random")]:
                ms = [keep_mask(seq_len, ratio, pattern) for _ in range(batch)]
                for mass in (True, False):  # the scores are asked for at scoring layers only
                    calls = []
                    for reg, (*_, table, _), cps in zip(regions, layers, copies):
                        kr, vr = reg[:, :, 0], reg[:, :, 1]
                        cps = cps if kernel == "cpp+copy" else [None] * batch
                        if batch == 1:
                            calls.append(lambda m=ms[0], mass=mass, kr=kr, vr=vr, t=table, c=cps[0]: indexed_paged_attention(
                                query, kr, vr, k_off, v_off, t[0], seq_len, m, HS ** -0.5, want_mass=mass, out=out,
                                key_copy=c))
                        else:
                            calls.append(lambda ms=ms, mass=mass, kr=kr, vr=vr, t=table, c=cps: indexed_decode_batch(
                                query, kr, vr, k_off, v_off, t, [seq_len] * batch, ms, HS ** -0.5, want_mass=mass,
                                out=out, key_copies=c))
                    fns[(kernel, ratio, pattern, mass)] = rotate(calls)
                if batch == 1 and pattern == "random" and not args.no_torch:
                    reg, table = regions[0], layers[0][3]
                    fns[("torch", ratio, pattern, True)] = (lambda m=ms[0]: ref.indexed_paged_attention(
                        query, reg[:, :, 0], reg[:, :, 1], k_off, v_off, table[0], seq_len, m, HS ** -0.5))
            times = interleaved(fns, args.iters)
            dense = statistics.median(times["dense"])
            build = build_s / args.layers  # per layer's cache, like the other rows
            rows.append(dict(seq_len=seq_len, layers=args.layers, keep_ratio=1.0, kernel="copy build", dense_us=round(dense * 1e6, 1),
                             indexed_us=round(build * 1e6, 1), ratio_to_dense=round(build / dense, 3), goal="",
                             meets_goal="", batch=batch, mass=False, pattern="all", ratio_range=""))
            print(rows[-1], flush=True)
            for key, samples in times.items():
                if key == "dense":
                    continue
                kernel, ratio, pattern, mass = key
                rel = sorted(t / d for t, d in zip(samples, times["dense"]))  # per round: same machine state
                t, r = statistics.median(samples), statistics.median(rel)
                rows.append(dict(seq_len=seq_len, layers=args.layers, keep_ratio=ratio, kernel=kernel, dense_us=round(dense * 1e6, 1),
                                 indexed_us=round(t * 1e6, 1), ratio_to_dense=round(r, 3), goal=round(ratio + 0.1, 2),
                                 meets_goal=r <= ratio + 0.1, batch=batch, mass=mass, pattern=pattern,
                                 ratio_range=f"{rel[0]:.2f}-{rel[-1]:.2f}"))
                print(rows[-1], flush=True)
    save(rows)


def save(rows) -> None:
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), vllm=_version("vllm"), torch=_version("torch"),
                threads=torch.get_num_threads())
    path = RESULTS / "attention_keep_ratio.csv"
    # rows from before a column existed were batch 1, with the mass, random keep, one layer's cache
    append_csv(path, meta, rows, defaults={"batch": 1, "mass": True, "pattern": "random", "ratio_range": "", "layers": 1})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    # one line per (kernel, seq_len, batch, pattern), without the mass (with it: the CSV); the
    # torch reference (15-190 x dense) is off the scale; the aligned runs share r = 1.0 with random
    timed = [r for r in rows if r["kernel"] in ("cpp", "cpp+copy") and not r["mass"]]
    for kernel, seq_len, batch, pattern in sorted({(r["kernel"], r["seq_len"], r["batch"], r["pattern"]) for r in timed}):
        pts = sorted((r for r in timed if (r["kernel"], r["seq_len"], r["batch"]) == (kernel, seq_len, batch)
                      and (r["pattern"] == pattern or (r["keep_ratio"] == 1.0 and pattern != "random"))),
                     key=lambda r: r["keep_ratio"])
        ax.plot([r["keep_ratio"] for r in pts], [r["ratio_to_dense"] for r in pts],
                ("o-" if pattern == "random" else "s--") if kernel == "cpp" else "^-",
                label=f"{kernel}, {seq_len} tokens, batch {batch}, {pattern}")
    ax.plot(RATIOS, [r + 0.1 for r in RATIOS], "k--", label="goal: r + 0.1")
    ax.set_xlabel("keep ratio r")
    ax.set_ylabel("indexed time / dense (vLLM CPU kernel)")
    ax.set_title(f"decode attention, 14/2 heads, hs 64, KV of {rows[0]['layers']} layer(s) in turn\n"
                 f"{meta['machine']}, {meta['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "attention_keep_ratio.png", dpi=110)
    print(f"wrote {path} and attention_keep_ratio.png")


if __name__ == "__main__":
    main()
