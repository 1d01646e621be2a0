"""Attention kernels over a paged KV cache read through a token view.

One dispatch point, :func:`indexed_paged_attention`. Each kernel sits next to its torch
reference (``paged_attention_ref.py``):
- ``cpp``: ``csrc/indexed_attention.cpp`` (built by setup.py), one decode query on CPU;
- ``triton``: ``triton_kernels/indexed_attention.py``, one decode query (decode attention
  + fused head-averaged key mass from the log-sum-exp); on CPU only under ``TRITON_INTERPRET=1``;
- ``torch``: the reference, any number of queries with per-query views.
``TOKENZOOM_KERNELS`` picks one (default ``auto``: Triton for a single decode query on
CUDA, the C++ kernel for one on CPU when built, else the reference).
"""
from __future__ import annotations

import os
import weakref

import torch

from vllm_tokenzoom.ops import paged_attention_ref as ref

KERNELS = ("auto", "torch", "cpp", "triton")


def kernel_choice() -> str:
    choice = os.environ.get("TOKENZOOM_KERNELS", "auto")
    if choice not in KERNELS:
        raise ValueError(f"TOKENZOOM_KERNELS = {choice!r} is not known; allowed: {', '.join(KERNELS)}")
    return choice


def cpp_ops():
    """The compiled CPU kernels, or None when the extension is not built."""
    try:
        from vllm_tokenzoom import _C
    except ImportError:
        return None
    return _C


_EMPTY = torch.empty(0)
_LAYOUTS: dict[int, tuple[weakref.ref, int]] = {}  # id(offsets) -> (weak ref, code)


def layout_code(offsets: torch.Tensor, transposed_ok: bool = False) -> int:
    """1 if ``offsets[t, d] == t * hs + d`` (plain), 2 if ``d * B + t`` (transposed), else 0.
    Remembered per offsets tensor (vLLM's come from a cache, so each is checked once)."""
    ref_, code = _LAYOUTS.get(id(offsets), (None, None))
    if ref_ is None or ref_() is not offsets:
        block, head = offsets.shape
        t, d = torch.meshgrid(torch.arange(block), torch.arange(head), indexing="ij")
        code = 1 if torch.equal(offsets, t * head + d) else 2 if torch.equal(offsets, d * block + t) else 0
        _LAYOUTS[id(offsets)] = (weakref.ref(offsets), code)
    return code if (code != 2 or transposed_ok) else 0


_KEYS: dict[int, tuple[weakref.ref, int, tuple]] = {}  # id(multiplicity) -> (weak ref, seq_len, keys/bias)
_ALL: dict[int, tuple] = {}  # seq_len -> keys/bias of multiplicity None


def _keys_and_bias(multiplicity: torch.Tensor | None, seq_len: int):
    """``ref.keys_and_bias`` plus the kernels' forms: (keys [n] int64, bias [n] f32 or None,
    keys [n] int32, bias [n] f32 or empty when it is all 0, i.e. every m is 0 or 1).
    Remembered per multiplicity tensor: the layers of a group all read the same tensor in a
    step (sessions hand out one object per step)."""
    if multiplicity is None:
        if seq_len not in _ALL:
            if len(_ALL) > 64:
                _ALL.clear()
            keys = torch.arange(seq_len)
            _ALL[seq_len] = (keys, None, keys.to(torch.int32), _EMPTY)
        return _ALL[seq_len]
    entry = _KEYS.get(id(multiplicity))
    if entry is not None and entry[0]() is multiplicity and entry[1] == seq_len:
        return entry[2]
    if len(_KEYS) > 256:
        _KEYS.clear()
    keys, bias = ref.keys_and_bias(multiplicity, seq_len)
    flat = bias.reshape(-1).float().contiguous()  # one decode query: a 1-D bias
    result = (keys, bias, keys.to(torch.int32), _EMPTY if bool((flat == 0).all()) else flat)
    _KEYS[id(multiplicity)] = (weakref.ref(multiplicity), seq_len, result)
    return result


