"""Policies, sessions and plans run on the device their inputs live on, with no host sync in
the decode path. ``meta`` tensors have no values: a host synchronisation (``float()``,
``bool()``, ``.item()``, ``.tolist()``) or a device mix raises, so these tests catch both on a
machine without a GPU."""
import torch

from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.methods import DP, TTM, FastV, FrameSampling, RandomDrop, SpatialPool
from vllm_tokenzoom.v1.worker.sessions import RequestSession

META = torch.device("meta")


def test_pre_llm_policies_keep_their_output_on_the_frames_device():
    frames = torch.randn(8, 196, 16, device=META)
    for policy in (TTM(), TTM(variant="official"), RandomDrop(), FrameSampling(), SpatialPool()):
        tokens, kept = policy.apply(frames)
        assert tokens.device == META and kept.frame.device == META and kept.cell.device == META, policy
        assert tokens.shape[0] == policy.num_kept_tokens(8, 196) == len(kept)


def test_prefill_and_decode_decisions_stay_on_the_device():
    dropped, _ = FastV().decide(1, torch.rand(40, device=META))
    assert dropped.device == META and dropped.dtype == torch.bool
    value, state = DP(prune_ratio=0.5).step(torch.rand(40, device=META), None)
    value, state = DP(prune_ratio=0.5).step(torch.rand(40, device=META), state)
    assert value.device == META and state.last_scores.device == META


def test_session_reads_and_writes_views_on_the_device():
    """The decode hot path of a session: a policy's view in, multiplicities over cache indices
    out, the kernel's mass back to per-visual-token scores, a decision made, all on the device."""
    session = RequestSession("r", TokenMap.build(60, [(5, 41)], [None]), 4, {}, {"dp": DP(layer=2)})
    segment = session.layout.segment(2)
    session.decide("dp", 1, 60, torch.rand(40, device=META))  # scores of the first decode query
    m = session.multiplicity(2, 60, segment)
    assert m.device == META and m.shape == (60,)  # over the prompt's cache indices; generated ones read 1
    assert session.multiplicity(1, 60, segment) is None  # layers < L read everything
    scores = session.visual_scores(segment, torch.rand(61, device=META), torch.arange(61), 61)
    assert scores.device == META and scores.shape == (40,)
    session.decide("dp", 1, 61, scores)
    assert session.view.multiplicity(3, 61).device == META
