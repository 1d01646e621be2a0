"""Decode attention through a token view at keep ratios 1.0 / 0.5 / 0.3 / 0.1 vs the dense path.

One decode query per layer call over a paged KV cache shaped like Qwen2-0.5B's attention
(14 query heads, 2 KV heads, head size 64, block size 128, vLLM's CPU cache layout for this
machine's ISA). "Dense" is vLLM's own CPU attention kernel over every token
(``ops.cpu_attention_with_kv_cache``); "indexed" is tokenzoom's kernel reading only the
kept positions (a random subset of the sequence, the rest evicted). Goal (issue #3): indexed
attention at keep ratio r costs at most (r + 0.1) x dense.

    python benchmarks/attention_keep_ratio.py [--seq-lens 1536,3192] [--iters 200]

Writes benchmarks/results/attention_keep_ratio.{csv,png} (rows appended to the CSV).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_ttm import RESULTS, _version, machine  # noqa: E402

HQ, HKV, HS, BLOCK = 14, 2, 64, 128
RATIOS = (1.0, 0.5, 0.3, 0.1)


def make_cache(seq_len: int, dtype=torch.float32):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, BLOCK, HS)
    num_blocks = -(-seq_len // BLOCK) + 2
    cache = torch.zeros(num_blocks, HKV, 2 * BLOCK, HS, dtype=dtype)
    k_cache, v_cache = cache.chunk(2, dim=2)
    block_row = torch.randperm(num_blocks)[: -(-seq_len // BLOCK)].to(torch.int32)
    slots = (block_row.long()[torch.arange(seq_len) // BLOCK] * BLOCK + torch.arange(seq_len) % BLOCK)
    ops.cpu_attn_reshape_and_cache(torch.randn(seq_len, HKV, HS, dtype=dtype), torch.randn(seq_len, HKV, HS, dtype=dtype),
                                   k_cache, v_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return cache, k_cache, v_cache, block_row, isa


def dense_call(seq_len, k_cache, v_cache, block_row, isa, query, out):
    from vllm import _custom_ops as ops

    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=1, num_heads=HQ, num_kv_heads=HKV, head_dim=HS, seq_lens=seq_lens,
                                               dtype=query.dtype, query_start_loc=qsl, causal=True,
                                               sliding_window_size=-1, isa=isa, enable_kv_split=True)

    def call():
        ops.cpu_attention_with_kv_cache(query=query, key_cache=k_cache, value_cache=v_cache, output=out,
                                        query_start_loc=qsl, seq_lens=seq_lens, scale=HS ** -0.5, causal=True,
                                        alibi_slopes=None, sliding_window=-1, block_table=block_row[None],
                                        softcap=0.0, scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
                                        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return call


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="1536,3192", help="sequence lengths (dycoke and vanilla 16-frame prompts)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.seq_lens = 30, "1536"
    from vllm_tokenzoom.ops import indexed_paged_attention
    from vllm_tokenzoom.v1.attention.backends.cpu_kv_layout import kv_offsets

    rows = []
    for seq_len in [int(x) for x in args.seq_lens.split(",")]:
        cache, k_cache, v_cache, block_row, isa = make_cache(seq_len)
        query = torch.randn(1, HQ, HS)
        dense = timed(dense_call(seq_len, k_cache, v_cache, block_row, isa, query, torch.empty(1, HQ * HS)), args.iters)
        regions = cache.view(cache.shape[0], HKV, 2, BLOCK * HS)
        k_off, v_off = kv_offsets(isa, torch.float32, BLOCK, HS)
        for ratio in RATIOS:
            m = torch.zeros(seq_len)
            m[torch.randperm(seq_len)[: max(1, int(ratio * seq_len))]] = 1.0
            m[-1] = 1.0
            for kernel in ("cpp", "torch"):
                import os

                os.environ["TOKENZOOM_KERNELS"] = kernel
                t = timed(lambda: indexed_paged_attention(query, regions[:, :, 0], regions[:, :, 1], k_off, v_off,
                                                          block_row, seq_len, m, HS ** -0.5), args.iters)
                rows.append(dict(seq_len=seq_len, keep_ratio=ratio, kernel=kernel, dense_us=round(dense * 1e6, 1),
                                 indexed_us=round(t * 1e6, 1), ratio_to_dense=round(t / dense, 3),
                                 goal=round(ratio + 0.1, 2), meets_goal=t / dense <= ratio + 0.1))
                print(rows[-1], flush=True)
    save(rows)


def save(rows) -> None:
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), vllm=_version("vllm"), torch=_version("torch"),
                threads=torch.get_num_threads())
    path = RESULTS / "attention_keep_ratio.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({**meta, **row})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (seq_len, kernel) in sorted({(r["seq_len"], r["kernel"]) for r in rows}):
        pts = [r for r in rows if r["seq_len"] == seq_len and r["kernel"] == kernel]
        ax.plot([r["keep_ratio"] for r in pts], [r["ratio_to_dense"] for r in pts], "o-", label=f"{kernel}, {seq_len} tokens")
    ax.plot(RATIOS, [r + 0.1 for r in RATIOS], "k--", label="goal: r + 0.1")
    ax.set_xlabel("keep ratio r")
    ax.set_ylabel("indexed time / dense (vLLM CPU kernel)")
    ax.set_title(f"decode attention, 14/2 heads, hs 64\n{meta['machine']}, {meta['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "attention_keep_ratio.png", dpi=110)
    print(f"wrote {path} and attention_keep_ratio.png")


if __name__ == "__main__":
    main()
