"""Triton kernels over a paged KV cache read through a token view.

- ``indexed_decode_attention``: one decode query attends to a list of key positions with a
  per-key logit bias (``log m``); online softmax over key tiles; returns the output and
  the log-sum-exp per head.
- ``key_mass``: the attention mass each listed key receives, averaged over heads, from
  the query, the paged keys and that log-sum-exp: ``mean_h exp(q_h . k_j * scale + b_j - lse_h)``.
  Fused: the [heads, keys] probability matrix is never materialised.

The paged cache layout is the one of ``vllm_tokenzoom/ops/paged_attention_ref.py`` (regions
plus offset tables), which is also the torch reference these kernels are tested against
(``TRITON_INTERPRET=1`` on CPU; natively on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows(region_ptr, offsets_ptr, row_ptr, pos, valid, kv_head, block_stride, head_stride,
                 PAGE: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr):
    """[BLOCK_N, HEAD_PAD] float32 rows of the positions ``pos`` for one KV head; the region
    of (block, head) starts at ``block * block_stride + head * head_stride`` (elements)."""
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    block = tl.load(row_ptr + pos // PAGE, mask=valid, other=0).to(tl.int64)
    slot = pos % PAGE
    base = block * block_stride + kv_head * head_stride
    mask = valid[:, None] & d_ok[None, :]
    off = tl.load(offsets_ptr + slot[:, None] * HEAD + d[None, :], mask=mask, other=0)
    return tl.load(region_ptr + base[:, None] + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _indexed_decode_kernel(q_ptr, k_ptr, v_ptr, koff_ptr, voff_ptr, row_ptr, keys_ptr, bias_ptr, out_ptr, lse_ptr,
                           n, scale, block_stride, head_stride, GROUP: tl.constexpr, PAGE: tl.constexpr,
                           HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    head = tl.program_id(0)
    kv_head = head // GROUP
    d = tl.arange(0, HEAD_PAD)
    q = tl.load(q_ptr + head * HEAD + d, mask=d < HEAD, other=0.0).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_PAD], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < n
        pos = tl.load(keys_ptr + j, mask=valid, other=0)
        k = _gather_rows(k_ptr, koff_ptr, row_ptr, pos, valid, kv_head, block_stride, head_stride, PAGE, HEAD, HEAD_PAD)
        s = tl.sum(k * q[None, :], axis=1) * scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + j, mask=valid, other=0.0)
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing readable yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = _gather_rows(v_ptr, voff_ptr, row_ptr, pos, valid, kv_head, block_stride, head_stride, PAGE, HEAD, HEAD_PAD)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(out_ptr + head * HEAD + d, acc / l_i, mask=d < HEAD)
    tl.store(lse_ptr + head, m_i + tl.log(l_i))


@triton.jit
def _key_mass_kernel(q_ptr, k_ptr, koff_ptr, row_ptr, keys_ptr, bias_ptr, lse_ptr, mass_ptr, n, scale,
                     block_stride, head_stride, NUM_KV_HEADS: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
                     GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = j < n
    pos = tl.load(keys_ptr + j, mask=valid, other=0)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + j, mask=valid, other=0.0)
    d = tl.arange(0, HEAD_PAD)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kv_head in range(0, NUM_KV_HEADS):
        k = _gather_rows(k_ptr, koff_ptr, row_ptr, pos, valid, kv_head, block_stride, head_stride, PAGE, HEAD, HEAD_PAD)
        for g in range(0, GROUP):  # the query heads sharing this KV head reuse its tile
            head = kv_head * GROUP + g
            q = tl.load(q_ptr + head * HEAD + d, mask=d < HEAD, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale + bias
            total += tl.exp(s - tl.load(lse_ptr + head))
    tl.store(mass_ptr + j, total / NUM_Q_HEADS, mask=valid)


def _common(query, k_region, k_offsets):
    num_q_heads, head = query.shape
    num_kv_heads, page = k_region.shape[1], k_offsets.shape[0]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if k_region.stride(2) != 1:
        raise ValueError("a region's last dim must be contiguous")
    return num_q_heads, num_kv_heads, head, page, triton.next_power_of_2(head)


def indexed_decode_attention(query, k_region, v_region, k_offsets, v_offsets, block_row, keys, bias, scale: float,
                             block_n: int = 64):
    """query [Hq, hs]; regions [nb, Hkv, B*hs] (any strides but a contiguous last dim); offsets
    [B, hs]; block_row [max_blocks]; keys [n]; bias [n] or None -> (out [Hq, hs] f32, lse [Hq] f32)."""
    num_q_heads, num_kv_heads, head, page, head_pad = _common(query, k_region, k_offsets)
    out = torch.empty(num_q_heads, head, dtype=torch.float32, device=query.device)
    lse = torch.empty(num_q_heads, dtype=torch.float32, device=query.device)
    if v_region.stride() != k_region.stride():
        raise ValueError("K and V regions must share strides")
    _indexed_decode_kernel[(num_q_heads,)](  # regions are read in place (views into vLLM's cache)
        query.contiguous(), k_region, v_region, k_offsets.contiguous(), v_offsets.contiguous(),
        block_row.contiguous(), keys.contiguous(), bias.float().contiguous() if bias is not None else keys, out, lse,
        keys.numel(), scale, k_region.stride(0), k_region.stride(1), GROUP=num_q_heads // num_kv_heads, PAGE=page,
        HEAD=head, HEAD_PAD=head_pad, BLOCK_N=block_n, HAS_BIAS=bias is not None)
    return out, lse


def key_mass(query, k_region, k_offsets, block_row, keys, bias, lse, scale: float, block_n: int = 64):
    """-> [n] float32: attention mass of each key averaged over query heads (from ``lse`` [Hq])."""
    num_q_heads, num_kv_heads, head, page, head_pad = _common(query, k_region, k_offsets)
    mass = torch.empty(keys.numel(), dtype=torch.float32, device=query.device)
    _key_mass_kernel[(triton.cdiv(keys.numel(), block_n),)](
        query.contiguous(), k_region, k_offsets.contiguous(), block_row.contiguous(), keys.contiguous(),
        bias.float().contiguous() if bias is not None else keys, lse, mass, keys.numel(), scale, k_region.stride(0),
        k_region.stride(1), NUM_KV_HEADS=num_kv_heads, NUM_Q_HEADS=num_q_heads, GROUP=num_q_heads // num_kv_heads, PAGE=page, HEAD=head, HEAD_PAD=head_pad,
        BLOCK_N=block_n, HAS_BIAS=bias is not None)
    return mass
