"""Attention kernels over a paged KV cache read through a token view.

One dispatch point, :func:`indexed_paged_attention`. Each kernel sits next to its torch
reference (``paged_attention_ref.py``):
- ``cpp``: ``csrc/indexed_attention.cpp`` (built by setup.py), one decode query on CPU;
- ``triton``: ``triton_kernels/indexed_attention.py``, one decode query (decode attention
  + fused head-averaged key mass from the log-sum-exp); on CPU only under ``TRITON_INTERPRET=1``;
- ``torch``: the reference, any number of queries with per-query views.
``TOKENZOOM_KERNELS`` picks one (default ``auto``: Triton for a single decode query on
CUDA, the C++ kernel for one on CPU when built, else the reference).

A :class:`KeyCopy` (an exact token-major copy of K for some positions, :func:`copy_keys`)
lets the C++ kernel read those keys' K as contiguous rows instead of from vLLM's transposed
CPU K; the other kernels read the cache (the same values).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from vllm_tokenzoom.ops import paged_attention_ref as ref

KERNELS = ("auto", "torch", "cpp", "triton")


def kernel_choice() -> str:
    choice = os.environ.get("TOKENZOOM_KERNELS", "auto")
    if choice not in KERNELS:
        raise ValueError(f"TOKENZOOM_KERNELS = {choice!r} is not known; allowed: {', '.join(KERNELS)}")
    return choice


@functools.cache
def cpp_ops():
    """The compiled CPU kernels for this CPU (``cpu_build``), or None when that build is missing:
    then single-query calls use the torch reference (said once; ``TOKENZOOM_KERNELS=cpp`` refuses)."""
    name = cpu_build()
    try:
        return importlib.import_module(f"vllm_tokenzoom.{name}") if name else None
    except ImportError:
        pass
    logging.getLogger("vllm.tokenzoom").warning(
        "tokenzoom: no C++ kernel build for this CPU (%s); decode attention over token views runs the torch "
        "reference (slower). Reinstall tokenzoom on this machine to build it.", name or "x86-64 without AVX2")
    return None


@functools.cache
def cpu_build() -> str | None:
    """Which build of the C++ kernels this CPU runs (setup.py): on x86-64 ``_C_avx512`` where the
    CPU has AVX-512 F/BW/VL, else ``_C_avx2`` where it has AVX2 and FMA, else none; elsewhere ``_C``.
    Chosen at run time, so one wheel serves every machine of its architecture."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return "_C"
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "_C_avx512"
    if {"avx2", "fma"} <= flags:
        return "_C_avx2"
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


_EMPTY = torch.empty(0)
_NO_ROWS = torch.empty(0, dtype=torch.int32)


@dataclass(frozen=True, eq=False)
class KeyCopy:
    """K of some token positions, copied out of the paged cache token-major.

    keys: [Hkv, rows, hs] in the cache's dtype; row_of: [P] int32, the row of position
    ``p < P`` in ``keys`` (-1: not copied; positions >= P are never copied)."""

    keys: torch.Tensor
    row_of: torch.Tensor


def rows_of(positions: torch.Tensor) -> torch.Tensor:
    """[positions[-1] + 1] int32: the row of each position in a copy of ``positions`` (-1: none)."""
    row_of = torch.full((int(positions[-1]) + 1 if positions.numel() else 0,), -1, dtype=torch.int32)
    row_of[positions] = torch.arange(positions.numel(), dtype=torch.int32)
    return row_of


def copy_keys(k_region, k_offsets, block_row, positions: torch.Tensor, row_of: torch.Tensor | None = None) -> KeyCopy:
    """A :class:`KeyCopy` of the positions ``positions`` [rows] (ascending, all cached).
    ``row_of``: ``rows_of(positions)``, passed to share one among the copies of a request's
    layers (the kernels' per-step key rows are then computed once for all of them)."""
    if positions.numel() and layout_code(k_offsets, transposed_ok=True) == 2:  # vLLM's CPU K: whole blocks
        block_size, num_kv_heads = k_offsets.shape[0], k_region.shape[1]
        first, last = int(positions[0]) // block_size, int(positions[-1]) // block_size
        tiles = k_region[block_row[first:last + 1].long()]  # [nblk, Hkv, hs * B]: K of each block, transposed
        tiles = tiles.view(-1, num_kv_heads, k_offsets.shape[1], block_size).permute(1, 0, 3, 2)  # [Hkv, nblk, B, hs]
        keys = tiles.reshape(num_kv_heads, -1, k_offsets.shape[1])[:, positions - first * block_size].contiguous()
    else:
        keys = ref.gather(k_region, k_offsets, block_row, positions).transpose(0, 1).contiguous()  # [Hkv, rows, hs]
    return KeyCopy(keys, rows_of(positions) if row_of is None else row_of)


