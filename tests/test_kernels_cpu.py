"""The C++ CPU kernel (csrc/indexed_attention.cpp) against its torch reference, on each build
this CPU can run: on x86-64 ``_C_avx512`` (its AVX-512 path, where the CPU has AVX-512) and
``_C_avx2`` (its portable path), so both paths are checked on an AVX-512 machine and the
portable one everywhere; ``_C`` elsewhere. A missing build fails the tests (no fallback)."""
import importlib
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.paged_cache import paged_cache
from vllm_tokenzoom import ops
from vllm_tokenzoom.ops import indexed_paged_attention
from vllm_tokenzoom.ops import paged_attention_ref as ref

X86 = platform.machine() in ("x86_64", "AMD64")
AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= ops.cpu_flags()
BUILDS = (["_C_avx512"] if AVX512 else []) + ["_C_avx2"] if X86 else ["_C"]


@pytest.fixture(scope="module", params=BUILDS, autouse=True)
def build(request):
    """The kernels every call in the test reaches (``ops.cpp_ops``) come from this build."""
    try:
        module = importlib.import_module(f"vllm_tokenzoom.{request.param}")
    except ImportError:
        pytest.fail(f"vllm_tokenzoom.{request.param} is missing: setup.py builds it (make install)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "cpp_ops", lambda: module)
        yield module


def test_extension_is_built(build):
    assert ops.cpp_ops() is build
    assert build.simd_path() == ("avx512" if build.__name__.endswith("_avx512") else "portable")


def test_the_build_is_picked_by_the_cpu_at_run_time():
    """One wheel per architecture: the CPU's flags, not the build machine's, choose the build."""
    assert ops.cpu_build() == (("_C_avx512" if AVX512 else "_C_avx2") if X86 else "_C")
    ops.cpu_build.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(platform, "machine", lambda: "x86_64")
        for flags, expected in [({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}, "_C_avx512"),
                                ({"avx2", "fma", "avx512f"}, "_C_avx2"), ({"avx2", "fma"}, "_C_avx2"), ({"sse4_2"}, None)]:
            patch.setattr(ops, "cpu_flags", lambda flags=flags: flags)
            ops.cpu_build.cache_clear()
            assert ops.cpu_build() == expected, flags
    ops.cpu_build.cache_clear()


@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(1, 300), head_size=st.sampled_from([32, 64]), block_size=st.sampled_from([16, 32, 128]),
       heads=st.sampled_from([(14, 2), (4, 2), (2, 2)]), layout=st.sampled_from(["plain", "packed"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), keep=st.floats(0.0, 1.0), dup=st.floats(0.0, 0.5),
       seed=st.integers(0, 999))
def test_cpp_decode_kernel_matches_reference(seq_len, head_size, block_size, heads, layout, dtype, keep, dup, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    k = torch.randn(seq_len, hkv, head_size, generator=gen)
    v = torch.randn(seq_len, hkv, head_size, generator=gen)
    k_region, v_region, k_off, v_off, block_row = paged_cache(k, v, block_size, layout, seed)
    k_region, v_region = k_region.to(dtype), v_region.to(dtype)
    query = torch.randn(1, hq, head_size, generator=gen)
    m = (torch.rand(seq_len, generator=gen) < keep).float()
    m[torch.rand(seq_len, generator=gen) < dup] = 3.0  # some duplicated
    m[torch.randint(seq_len, (1,), generator=gen)] = 1.0  # at least one token read
    args = (query, k_region, v_region, k_off, v_off, block_row, seq_len)
    out, mass, keys = indexed_paged_attention(*args, m, 0.17)
    out_ref, mass_ref, keys_ref = ref.indexed_paged_attention(*args, m, 0.17)
    assert torch.equal(keys, keys_ref)
    torch.testing.assert_close(out, out_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(mass, mass_ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("multiplicity", [None, "one-left", "same-slot-dup", "block-edges"])
def test_cpp_edges(multiplicity):
    seq_len, block_size = 96, 32
    k, v = torch.randn(seq_len, 2, 64), torch.randn(seq_len, 2, 64)
    regions = paged_cache(k, v, block_size, "packed", 3)
    query = torch.randn(1, 14, 64)
    m = {None: None, "one-left": torch.zeros(seq_len).index_fill_(0, torch.tensor([95]), 1.0),
         "same-slot-dup": torch.ones(seq_len).index_fill_(0, torch.tensor([40]), 5.0),
         "block-edges": torch.zeros(seq_len).index_fill_(0, torch.tensor([0, 31, 32, 63, 64, 95]), 2.0)}[multiplicity]
    out, mass, _ = indexed_paged_attention(query, *regions, seq_len, m, 0.125)
    out_ref, mass_ref, _ = ref.indexed_paged_attention(query, *regions, seq_len, m, 0.125)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, mass_ref, rtol=1e-5, atol=1e-7)


def test_multi_query_calls_fall_back_to_the_reference(monkeypatch):
    """Only the reference handles several queries with per-query views (recomputation)."""
    monkeypatch.setenv("TOKENZOOM_KERNELS", "cpp")
    k, v = torch.randn(8, 2, 32), torch.randn(8, 2, 32)
    query, regions = torch.randn(2, 4, 32), paged_cache(k, v, 16, "plain", 0)
    out, _, _ = indexed_paged_attention(query, *regions, 8, None, 0.1)
    torch.testing.assert_close(out, ref.indexed_paged_attention(query, *regions, 8, None, 0.1)[0])


def test_cpp_batch_of_requests_matches_reference_per_request():
    """indexed_decode_batch: R requests in one call (own keys, bias and block row each) equal
    R single-request reference calls; want_mass=False skips the mass, out is written in place."""
    from vllm_tokenzoom.ops import indexed_decode_batch

    gen = torch.Generator().manual_seed(5)
    block_size, hs, nb = 32, 64, 12
    k_region, v_region = torch.randn(nb, 2, block_size * hs, generator=gen), torch.randn(nb, 2, block_size * hs, generator=gen)
    _, _, k_off, v_off, _ = paged_cache(torch.zeros(1, 2, hs), torch.zeros(1, 2, hs), block_size, "packed", 0)
    seq_lens = [300, 37, 128]
    table = torch.stack([torch.randperm(nb, generator=gen)[:10] for _ in seq_lens]).to(torch.int32)
    mults = [(torch.rand(n, generator=gen) < keep).float() * torch.randint(1, 3, (n,), generator=gen)
             for n, keep in zip(seq_lens, (0.9, 0.2, 1.0))]
    for m in mults:
        m[-1] = 1.0
    mults[2] = None
    query = torch.randn(3, 14, hs, generator=gen)
    out = torch.empty_like(query)
    got, masses, keys = indexed_decode_batch(query, k_region, v_region, k_off, v_off, table, seq_lens, mults, 0.125,
                                             out=out)
    assert got is out
    for r, (n, m) in enumerate(zip(seq_lens, mults)):
        o_ref, mass_ref, keys_ref = ref.indexed_paged_attention(query[r:r + 1], k_region, v_region, k_off, v_off,
                                                                table[r], n, m, 0.125)
        assert torch.equal(keys[r], keys_ref)
        torch.testing.assert_close(out[r], o_ref[0], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(masses[r], mass_ref, rtol=2e-5, atol=1e-6)
    again, none, _ = indexed_decode_batch(query, k_region, v_region, k_off, v_off, table, seq_lens, mults, 0.125,
                                          want_mass=False)
    assert none is None and torch.equal(again, out)


def test_cpp_single_call_without_mass_writes_out(monkeypatch):
    monkeypatch.setenv("TOKENZOOM_KERNELS", "cpp")
    k, v = torch.randn(200, 2, 64), torch.randn(200, 2, 64)
    regions = paged_cache(k, v, 128, "packed", 1)
    query, m = torch.randn(1, 14, 64), (torch.rand(200) < 0.4).float()
    m[-1] = 2.0
    out = torch.empty(1, 14, 64)
    got, mass, keys = indexed_paged_attention(query, *regions, 200, m, 0.125, want_mass=False, out=out)
    assert got is out and mass is None
    torch.testing.assert_close(out, ref.indexed_paged_attention(query, *regions, 200, m, 0.125)[0], rtol=2e-5, atol=2e-5)


@settings(max_examples=40, deadline=None)
@given(seq_len=st.integers(1, 300), head_size=st.sampled_from([32, 64]), block_size=st.sampled_from([16, 128]),
       heads=st.sampled_from([(14, 2), (4, 2)]), layout=st.sampled_from(["plain", "packed"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), keep=st.floats(0.0, 1.0), copied=st.floats(0.0, 1.0),
       seed=st.integers(0, 999))
def test_cpp_kernel_reads_copied_keys_from_the_key_copy(seq_len, head_size, block_size, heads, layout, dtype, keep,
                                                        copied, seed):
    """Keys with a row in the KeyCopy are read there, the rest from the cache: the kernel over
    cache K with a copy made from K' equals the reference over a cache holding K' at the
    copied positions (K' != K, so reading the wrong one fails)."""
    from vllm_tokenzoom.ops import copy_keys

    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    k, k2, v = (torch.randn(seq_len, hkv, head_size, generator=gen) for _ in range(3))
    where = (torch.rand(seq_len, generator=gen) < copied).nonzero().squeeze(1)  # copied positions, ascending
    k_mixed = k.clone()
    k_mixed[where] = k2[where]

    def cache(keys):  # regions in dtype, offsets and block row as built (the same seed: the same blocks)
        k_region, v_region, *rest = paged_cache(keys, v, block_size, layout, seed)
        return [k_region.to(dtype), v_region.to(dtype), *rest]

    regions, mixed, k2_regions = cache(k), cache(k_mixed), cache(k2)
    key_copy = copy_keys(k2_regions[0], k2_regions[2], k2_regions[4], where)
    assert torch.equal(key_copy.keys, k2[where].to(dtype).transpose(0, 1))  # an exact copy, [Hkv, rows, hs]
    query = torch.randn(1, hq, head_size, generator=gen)
    m = (torch.rand(seq_len, generator=gen) < keep).float() * torch.randint(1, 3, (seq_len,), generator=gen)
    m[-1] = 1.0
    out, mass, keys = indexed_paged_attention(query, *regions, seq_len, m, 0.17, key_copy=key_copy)
    out_ref, mass_ref, keys_ref = ref.indexed_paged_attention(query, *mixed, seq_len, m, 0.17)
    assert torch.equal(keys, keys_ref)
    torch.testing.assert_close(out, out_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(mass, mass_ref, rtol=2e-5, atol=1e-6)


def test_cpp_batch_mixes_requests_with_and_without_a_key_copy():
    from vllm_tokenzoom.ops import copy_keys, indexed_decode_batch

    gen = torch.Generator().manual_seed(9)
    block_size, hs, seq_len = 128, 64, 400
    k, v = torch.randn(seq_len, 2, hs, generator=gen), torch.randn(seq_len, 2, hs, generator=gen)
    k_region, v_region, k_off, v_off, row = paged_cache(k, v, block_size, "packed", 2)
    visual = torch.arange(20, 380)  # a video's positions: copied for request 0 only
    key_copy = copy_keys(k_region, k_off, row, visual)
    m = (torch.rand(seq_len, generator=gen) < 0.3).float()
    m[:20], m[380:] = 1.0, 1.0
    query = torch.randn(2, 14, hs, generator=gen)
    table = torch.stack([row, row]).to(torch.int32)
    out, masses, _ = indexed_decode_batch(query, k_region, v_region, k_off, v_off, table, [seq_len, seq_len], [m, m],
                                          0.125, key_copies=[key_copy, None])
    for r in range(2):
        o_ref, mass_ref, _ = ref.indexed_paged_attention(query[r:r + 1], k_region, v_region, k_off, v_off, row,
                                                         seq_len, m, 0.125)
        torch.testing.assert_close(out[r], o_ref[0], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(masses[r], mass_ref, rtol=2e-5, atol=1e-6)


def test_cpp_kernel_rejects_a_copy_row_outside_the_copy():
    from vllm_tokenzoom.ops import KeyCopy

    k, v = torch.randn(40, 2, 32), torch.randn(40, 2, 32)
    regions = paged_cache(k, v, 16, "packed", 0)
    bad = KeyCopy(torch.zeros(2, 3, 32), torch.tensor([0, 1, 7], dtype=torch.int32))  # row 7 of 3
    with pytest.raises(RuntimeError, match="outside the key copy"):
        indexed_paged_attention(torch.randn(1, 4, 32), *regions, 40, torch.ones(40), 0.1, key_copy=bad)
