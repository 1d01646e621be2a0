"""Where vLLM's CPU attention cache puts element (t, d) of a block, found by probing.

``ops.cpu_attn_reshape_and_cache`` packs K per ISA (for ``isa="vec"`` each (block, head)
K region is stored transposed, ``[hs, B]``; V is plain ``[B, hs]``); other ISAs (amx,
neon, ...) pack differently. Rather than hard-code any of them, write digit-encoded
values through the real kernel once per (isa, dtype, block size, head size) and invert
the result. Exact in every dtype: each write stores 4-bit digits.
"""
from __future__ import annotations

from functools import cache

import torch


@cache
def kv_offsets(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (k_offsets, v_offsets): [block_size, head_size] int64 offsets inside a region of
    ``block_size * head_size`` elements (one block, one KV head)."""
    from vllm import _custom_ops as ops

    n = block_size * head_size
    code = torch.arange(n).view(block_size, head_size)  # code[t, d] = t * hs + d
    stored = torch.zeros(2, n, dtype=torch.long)  # stored[0/1][offset] = code found there (K/V)
    slots = torch.arange(block_size)
    for digit in range((n - 1).bit_length() // 4 + 1):  # 4-bit digits of the largest code
        values = ((code >> (4 * digit)) & 15).to(dtype).view(block_size, 1, head_size)
        cache_ = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
        k_cache, v_cache = cache_.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(values, values, k_cache, v_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        stored |= cache_.view(2, n).round().long() << (4 * digit)
    offsets = torch.empty_like(stored)
    offsets[0, stored[0]] = torch.arange(n)
    offsets[1, stored[1]] = torch.arange(n)
    return offsets[0].view(block_size, head_size), offsets[1].view(block_size, head_size)
