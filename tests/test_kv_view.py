"""The token view and indexed paged attention against dense attention over literal token lists.

Duplicating a token k times must equal attending to a list where it appears k times;
evicting must equal leaving it out; reviving must bring it back. Checked with random
evict / duplicate / revive sequences (hypothesis) through the paged gather with plain and
packed (transposed-K) block layouts, GQA 14/2, head sizes 32 and 64. Then the view itself:
policy layers composed by product, compact history, permanent zeros, death layers.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.paged_cache import paged_cache
from vllm_tokenzoom.kv.view import TokenView
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
    m = [1] * seq_len
    for op, where, times in ops:
        p = where % seq_len
        value = {"evict": 0, "dup": times, "revive": 1}[op]
        if op == "evict" and sum(1 for x in m if x > 0) == 1 and m[p] > 0:
            continue  # keep at least one token readable
        m[p] = value
    listed = [p for p in range(seq_len) for _ in range(m[p])]
    expected = dense_attention(query, [k[p] for p in listed], [v[p] for p in listed], 0.125)
    regions = paged_cache(k, v, block_size, layout, seed)
    multiplicity = None if all(x == 1 for x in m) else torch.tensor(m, dtype=torch.float32)
    out, mass, keys = indexed_paged_attention(query, *regions, seq_len, multiplicity, 0.125)
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


def test_policy_layers_compose_by_product_and_never_erase_each_other():
    """Two decode policies edit their own layers: one prunes from layer 2 on, one duplicates from
    layer 1 on; a layer reads the product, and a new plan of one leaves the other's in force."""
    view = TokenView(num_visual=4, num_layers=4)
    prune, dup = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([2.0, 1.0, 1.0, 3.0])
    view.push("dp", 2, position=10, value=prune)
    view.push("ata", 1, position=10, value=dup)
    assert view.multiplicity(0, 10) is None
    assert view.multiplicity(1, 10).tolist() == [2, 1, 1, 3]
    assert view.multiplicity(3, 10).tolist() == [2, 0, 1, 3]
    view.push("dp", 2, position=11, value=torch.tensor([0.0, 1.0, 1.0, 1.0]))  # dp re-selects
    assert view.multiplicity(3, 11).tolist() == [0, 1, 1, 3]  # ata's duplicates stay
    assert view.multiplicity(3, 10).tolist() == [2, 0, 1, 3]  # and query 10 keeps the view it had
    assert view.multiplicity(3, 9) is None  # before any plan: all ones


def test_read_share_counts_what_each_layer_reads():
    """The decode figure ``tokenzoom:decode_visual_attended_ratio``: the share of the visual tokens
    a query reads (alive at the layer and multiplicity > 0), averaged over the layers. Hand-derived,
    with death layers and two policy layers starting at different layers."""
    view = TokenView(num_visual=4, num_layers=6)
    assert view.read_share(10) == 1.0  # no policy, nothing dropped
    view.drop_after(torch.tensor([False, False, False, True]), layer=3)  # token 3 gone from layer 4 on
    view.push("dp", 2, position=10, value=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    view.push("ata", 4, position=10, value=torch.tensor([2.0, 1.0, 1.0, 0.0]))
    # layers 0-1: 4 read; 2-3: dp -> tokens 0, 3; 4-5: dp x ata, token 3 dead -> token 0
    assert view.read_share(10) == (4 + 4 + 2 + 2 + 1 + 1) / 24
    assert view.read_share(9) == (4 * 4 + 3 + 3) / 24  # before the plans: only the death layers


def test_history_keeps_only_distinct_views():
    """A request recomputed after preemption gets each query's view from a history as long as
    the number of distinct views, not the number of steps."""
    view = TokenView(num_visual=3000, num_layers=24)
    a, b = torch.ones(3000), torch.ones(3000)
    a[::3], b[1::3] = 0, 0
    for step in range(1000):
        view.push("dp", 3, position=5000 + step, value=(a if step < 600 else b).clone())  # new objects, equal values
        view.settle()
    history = view.layers["dp"].history
    assert history.starts == [5000, 5600] and len(history.values) == 2
    assert torch.equal(view.multiplicity(5, 5599), a) and torch.equal(view.multiplicity(5, 5600), b)
    assert torch.equal(view.multiplicity(5, 6999), b)
    with pytest.raises(ValueError, match="position order"):
        view.push("dp", 3, position=5500, value=a)


def test_permanent_zeros_are_never_revived_and_count_as_dead_everywhere():
    view = TokenView(num_visual=5, num_layers=4)
    view.push("evict", 0, position=10, value=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), permanent=True)
    view.push("dp", 2, position=10, value=torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))  # revivable
    assert view.dead_everywhere().tolist() == [False, True, True, False, False]
    view.push("evict", 0, position=11, value=torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]), permanent=True)
    assert view.dead_everywhere().tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="permanently evicted"):
        view.push("evict", 0, position=12, value=torch.ones(5), permanent=True)