class _Memo(OrderedDict):
    """A dict that forgets its least recently used entries beyond ``size``. A decode step
    derives one entry per request and segment (16 x 6 in a batch-16 ``cascade`` step): evicting
    the oldest keeps the step's own, where clearing the whole memo at a bound dropped some of them
    mid-step and the kernel call re-derived them."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        value = super().get(key, default)
        if value is not default:
            self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


_ROWS: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, torch.Tensor]] = _Memo(1024)
_ROWS_OF_KEYS: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor]] = _Memo(1024)


def _copy_rows(keys: torch.Tensor, multiplicity, row_of: torch.Tensor) -> torch.Tensor:
    """[n] int32: each key's row in the copy (-1: read the cache). Remembered per keys object
    (the layers of a step share one), and the rows of the keys below the copy's end per
    (multiplicity, row_of): a view read over several steps differs only by the generated keys
    after them (never copied)."""
    tag = (id(multiplicity), id(row_of))
    last = _ROWS_OF_KEYS.get(tag)
    if last is not None and last[0]() is keys:
        return last[1]
    end = row_of.numel()
    below = int(torch.searchsorted(keys, end))  # keys are ascending: the first `below` may be copied
    entry = _ROWS.get(tag)
    if not (entry is not None and entry[0]() is multiplicity and entry[1]() is row_of
            and entry[2].numel() == below):
        entry = (weakref.ref(multiplicity) if multiplicity is not None else None, weakref.ref(row_of),
                 row_of.index_select(0, keys[:below]).to(torch.int32))
        if multiplicity is not None:
            _remember_rows(multiplicity, row_of, entry[2])
    rows = entry[2]
    if rows.numel() < keys.numel():  # the generated keys read the cache
        rows = torch.cat((rows, rows.new_full((keys.numel() - rows.numel(),), -1)))
    if multiplicity is not None:
        _ROWS_OF_KEYS[tag] = (weakref.ref(keys), rows)
    return rows


def _remember_rows(multiplicity: torch.Tensor, row_of: torch.Tensor, rows: torch.Tensor) -> None:
    _ROWS[(id(multiplicity), id(row_of))] = (weakref.ref(multiplicity), weakref.ref(row_of), rows)


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


_KEYS: dict[int, list] = _Memo(256)  # id(multiplicity) -> [weak ref, length, keys/bias, (seq_len, extended) or None]
_ALL: dict[int, tuple] = _Memo(64)  # seq_len -> keys/bias of multiplicity None


def _keys_and_bias(multiplicity: torch.Tensor | None, seq_len: int):
    """``ref.keys_and_bias`` plus the kernels' forms: (keys [n] int64, bias [n] f32 or None,
    keys [n] int32, bias [n] f32 or empty when it is all 0, i.e. every m is 0 or 1).
    Remembered per multiplicity tensor: the layers of a group all read the same tensor in a
    step (sessions hand out one object per step)."""
    if multiplicity is None:
        hit = _ALL.get(seq_len)
        if hit is None:
            keys = torch.arange(seq_len)
            hit = _ALL[seq_len] = (keys, None, keys.to(torch.int32), _EMPTY)
        return hit
    prefix = multiplicity.dim() == 1 and multiplicity.numel() < seq_len  # later positions read 1
    length = multiplicity.numel() if prefix else seq_len
    entry = _KEYS.get(id(multiplicity))
    if entry is None or entry[0]() is not multiplicity or entry[1] != length:
        keys, bias = ref.keys_and_bias(multiplicity, length)
        flat = bias.reshape(-1).float().contiguous()  # one decode query: a 1-D bias
        bias32 = _EMPTY if bool((flat == 0).all()) else flat
        entry = _remember_keys(multiplicity, length, (keys, bias, keys.to(torch.int32), bias32))
    if not prefix:
        return entry[2]
    if entry[3] is None or entry[3][0] != seq_len:  # the layers of a step share one extension
        entry[3] = (seq_len, _extended(entry[2], length, seq_len))
    return entry[3][1]


def _remember_keys(multiplicity: torch.Tensor, length: int, result: tuple) -> list:
    """Remember ``_keys_and_bias``'s result for a multiplicity tensor over ``length`` positions."""
    entry = _KEYS[id(multiplicity)] = [weakref.ref(multiplicity), length, result, None]
    return entry


