"""A step's bookkeeping without vLLM, hand-derived: which queries each layer computes over the
view, and the batch and attention metadata left after rows die at a layer boundary."""
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.methods import DP, FastV
from vllm_tokenzoom.v1.worker.sessions import RequestSession
from vllm_tokenzoom.v1.worker.step import Step

BLOCK = 4


@dataclass
class Common:
    """The CommonAttentionMetadata fields a step reads and rewrites."""

    num_reqs: int
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_table_tensor: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor | None = None
    seq_lens_cpu_upper_bound: torch.Tensor | None = None


def bound_step(sessions, qsl, seq_lens, block_table):
    qsl, seq_lens = torch.tensor(qsl), torch.tensor(seq_lens)
    slots = torch.cat([block_table[r, p // BLOCK] * BLOCK + p % BLOCK for r, p in enumerate(
        torch.arange(int(seq_lens[r]) - int(qsl[r + 1] - qsl[r]), int(seq_lens[r])) for r in range(len(sessions)))])
    common = Common(len(sessions), qsl, qsl, seq_lens, int(qsl[-1]), 0, 0, block_table, slots)
    built = []
    builder = SimpleNamespace(kv_cache_spec=SimpleNamespace(block_size=BLOCK),
                              build=lambda prefix, c: built.append(c) or c)
    step = Step(sessions, 4, [f"layer{i}" for i in range(4)])
    assert step.bind(builder, common)
    return step, built


def test_rows_leave_after_the_death_layer_and_metadata_follows():
    """Row 0: a plain request's 3-token prefill; row 1: a FastV request's whole prompt
    (2 text, 6 visual at positions 2..7, newline 8, 3 text: N = 12) in its own blocks."""
    session = RequestSession("r", TokenMap.build(12, [(2, 7)], [None]), 4, {"fastv": FastV(layer=2)}, {})
    block_table = torch.tensor([[7, 0, 0, 0], [3, 5, 9, 0]])
    step, built = bound_step([None, session], [0, 3, 15], [3, 12], block_table)
    assert step.may_drop_rows()
    ctx = SimpleNamespace(attn_metadata={f"layer{i}": "stock" for i in range(4)},
                          slot_mapping={f"layer{i}": "stock" for i in range(4)})
    needs = step.needs(1)  # FastV's probe: the last prompt token at layer K-1 = 1
    assert [(n.row, n.token, n.position, n.cache_len, n.scores) for n in needs] == [(1, 14, 11, 12, ("fastv",))]
    assert step.needs(0) == []
    scores = torch.zeros(12)
    scores[torch.tensor([2, 3, 4, 5, 6, 7])] = torch.tensor([0.1, 0.5, 0.2, 0.05, 0.4, 0.3])
    step.record(1, needs[0], scores, torch.arange(12))
    keep = step.after_layer(1, ctx, num_rows=15)  # FastV keeps round(6 * 0.5) = 3: positions 3, 6, 7
    assert keep.tolist() == [0, 1, 2, 3, 4, 6, 9, 10, 11, 12, 13, 14]
    assert session.view.death.tolist() == [1, 3, 1, 1, 3, 3]  # visual indices 1, 4, 5 stay
    (common,) = built
    assert common.query_start_loc_cpu.tolist() == [0, 3, 12] and common.seq_lens.tolist() == [3, 9]
    assert common.num_actual_tokens == 12 and common.max_query_len == 9 and common.max_seq_len == 9
    # row 0 keeps its slots; row 1's 9 alive tokens sit at cache indices 0..8 of blocks 3, 5, 9
    assert common.slot_mapping.tolist() == [28, 29, 30] + [12, 13, 14, 15, 20, 21, 22, 23, 36]
    assert [ctx.attn_metadata[f"layer{i}"] is common for i in range(4)] == [False, False, True, True]
    assert ctx.slot_mapping["layer3"].tolist() == common.slot_mapping.tolist()
    assert step.after_layer(2, ctx, num_rows=12) is None  # nothing dies after layer 2
    step.finish()
    assert session.prefill_done and step.layout(3).num_tokens == 12


def test_a_decode_step_after_the_drop_reads_the_compacted_cache():
    session = RequestSession("r", TokenMap.build(12, [(2, 7)], [None]), 4, {"fastv": FastV(layer=2)}, {})
    session.view.drop_after(torch.tensor([True, False, True, True, False, False]), layer=1)
    session.prefill_done = True
    step, built = bound_step([session], [0, 1], [14], torch.tensor([[3, 5, 9, 11]]))  # the query at position 13
    assert not step.may_drop_rows()
    ctx = SimpleNamespace(attn_metadata={f"layer{i}": "stock" for i in range(4)}, slot_mapping={})
    step.begin(ctx)
    (common,) = built
    # alive in layers >= 2: 12 - 3 = 9 prompt tokens, then positions 12, 13 at cache indices 9, 10
    assert common.seq_lens.tolist() == [11] and common.slot_mapping.tolist() == [9 * BLOCK + 2]  # index 10: block 9
    assert [ctx.attn_metadata[f"layer{i}"] is common for i in range(4)] == [False, False, True, True]
    assert step.needs(2) == [] and step.needs(3) == []  # no view: the stock kernel over the compacted cache


def test_layers_that_score_for_different_policies_do_not_share_needs():
    """A prefill policy done with its scoring layer and a decode policy scoring the next layer
    over the same layout: each layer gets its own needs."""
    session = RequestSession("r", TokenMap.build(12, [(2, 7)], [None]), 4, {"fastv": FastV(layer=2)},
                             {"dp": DP(layer=3, prune_ratio=0.5)})
    session.prefill_done = True
    step, _ = bound_step([session], [0, 1], [13], torch.tensor([[3, 5, 9, 11]]))
    assert step.needs(1) == []  # FastV scored during prefill only
    (need,) = step.needs(2)
    assert (need.position, need.scores, need.multiplicity) == (12, ("dp",), None)
    step.record(2, need, torch.rand(13), torch.arange(13))
    (need,) = step.needs(3)  # dp decided at layer 2: layer 3 reads its view
    assert need.scores == () and need.multiplicity.shape == (12,) and int((need.multiplicity == 0).sum()) == 3
    assert need.cache_len == 13  # the generated position 12 reads 1 (after the multiplicity's prompt part)


def test_a_step_whose_metadata_is_not_its_batch_says_so_once():
    """Metadata of another row count (micro-batching: refused at start-up; or anything unforeseen)
    leaves the step unbound (vLLM's stock attention) and warns, once per process, not silently."""
    import logging

    from vllm_tokenzoom.v1.worker import step as steps

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("vllm.tokenzoom")
    logger.addHandler(handler)
    steps._WARNED.discard("unbound")
    try:
        common = Common(1, torch.tensor([0, 3]), torch.tensor([0, 3]), torch.tensor([3]), 3, 3, 3,
                        torch.zeros(1, 1, dtype=torch.long), torch.arange(3))
        for _ in range(2):
            assert not Step([None, None], 4, [f"layer{i}" for i in range(4)]).bind(SimpleNamespace(), common)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].levelno == logging.WARNING
    assert "1 request rows but its batch 2" in seen[0].getMessage() and "stock attention" in seen[0].getMessage()
