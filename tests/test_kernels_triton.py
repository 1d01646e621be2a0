"""Triton kernels (triton_kernels/indexed_attention.py) against the torch reference, and
the tiny model through real vLLM on them. Without a GPU they run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1); with one, natively.
"""
import pytest
import torch

from tests.paged_cache import paged_cache
from vllm_tokenzoom.ops import indexed_paged_attention
from vllm_tokenzoom.ops import paged_attention_ref as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (seq_len, block size, (q heads, kv heads), head size, layout, multiplicity kind, dtype)
CASES = [
    (1, 16, (14, 2), 64, "plain", "all", torch.float32),  # a single token
    (64, 32, (14, 2), 32, "packed", "all", torch.float32),  # exactly two blocks
    (65, 32, (14, 2), 64, "packed", "evict", torch.float32),  # one past a block boundary
    (200, 16, (4, 2), 64, "plain", "one-left", torch.float32),  # everything evicted but one token
    (130, 128, (14, 2), 32, "plain", "dup", torch.float32),  # the same slot duplicated
    (300, 32, (2, 2), 32, "packed", "mixed", torch.bfloat16),  # more keys than one tile, bf16 cache
    (97, 16, (14, 2), 80, "plain", "mixed", torch.float32),  # head size not a power of two
]


def multiplicity(kind, seq_len, gen):
    if kind == "all":
        return None
    m = torch.ones(seq_len)
    if kind in ("evict", "mixed"):
        m[torch.rand(seq_len, generator=gen) < 0.6] = 0.0
    if kind in ("dup", "mixed"):
        m[torch.randint(seq_len, (3,), generator=gen)] = 4.0
    if kind == "one-left":
        m.zero_()
        m[seq_len // 2] = 1.0
    m[seq_len - 1] = max(float(m[seq_len - 1]), 1.0)
    return m


@pytest.mark.parametrize("seq_len, page, heads, head_size, layout, kind, dtype", CASES)
def test_triton_decode_and_key_mass_match_reference(monkeypatch, seq_len, page, heads, head_size, layout, kind, dtype):
    gen = torch.Generator().manual_seed(seq_len)
    hq, hkv = heads
    k, v = torch.randn(seq_len, hkv, head_size, generator=gen), torch.randn(seq_len, hkv, head_size, generator=gen)
    k_region, v_region, k_off, v_off, row = paged_cache(k, v, page, layout, seq_len)
    k_region, v_region = k_region.to(dtype), v_region.to(dtype)
    query = torch.randn(1, hq, head_size, generator=gen)
    m = multiplicity(kind, seq_len, gen)
    args = [t.to(DEVICE) for t in (query, k_region, v_region, k_off, v_off, row)]
    monkeypatch.setenv("TOKENZOOM_KERNELS", "triton")
    out, mass, keys = indexed_paged_attention(*args, seq_len, None if m is None else m.to(DEVICE), 0.13)
    out_ref, mass_ref, keys_ref = ref.indexed_paged_attention(query, k_region, v_region, k_off, v_off, row, seq_len,
                                                              m, 0.13)
    assert keys.cpu().tolist() == keys_ref.tolist()
    torch.testing.assert_close(out.cpu(), out_ref, rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(mass.cpu(), mass_ref, rtol=3e-5, atol=1e-7)


def test_tiny_model_on_vllm_s_cpu_backend_with_the_triton_kernels(tiny_model, dense, prompt):
    """vLLM's decode steps, on tokenzoom's CPU attention backend with every pruned decode query
    sent to the Triton kernels (interpreted on CPU), select the same tokens and produce the same
    greedy output as the dense DyCoke reference. The CUDA backend (``triton_attn.py``: its cache
    regions, the device mix) needs a GPU and is not exercised here."""
    from vllm_tokenzoom.methods.dp import DP
    from vllm_tokenzoom.methods.ttm import TTM
    from vllm_tokenzoom.testing.offline import load_video, run_offline

    request = dict(frames=8, seed=70, max_tokens=6)
    env = {"TOKENZOOM_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    run = run_offline(tiny_model, [request], {"tokenzoom": {}}, env=env, trace=True, preload=["tests.kernel_calls_hook"])
    (got,) = run["outputs"]
    calls = run["reports"]["tests.kernel_calls_hook"]
    # each decided decode query is computed by Triton at layer L-1 = 2 (its scores) and at the one
    # layer >= L = 3 of the 4 (its pruned view); none falls back to the reference
    assert (calls["triton_calls"], calls["reference_calls"]) == (2 * len(got["dp_trace"]), 0), calls
    ref_out = dense.generate(load_video(request), prompt, TTM(prune_ratio=0.7), 6, dp=DP())
    assert [tuple(step) for step in got["dp_trace"]] == [(q, s) for q, s in ref_out.dp_trace]
    assert got["tokens"] == ref_out.tokens