def derive_packed(flat: torch.Tensor, pack, row_ofs: list | None = None) -> list[torch.Tensor]:
    """flat: [sum pack.sizes] float32, the prefix multiplicities of several views back to back
    (``kv.layout.PackedSegments``: one view over each of a request's segments). -> one [size]
    view of ``flat`` per segment. What :func:`_keys_and_bias` and, with ``row_ofs`` (each
    segment's key-copy ``row_of``), :func:`_copy_rows` give for each is derived here for all
    segments in one pass and remembered as they remember theirs (the decode hot path: a request's
    segments re-derived at every step a decode policy re-selects). Off the CPU only the views:
    deriving needs host syncs, which the session's decode path never makes there."""
    ms = list(flat.split(pack.sizes))
    if flat.device.type != "cpu":
        return ms
    keys_all = (flat > 0).nonzero().squeeze(1)  # [K] packed indices read, ascending
    bounds = torch.searchsorted(keys_all, pack.offsets).tolist()  # [S + 1] each segment's range in keys_all
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    # index_select: 2-5x faster than advanced indexing at these sizes (a few thousand)
    local = pack.local.index_select(0, keys_all)  # [K] cache indices
    kept = flat.index_select(0, keys_all)
    unit = bool((kept == 1).all())
    # [K] log m; all 0 when every m is 1 (a dp view), skipping a log that torch runs on both
    # threads of a 2-core machine (55 us for 1,400 keys vs 4 us on one)
    bias = kept.new_zeros(kept.shape) if unit else torch.log(kept)
    for m, keys, keys32, b in zip(ms, local.split(counts), local.to(torch.int32).split(counts), bias.split(counts)):
        _remember_keys(m, m.numel(), (keys, b, keys32, _EMPTY if unit else b))
    if row_ofs is not None:
        rows = pack.copy_rows.index_select(0, keys_all)  # [K] int32
        below = torch.searchsorted(keys_all, pack.copy_ends).tolist()  # [S] end of each copied range in keys_all
        for m, r, lo, hi in zip(ms, row_ofs, bounds, below):
            _remember_rows(m, r, rows[lo:hi])
    return ms


def _extended(result, length: int, seq_len: int):
    """``result`` of the first ``length`` positions, with positions ``length..seq_len-1`` read at 1."""
    keys, bias, keys32, bias32 = result
    more = torch.arange(length, seq_len)
    keys = torch.cat((keys, more))
    if bias is not None:
        bias = torch.cat((bias, bias.new_zeros(more.numel())))
    return (keys, bias, keys.to(torch.int32),
            bias32 if not bias32.numel() else torch.cat((bias32, bias32.new_zeros(more.numel()))))


def runs_cpp_kernel(query: torch.Tensor) -> bool:
    """Whether a single decode query ``query`` goes to the C++ kernel (the one that reads a KeyCopy)."""
    return not query.is_cuda and kernel_choice() in ("auto", "cpp") and cpp_ops() is not None


def indexed_paged_attention(query, k_region, v_region, k_offsets, v_offsets, block_row, seq_len: int,
                            multiplicity: torch.Tensor | None, scale: float, want_mass: bool = True, out=None,
                            key_copy: KeyCopy | None = None):
    """See :func:`paged_attention_ref.indexed_paged_attention`: (out [nq, Hq, hs], mass [nq, n], keys [n]).
    ``want_mass=False``: mass is None (the kernels skip it). ``out`` [nq, Hq, hs]: written in
    place when given (the C++ kernel writes it directly). ``key_copy``: read by the C++ kernel."""
    choice = kernel_choice()
    single = query.shape[0] == 1 and (multiplicity is None or multiplicity.dim() == 1 or multiplicity.shape[0] == 1)
    use_triton = choice == "triton" or (choice == "auto" and query.is_cuda)
    use_cpp = runs_cpp_kernel(query)
    if single and (use_triton or use_cpp):
        keys, bias, keys32, bias32 = _keys_and_bias(multiplicity, seq_len)  # one decode query: 1-D keys, bias
        if use_cpp:
            rows = _NO_ROWS if key_copy is None else _copy_rows(keys, multiplicity, key_copy.row_of)
            result, mass = _cpp_decode(query, k_region, v_region, k_offsets, v_offsets, block_row,
                                       [(keys32, bias32, key_copy, rows)], scale, want_mass, out)
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


