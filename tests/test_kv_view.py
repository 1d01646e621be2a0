"""The token view and indexed paged attention against dense attention over literal token lists.

Duplicating a token k times must equal attending to a list where it appears k times;
evicting must equal leaving it out; reviving must bring it back. Checked with random
evict / duplicate / revive sequences (hypothesis) through the paged gather with plain and
packed (transposed-K) block layouts, GQA 14/2, head sizes 32 and 64.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.paged_cache import paged_cache
from vllm_tokenzoom.kv.view import KVPlan, TokenView
from vllm_tokenzoom.ops.paged_attention_ref import indexed_paged_attention


def dense_attention(query, keys, values, scale):
    """query [nq, Hq, hs]; keys/values: python lists (one entry per *listed* token) of [Hkv, hs]."""
    k = torch.stack(keys).float()
    v = torch.stack(values).float()
    group = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    p = torch.softmax(torch.einsum("qhd,khd->hqk", query.float(), k) * scale, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


KERNELS = ["torch", "cpp", "triton"]


@pytest.mark.parametrize("kernels", KERNELS)
def test_view_equals_dense_attention_over_the_listed_tokens(monkeypatch, kernels):
    """Random evict / duplicate / revive sequences, for every kernel path."""
    monkeypatch.setenv("TOKENZOOM_KERNELS", kernels)
    examples = 40 if kernels != "triton" else 15  # the interpreter is slow
    settings(max_examples=examples, deadline=None)(given(
        ops=OPS, seq_len=st.integers(1, 70), head_size=st.sampled_from([32, 64]),
        block_size=st.sampled_from([16, 32]), layout=st.sampled_from(["plain", "packed"]),
        seed=st.integers(0, 99))(check_view_against_dense))()


OPS = st.lists(st.tuples(st.sampled_from(["evict", "dup", "revive"]), st.integers(0, 10_000), st.integers(2, 4)),
               max_size=12)


def check_view_against_dense(ops, seq_len, head_size, block_size, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = 14, 2
    k, v = torch.randn(seq_len, hkv, head_size, generator=gen), torch.randn(seq_len, hkv, head_size, generator=gen)
    query = torch.randn(1, hq, head_size, generator=gen)  # a decode query at position seq_len - 1
    view, m = TokenView((0,)), [1] * seq_len
    for step, (op, where, times) in enumerate(ops):
        p = where % seq_len
        value = {"evict": 0, "dup": times, "revive": 1}[op]
        if op == "evict" and sum(1 for x in m if x > 0) == 1 and m[p] > 0:
            continue  # keep at least one token readable
        m[p] = value
        view.apply(KVPlan(0, torch.tensor([p]), torch.tensor([float(value)])), at_position=step)
    listed = [p for p in range(seq_len) for _ in range(m[p])]
    expected = dense_attention(query, [k[p] for p in listed], [v[p] for p in listed], 0.125)
    regions = paged_cache(k, v, block_size, layout, seed)
    out, mass, keys = indexed_paged_attention(query, *regions, seq_len, view.multiplicity(0, seq_len), 0.125)
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)
    assert keys.tolist() == [p for p in range(seq_len) if m[p] > 0]  # evicted tokens are never read
    torch.testing.assert_close(mass.sum(-1), torch.ones(1))


def test_everything_evicted_but_one_token_and_block_edges():
    seq_len, block_size = 64, 32
    k, v = torch.randn(seq_len, 2, 32), torch.randn(seq_len, 2, 32)
    query = torch.randn(1, 14, 32)
    for survivor in (0, 31, 32, 63):  # first and last slot of each block
        m = torch.zeros(seq_len)
        m[survivor] = 3.0
        out, mass, keys = indexed_paged_attention(query, *paged_cache(k, v, block_size, "packed", 0), seq_len, m, 0.2)
        assert keys.tolist() == [survivor]
        torch.testing.assert_close(out, v[survivor].repeat_interleave(7, 0)[None])


def test_per_query_views_are_causal_and_independent():
    seq_len = 40
    k, v = torch.randn(seq_len, 2, 32), torch.randn(seq_len, 2, 32)
    query = torch.randn(3, 14, 32)  # positions 37, 38, 39
    m = torch.ones(3, seq_len)
    m[1, 5:20] = 0.0
    m[2, 0] = 2.0
    out, _, _ = indexed_paged_attention(query, *paged_cache(k, v, 32, "plain", 1), seq_len, m, 0.2)
    for i, q in enumerate((37, 38, 39)):
        listed = [p for p in range(q + 1) for _ in range(int(m[i, p]))]
        expected = dense_attention(query[i:i + 1], [k[p] for p in listed], [v[p] for p in listed], 0.2)
        torch.testing.assert_close(out[i:i + 1].float(), expected, rtol=1e-5, atol=1e-5)


def test_view_history_gives_each_position_its_view():
    view = TokenView((0, 2))
    view.apply(KVPlan(1, torch.tensor([3]), torch.tensor([0.0])), at_position=10)
    view.apply(KVPlan(1, torch.tensor([4]), torch.tensor([2.0]), reset=True), at_position=11)
    assert view.multiplicity(0, 6) is None  # group 0 untouched
    assert view.at(9).multiplicity(2, 6) is None
    assert view.at(10).multiplicity(2, 6).tolist() == [1, 1, 1, 0, 1, 1]
    assert view.at(11).multiplicity(3, 6).tolist() == [1, 1, 1, 1, 2, 1]
    with pytest.raises(ValueError, match="position order"):
        view.apply(KVPlan(1, torch.tensor([0]), torch.tensor([1.0])), at_position=5)
    with pytest.raises(ValueError, match=">= 0"):
        KVPlan(0, torch.tensor([0]), torch.tensor([-1.0]))
