"""A paged KV cache built from dense K/V, in a plain or a packed (transposed-K) block layout."""
import math

import torch


def paged_cache(k, v, block_size, layout, seed):
    """Scatter K/V [L, Hkv, hs] into a shuffled paged cache; -> regions, offsets, block row."""
    seq_len, hkv, hs = k.shape
    num_logical = math.ceil(seq_len / block_size)
    gen = torch.Generator().manual_seed(seed)
    block_row = torch.randperm(num_logical + 3, generator=gen)[:num_logical]  # physical block per logical
    t, d = torch.meshgrid(torch.arange(block_size), torch.arange(hs), indexing="ij")
    v_off = t * hs + d
    k_off = v_off if layout == "plain" else d * block_size + t  # "packed": K transposed [hs, B]
    k_region = torch.full((num_logical + 3, hkv, block_size * hs), float("nan"))
    v_region = k_region.clone()
    for p in range(seq_len):
        blk, off = block_row[p // block_size], p % block_size
        k_region[blk, :, k_off[off]] = k[p]
        v_region[blk, :, v_off[off]] = v[p]
    return k_region, v_region, k_off, v_off, block_row