@dataclass(frozen=True, eq=False)
class DecodeRequests:
    """What R single-query entries of a C++ call read, derived once and shared by every layer
    that reads the same views (the backend prepares it per step and layout): keys [n_r] int64
    and int32, the bias (f32, or empty when every multiplicity is 0 or 1) and the key-copy rows
    (int32, or empty: no copy) of each."""

    keys: list[torch.Tensor]
    keys32: list[torch.Tensor]
    bias32: list[torch.Tensor]
    copy_rows: list[torch.Tensor]


def decode_requests(seq_lens, multiplicities, row_ofs=None, memo: dict | None = None) -> DecodeRequests:
    """seq_lens, multiplicities (each [seq_len], a prefix of it, or None) and ``row_ofs`` (the
    ``row_of`` of each request's key copy, or None), one per request. ``memo``: a dict kept for
    one step, so a request whose view several calls share (a batch whose rows change layout at
    different layers) is derived once per step."""
    row_ofs = row_ofs or [None] * len(seq_lens)
    memo = {} if memo is None else memo
    out = []
    for m, n, r in zip(multiplicities, seq_lens, row_ofs):
        tag = (id(m), int(n), id(r))
        hit = memo.get(tag)
        if hit is None or hit[0] is not m or hit[1] is not r:
            keys, _, keys32, bias32 = _keys_and_bias(m, int(n))
            hit = memo[tag] = (m, r, keys, keys32, bias32, _NO_ROWS if r is None else _copy_rows(keys, m, r))
        out.append(hit[2:])
    return DecodeRequests(*map(list, zip(*out))) if out else DecodeRequests([], [], [], [])


def run_decode_requests(query, k_region, v_region, k_offsets, v_offsets, block_table, requests: DecodeRequests,
                        scale: float, want_mass: bool = True, out=None, key_copies=None):
    """R decode queries in one C++ call (CPU): query [R, Hq, hs], block_table [R, max_blocks],
    ``key_copies`` (each a KeyCopy, whose ``row_of`` ``requests`` was prepared with, or None).
    -> (out [R, Hq, hs], masses: R tensors [1, n_r] or None, keys: R tensors [n_r])."""
    key_copies = key_copies or [None] * len(requests.keys)
    entries = [(k, b, c, r if c is not None else _NO_ROWS)
               for k, b, c, r in zip(requests.keys32, requests.bias32, key_copies, requests.copy_rows)]
    result, masses = _cpp_decode(query, k_region, v_region, k_offsets, v_offsets, block_table, entries, scale,
                                 want_mass, out)
    return result, (masses if want_mass else None), requests.keys


def indexed_decode_batch(query, k_region, v_region, k_offsets, v_offsets, block_table, seq_lens,
                         multiplicities, scale: float, want_mass: bool = True, out=None, key_copies=None):
    """R decode queries in one C++ call (CPU): query [R, Hq, hs], block_table [R, max_blocks],
    seq_lens, multiplicities (each [seq_len], a prefix of it, or None) and key_copies (each a
    KeyCopy or None) one per request. -> (out [R, Hq, hs], masses: R tensors [1, n_r] or None,
    keys: R tensors [n_r])."""
    key_copies = key_copies or [None] * len(seq_lens)
    requests = decode_requests(seq_lens, multiplicities, [None if c is None else c.row_of for c in key_copies])
    return run_decode_requests(query, k_region, v_region, k_offsets, v_offsets, block_table, requests, scale,
                               want_mass, out, key_copies)


def _cpp_decode(query, k_region, v_region, k_offsets, v_offsets, block_table, requests, scale, want_mass, out):
    """One C++ call for R decode queries; requests: (keys int32, bias f32 or empty, KeyCopy or
    None, copy rows int32 or empty) each. -> (out [R, Hq, hs], R masses [1, n_r] or an empty list)."""
    result = torch.empty_like(query) if out is None else out
    masses = cpp_ops().indexed_decode_attention(
        query, k_region, v_region, k_offsets, v_offsets, layout_code(k_offsets, transposed_ok=True),
        layout_code(v_offsets), block_table, [r[0] for r in requests], [r[1] for r in requests],
        [_EMPTY if r[2] is None else r[2].keys for r in requests], [r[3] for r in requests], scale, result,
        want_mass)
    return result, masses


__all__ = ["indexed_paged_attention", "indexed_decode_batch", "decode_requests", "run_decode_requests", "DecodeRequests", "kernel_choice", "cpp_ops", "KeyCopy", "copy_keys", "rows_of", "runs_cpp_kernel"]
