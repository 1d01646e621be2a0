"""TTM (DyCoke §3.2(1)) as the paper defines it, and the official code's counts."""
import math

import pytest
import torch

from vllm_tokenzoom.methods.ttm import TTM

N = 196  # LLaVA-OneVision tokens per frame


def paper_count(num_frames: int, k: float) -> int:
    """Each 4-frame window (the last, partial one too) keeps its first frame whole."""
    full = math.ceil(num_frames / 4)
    return full * N + (num_frames - full) * int((1 - k) * N)


def official_count(num_frames: int, k: float) -> int:
    """KD-TAO/DyCoke dycole_ttm: pairs (odd last frame lost), stage-2 windows range(0, T-4, 4)."""
    if num_frames == 1:
        return N
    even = num_frames - num_frames % 2
    windows = len(range(0, num_frames - 4, 4))
    full, pruned = even // 2 - windows, even // 2 + windows
    return full * N + pruned * int((1 - k) * N)


@pytest.mark.parametrize("k", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_kept_counts_1_to_33_frames(k):
    for frames in range(1, 34):
        assert TTM(prune_ratio=k).num_kept_tokens(frames, N) == paper_count(frames, k), frames
        assert TTM(prune_ratio=k, variant="official").num_kept_tokens(frames, N) == official_count(frames, k), frames


def test_published_counts():
    # DyCoke's K: keep int((1-K)*196) tokens of a pruned frame
    assert [TTM(prune_ratio=k).tokens_kept_per_pruned_frame(N) for k in (0.3, 0.5, 0.7)] == [137, 98, 58]
    # official code on 32 frames: frames 28 and 30 stay whole -> 9 whole + 23 pruned frames
    assert TTM(variant="official").num_kept_tokens(32, N) == 9 * 196 + 23 * 58 == 3098
    # the paper's intent on 16 frames: 4 whole + 12 pruned, (1 + 3 * 0.3) / 4 of the tokens
    assert TTM().num_kept_tokens(16, N) == 4 * 196 + 12 * 58 == 1480


def reference_plan(frames: torch.Tensor, k: float) -> list[int]:
    """The paper's windows, written as plain loops over frames and tokens."""
    t, n, _ = frames.shape
    keep = int((1 - k) * n)
    kept = []
    for f in range(t):
        w = f - f % 4
        ref = {0: None, 1: w, 2: w, 3: w + 2}[f % 4]
        if ref is None:
            kept += [f * n + j for j in range(n)]
            continue
        sims = [float(torch.nn.functional.cosine_similarity(frames[f, j], frames[ref, j], dim=0)) for j in range(n)]
        least_similar = sorted(range(n), key=lambda j: (sims[j], j))[:keep]
        kept += [f * n + j for j in sorted(least_similar)]
    return kept


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13])
@pytest.mark.parametrize("k", [0.3, 0.7])
def test_plan_matches_the_papers_windows(num_frames, k):
    gen = torch.Generator().manual_seed(num_frames)
    frames = torch.randn(num_frames, 12, 8, generator=gen)
    plan = TTM(prune_ratio=k).plan(frames)
    assert plan.tolist() == reference_plan(frames, k)
    assert len(plan) == TTM(prune_ratio=k).num_kept_tokens(num_frames, 12)


def test_drops_the_tokens_most_similar_to_the_reference():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    pivot = torch.stack([e0, e0, e0, e0])
    second = torch.stack([e0, e1, 2 * e0, -e0])  # similarity to the pivot: 1, 0, 1, -1
    plan = TTM(prune_ratio=0.5).plan(torch.stack([pivot, second]))
    assert plan.tolist() == [0, 1, 2, 3, 4 + 1, 4 + 3]  # the pivot whole; tokens 1 and 3, in spatial order


def test_kept_tokens_keep_spatial_order_and_their_features():
    frames = torch.randn(8, 20, 4, generator=torch.Generator().manual_seed(0))
    kept_tokens, kept = TTM(prune_ratio=0.7).apply(frames)
    kept = kept.source
    for f in range(8):
        in_frame = kept[(kept >= f * 20) & (kept < (f + 1) * 20)]
        assert torch.equal(in_frame, in_frame.sort().values)
    assert torch.equal(kept_tokens, frames.flatten(0, 1)[kept])


def test_zero_ratio_keeps_every_token_in_order():
    frames = torch.randn(7, 10, 4)
    assert TTM(prune_ratio=0.0).plan(frames).tolist() == list(range(70))


def _kept_per_frame(plan, num_frames, n):
    return {f: [v % n for v in plan.tolist() if v // n == f] for f in range(num_frames)}


def test_official_variant_skips_last_window_and_odd_last_frame():
    official = TTM(prune_ratio=0.5, variant="official")
    eight = _kept_per_frame(official.plan(torch.randn(8, 10, 4)), 8, 10)
    assert [len(eight[f]) for f in range(8)] == [10, 5, 5, 5, 10, 5, 10, 5]  # frame 6: last window skipped
    nine = _kept_per_frame(official.plan(torch.randn(9, 10, 4)), 9, 10)
    assert [len(nine[f]) for f in range(9)] == [10, 5, 5, 5, 10, 5, 5, 5, 0]  # odd last frame dropped
    paper = _kept_per_frame(TTM(prune_ratio=0.5).plan(torch.randn(9, 10, 4)), 9, 10)
    assert [len(paper[f]) for f in range(9)] == [10, 5, 5, 5, 10, 5, 5, 5, 10]


def test_identical_frames_keep_the_first_tokens():
    """Ties (a static scene) resolve by position, so the choice is deterministic."""
    frames = torch.ones(2, 10, 3)
    assert TTM(prune_ratio=0.7).plan(frames).tolist() == list(range(10)) + [10, 11, 12]


def test_the_reference_takes_an_engine_choice_only_up_to_rounding_ties(dense):
    """Served tests run the dense reference on the engine's TTM choice (the two vision towers
    differ at ~1e-6): it must be TTM's own, but for tokens at a frame's keep boundary."""
    from vllm_tokenzoom.testing.video import make_video

    video, ttm = make_video(16, seed=41), TTM(prune_ratio=0.7)
    pooled, every = dense.video_embeddings(video, None)
    frames = pooled[:-1].view(16, every.cells, -1)
    ours, (pruned, sim) = ttm.plan(frames).tolist(), ttm.similarities(frames)
    assert dense.engine_ttm(video, ttm, ours).source == tuple(ours)
    keep = ttm.tokens_kept_per_pruned_frame(every.cells)
    ordered = sim.sort(dim=-1)  # ascending similarity: the first `keep` of a frame are kept
    gaps = ordered.values[:, keep] - ordered.values[:, keep - 1]  # [P] either side of the boundary
    i = int(gaps.argmax())
    frame, ranked, gap = pruned[i], ordered.indices[i].tolist(), float(gaps[i])

    def swapped(kept_cell, dropped_cell):
        return sorted(set(ours) - {frame * every.cells + kept_cell} | {frame * every.cells + dropped_cell})

    with pytest.raises(AssertionError, match="more than rounding"):  # the least similar for the most
        dense.engine_ttm(video, ttm, swapped(ranked[0], ranked[-1]))
    assert dense.engine_ttm(video, ttm, swapped(ranked[keep - 1], ranked[keep]), tol=0.75 * gap)
    with pytest.raises(AssertionError, match="more than rounding"):
        dense.engine_ttm(video, ttm, swapped(ranked[keep - 1], ranked[keep]), tol=0.25 * gap)
    with pytest.raises(AssertionError, match="kept 1"):
        dense.engine_ttm(video, ttm, ours[:1])