def indexed_paged_attention(query, k_region, v_region, k_offsets, v_offsets, block_row, seq_len: int,
                            multiplicity: torch.Tensor | None, scale: float, want_mass: bool = True, out=None):
    """See :func:`paged_attention_ref.indexed_paged_attention`: (out [nq, Hq, hs], mass [nq, n], keys [n]).
    ``want_mass=False``: mass is None (the kernels skip it). ``out`` [nq, Hq, hs]: written in
    place when given (the C++ kernel writes it directly)."""
    choice = kernel_choice()
    single = query.shape[0] == 1 and (multiplicity is None or multiplicity.dim() == 1 or multiplicity.shape[0] == 1)
    use_triton = choice == "triton" or (choice == "auto" and query.is_cuda)
    use_cpp = choice in ("auto", "cpp") and not query.is_cuda and cpp_ops() is not None
    if single and (use_triton or use_cpp):
        keys, bias, keys32, bias32 = _keys_and_bias(multiplicity, seq_len)  # one decode query: 1-D keys, bias
        if use_cpp:
            result, mass = _cpp_decode(query, k_region, v_region, k_offsets, v_offsets, block_row,
                                       [(keys32, bias32)], scale, want_mass, out)
            return result, (mass[0] if want_mass else None), keys
        from vllm_tokenzoom.triton_kernels.indexed_attention import indexed_decode_attention, key_mass

        keys, bias = keys.to(query.device), None if bias is None else bias.reshape(-1).to(query.device)
        o, lse = indexed_decode_attention(query[0], k_region, v_region, k_offsets, v_offsets, block_row,
                                          keys, bias, scale)
        mass = key_mass(query[0], k_region, k_offsets, block_row, keys, bias, lse, scale)[None] if want_mass else None
        o = o[None].to(query.dtype)
        return (o if out is None else out.copy_(o)), mass, keys
    if choice in ("cpp", "triton") and single:
        raise RuntimeError(f"TOKENZOOM_KERNELS={choice}, but that kernel cannot run this call (not built)")
    o, mass, keys = ref.indexed_paged_attention(query, k_region, v_region, k_offsets, v_offsets, block_row, seq_len,
                                                multiplicity, scale)
    return (o if out is None else out.copy_(o)), (mass if want_mass else None), keys


def indexed_decode_batch(query, k_region, v_region, k_offsets, v_offsets, block_table, seq_lens,
                         multiplicities, scale: float, want_mass: bool = True, out=None):
    """R decode queries in one C++ call (CPU): query [R, Hq, hs], block_table [R, max_blocks],
    seq_lens and multiplicities (each [seq_len] or None) one per request.
    -> (out [R, Hq, hs], masses: R tensors [1, n_r] or None, keys: R tensors [n_r])."""
    entries = [_keys_and_bias(m, int(n)) for m, n in zip(multiplicities, seq_lens)]
    result, masses = _cpp_decode(query, k_region, v_region, k_offsets, v_offsets, block_table,
                                 [e[2:] for e in entries], scale, want_mass, out)
    return result, (masses if want_mass else None), [e[0] for e in entries]


def _cpp_decode(query, k_region, v_region, k_offsets, v_offsets, block_table, keys_bias, scale, want_mass, out):
    """One C++ call for R decode queries; keys_bias: (keys int32, bias f32 or empty) per request.
    -> (out [R, Hq, hs], R masses [1, n_r] or an empty list)."""
    result = torch.empty_like(query) if out is None else out
    masses = cpp_ops().indexed_decode_attention(
        query, k_region, v_region, k_offsets, v_offsets, layout_code(k_offsets, transposed_ok=True),
        layout_code(v_offsets), block_table, [k for k, _ in keys_bias], [b for _, b in keys_bias], scale, result,
        want_mass)
    return result, masses


__all__ = ["indexed_paged_attention", "indexed_decode_batch", "kernel_choice", "cpp_ops"]
