"""Torch reference of indexed paged attention with a per-key logit bias.

The paged cache is described without knowing vLLM: per layer, a K region and a V region
``[num_blocks, num_kv_heads, block_size * head_size]`` and two offset tables
``[block_size, head_size]`` giving where element ``(t, d)`` of a block lives inside its
region (vLLM's CPU cache packs K per ISA, e.g. transposed; GPU layouts are plain
``t * head_size + d``). Keys are named by *token position*; ``block_row[p // B]`` is the
physical block of position ``p``.
"""
from __future__ import annotations

import torch


def gather(region: torch.Tensor, offsets: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """-> [n, Hkv, hs]: the elements of one region (K or V) at the token positions ``positions`` [n]."""
    block_size = offsets.shape[0]
    blocks = block_row[positions // block_size].long()  # [n]
    within = positions % block_size  # [n]
    return region[blocks[:, None], :, offsets[within].long()].permute(0, 2, 1)  # [n, hs, Hkv] -> [n, Hkv, hs]


def gather_kv(k_region: torch.Tensor, v_region: torch.Tensor, k_offsets: torch.Tensor, v_offsets: torch.Tensor,
              block_row: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> K, V: [n, Hkv, hs] for the token positions ``positions`` [n]."""
    return gather(k_region, k_offsets, block_row, positions), gather(v_region, v_offsets, block_row, positions)


def biased_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_positions: torch.Tensor,
                     query_positions: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """Causal attention of queries over an arbitrary key set, with a per-key logit bias.

    query: [nq, Hq, hs]; k, v: [n, Hkv, hs] (GQA: Hq a multiple of Hkv);
    key_positions: [n], query_positions: [nq] (key j is visible to query i iff kp_j <= qp_i);
    bias: [n] added to every query's logit of key j (``log m``), or [nq, n] per query, or None.
    returns: out [nq, Hq, hs] (input dtype), probs [Hq, nq, n] float32.
    """
    group = query.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [n, Hq, hs]
    vf = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", query.float(), kf) * scale  # [Hq, nq, n]
    if bias is not None:
        logits = logits + (bias.float()[None, None, :] if bias.dim() == 1 else bias.float()[None])
    visible = key_positions[None, :] <= query_positions[:, None]  # [nq, n]
    logits = logits.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out.to(query.dtype), probs


def keys_and_bias(multiplicity: torch.Tensor | None, seq_len: int):
    """-> the positions to read [n] (those some query reads) and their logit bias ``log m``
    ([n] or [nq, n]; -inf where a query must not read a key), or None when all m are 1."""
    if multiplicity is None:
        return torch.arange(seq_len), None
    m = multiplicity[..., :seq_len].float()
    if m.shape[-1] < seq_len:  # a multiplicity of the first positions only: the later ones read 1
        m = torch.nn.functional.pad(m, (0, seq_len - m.shape[-1]), value=1.0)
    keys = ((m > 0) if m.dim() == 1 else (m > 0).any(0)).nonzero().squeeze(1)
    return keys, torch.log(m[..., keys])


def indexed_paged_attention(query, k_region, v_region, k_offsets, v_offsets, block_row, seq_len: int,
                            multiplicity: torch.Tensor | None, scale: float):
    """The last ``nq`` tokens of a sequence of ``seq_len`` attend to positions ``0..seq_len-1``
    weighted by ``multiplicity``: [seq_len] for every query, [nq, seq_len] per query, or None
    (all 1). Positions no query reads (``m = 0``) are not gathered.

    returns out [nq, Hq, hs], the attention mass of each key averaged over heads
    ``mass`` [nq, n] (float32), and the positions read, keys [n].
    """
    nq = query.shape[0]
    keys, bias = keys_and_bias(multiplicity, seq_len)
    k, v = gather_kv(k_region, v_region, k_offsets, v_offsets, block_row, keys)
    out, probs = biased_attention(query, k, v, keys, torch.arange(seq_len - nq, seq_len), bias, scale)
    return out, probs.mean(0), keys