def test_death_layers_compact_the_cache_of_later_layers():
    """Prefill drops (death layers): in the layers after, the alive tokens sit at cache indices
    0, 1, 2, ... in position order; generated tokens follow them (hand-derived)."""
    from vllm_tokenzoom.kv.layout import CacheLayout
    from vllm_tokenzoom.kv.token_map import TokenMap

    # prompt: 2 text, 6 visual (positions 2..7), newline 8, 3 text (9..11); N = 12
    token_map = TokenMap.build(12, [(2, 7)], [None])
    view = TokenView(num_visual=6, num_layers=4)
    view.drop_after(torch.tensor([False, True, False, True, True, False]), layer=1)  # positions 3, 5, 6
    layout = CacheLayout(token_map, view.death, 4)
    assert layout.boundaries == [2] and layout.segment(1) is layout.segments[0] is not layout.segment(3)
    seg = layout.segment(2)
    assert seg.cache_index(torch.arange(12)).tolist() == [0, 1, 2, -1, 3, -1, -1, 4, 5, 6, 7, 8]
    assert seg.cache_index(torch.tensor([12, 13])).tolist() == [9, 10]  # generated tokens
    assert [seg.cache_len(n) for n in (3, 4, 8, 12, 14)] == [3, 3, 5, 9, 11]
    assert layout.segment(0).cache_index(torch.arange(12)).tolist() == list(range(12))
    assert seg.visual_cache_index.tolist() == [2, -1, 3, -1, -1, 4]
    # blocks of 4: segment 0 uses blocks 0-2 of 12 positions; segment 2 only 0-2 too (9 indices)
    assert layout.blocks_in_use(torch.zeros(6, dtype=torch.bool), 12, 4) == {0, 1, 2}


@pytest.mark.parametrize("case", ["hand", "every_segment_shape"])
def test_packed_derivation_reads_what_each_segment_reads_alone(case):
    """The decode path derives one view's keys, biases and key-copy rows for all of a request's
    segments in one pass (``ops.derive_packed``); what each segment then reads equals the plain
    torch derivation over that segment alone: the keys with m > 0 among its alive tokens (cache
    indices), bias log m, and each copied key's row in the copy of the alive visual tokens."""
    from vllm_tokenzoom import ops
    from vllm_tokenzoom.kv.layout import CacheLayout
    from vllm_tokenzoom.kv.token_map import TokenMap
    from vllm_tokenzoom.ops.paged_attention_ref import keys_and_bias

    g = torch.Generator().manual_seed(0)
    if case == "hand":  # the layout above: one drop after layer 1
        token_map, layers = TokenMap.build(12, [(2, 7)], [None]), 4
        death = torch.tensor([3, 1, 3, 1, 1, 3])
    else:  # 40 visual tokens, death layers 0..5: six segments, the last with none alive
        token_map, layers = TokenMap.build(50, [(5, 41)], [None]), 7
        death = torch.randint(0, 6, (40,), generator=g)
    layout = CacheLayout(token_map, death, layers)
    visual = torch.randint(0, 3, (token_map.num_visual,), generator=g).float()  # 0 evicted, 2 duplicated
    for value in (visual, torch.zeros_like(visual), (visual > 0).float()):
        pack = layout.packed_on(torch.device("cpu"))
        flat = pack.spread(value)
        row_ofs = [seg.copy_rows for seg in layout.segments]
        for seg, m, row_of in zip(layout.segments, ops.derive_packed(flat, pack, row_ofs), row_ofs):
            seq_len = seg.alive_prompt_tokens + 3  # three generated tokens, read at 1
            alone = torch.ones(seg.alive_prompt_tokens)
            alive = seg.alive_visual
            alone[seg.visual_cache_index[alive]] = value[alive]
            want_keys, want_bias = keys_and_bias(alone, seq_len)
            keys, bias, keys32, bias32 = ops._keys_and_bias(m, seq_len)
            assert torch.equal(m, alone) and torch.equal(keys, want_keys) and torch.equal(keys32, want_keys.int())
            assert torch.equal(bias, want_bias) and (bias32.numel() == 0 or torch.equal(bias32, want_bias))
            assert bias32.numel() or bool((want_bias == 0).all())
            copied = want_keys[want_keys < row_of.numel()]
            want_rows = torch.cat((row_of[copied], torch.full((want_keys.numel() - copied.numel(),), -1)))
            assert torch.equal(ops._ROWS[(id(m), id(row_of))][2], row_of[copied])  # derived in the pass, not again
            assert torch.equal(ops._copy_rows(keys, m, row_of), want_rows.int())


def test_a_batch_step_finds_every_view_derived_for_it(monkeypatch):
    """A batch-16 decode step of a policy that re-selects its view each step (dp) derives each
    request's segments in one pass (``derive_packed``, when building the step's needs); the
    kernel call then finds all of them, also after earlier steps filled the memo (a memo that
    forgot the step's own entries re-derived them in the kernel call, a ``log`` each)."""
    from vllm_tokenzoom import ops
    from vllm_tokenzoom.kv.layout import CacheLayout
    from vllm_tokenzoom.kv.token_map import TokenMap

    g = torch.Generator().manual_seed(1)
    token_map = TokenMap.build(50, [(5, 41)], [None])
    layout = CacheLayout(token_map, torch.randint(0, 6, (40,), generator=g), 7)  # six segments
    pack = layout.packed_on(torch.device("cpu"))
    derived = []
    real = ops.ref.keys_and_bias
    monkeypatch.setattr(ops.ref, "keys_and_bias", lambda *a: derived.append(a) or real(*a))
    held = []  # the sessions hold each step's views
    for _ in range(8):  # 8 steps of 16 requests
        views = [ops.derive_packed(pack.spread((torch.rand(40, generator=g) > 0.7).float()), pack)
                 for _ in range(16)]
        for m in (m for ms in views for m in ms):  # the kernel call: keys and biases of every view
            ops._keys_and_bias(m, m.numel() + 3)
        held.append(views)
    assert not derived, f"{len(derived)} views derived again in the kernel call"
