"""The pre-LLM baselines (random drop, frame sampling, spatial pooling): budgets, what they keep,
and vLLM = the dense reference with the same policy (same kept tokens, same greedy tokens)."""
import pytest
import torch

from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods import FrameSampling, RandomDrop, SpatialPool
from vllm_tokenzoom.testing.offline import load_video, run_offline

RATIOS = [0.05, 0.15, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("cls", [RandomDrop, FrameSampling, SpatialPool])
@pytest.mark.parametrize("ratio", RATIOS)
def test_apply_returns_exactly_the_counted_tokens(cls, ratio):
    policy = cls(keep_ratio=ratio)
    for frames in (1, 2, 5, 16, 33):
        tokens, _ = policy.apply(torch.randn(frames, 196, 8))
        assert tokens.shape == (policy.num_kept_tokens(frames, 196), 8)
        assert abs(tokens.shape[0] / (frames * 196) - ratio) <= 0.5 / frames + 0.06 or tokens.shape[0] in (196, 1)


def test_random_drop_is_a_fixed_random_subset():
    frames = torch.randn(16, 196, 4)
    tokens, kept = RandomDrop(keep_ratio=0.15, seed=3).apply(frames)
    kept = kept.source
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == round(0.15 * 16 * 196)
    assert torch.equal(tokens, frames.flatten(0, 1)[kept])
    assert torch.equal(kept, RandomDrop(keep_ratio=0.15, seed=3).plan(16, 196))
    assert not torch.equal(kept, RandomDrop(keep_ratio=0.15, seed=4).plan(16, 196))
    assert len(set((kept // 196).tolist())) > 12  # spread over the frames, not a block


def test_frame_sampling_keeps_whole_uniform_frames_from_first_to_last():
    frames = torch.arange(32 * 196 * 2, dtype=torch.float32).view(32, 196, 2)
    tokens, kept = FrameSampling(keep_ratio=0.25).apply(frames)
    kept = kept.source
    chosen = sorted(set((kept // 196).tolist()))
    assert chosen[0] == 0 and chosen[-1] == 31 and len(chosen) == 8
    assert len(set(b - a for a, b in zip(chosen, chosen[1:]))) <= 2  # evenly spaced up to rounding
    assert torch.equal(tokens, frames[chosen].flatten(0, 1))


def test_spatial_pool_averages_square_neighbourhoods():
    frames = torch.randn(3, 196, 5)
    pooled, kept = SpatialPool(keep_ratio=0.25).apply(frames)  # 14x14 -> 7x7: exact 2x2 means
    grid = frames.view(3, 14, 14, 5)
    expected = grid.view(3, 7, 2, 7, 2, 5).mean((2, 4)).reshape(3 * 49, 5)
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert kept.cells == 49 and kept.frame.tolist() == [f for f in range(3) for _ in range(49)]  # new cells: 7 x 7
    assert torch.allclose(SpatialPool(keep_ratio=1.0).apply(frames)[0], frames.flatten(0, 1))


@pytest.mark.parametrize("raw, words", [
    ({"methods": {"random_drop": {"keep_ratio": 0}}}, ["random_drop.keep_ratio", "0", "0.0 < keep_ratio <= 1.0"]),
    ({"methods": {"spatial_pool": {"keep_ratio": 1.5}}}, ["spatial_pool.keep_ratio", "1.5"]),
    ({"methods": {"ttm": {}, "random_drop": {}}}, ["'ttm', 'random_drop'", "at most one of"]),
    ({"preset": "dycoke", "methods": {"frame_sampling": {}}}, ["'ttm', 'frame_sampling'", "at most one of"]),
])
def test_bad_baseline_configs_are_refused_with_what_is_allowed(raw, words):
    with pytest.raises(TokenZoomConfigError) as e:
        parse_config({"tokenzoom": raw})
    for w in words:
        assert w in str(e.value)


POLICIES = {"random_drop": RandomDrop(keep_ratio=0.15), "frame_sampling": FrameSampling(keep_ratio=0.3),
            "spatial_pool": SpatialPool(keep_ratio=0.25)}
REQUESTS = [dict(frames=16, seed=40, max_tokens=6), dict(frames=7, seed=41, max_tokens=6)]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_vllm_matches_the_reference(name, tiny_model, dense, prompt):
    policy = POLICIES[name]
    config = {"tokenzoom": {"methods": {name: {"keep_ratio": policy.keep_ratio}}}}
    outputs = run_offline(tiny_model, REQUESTS, config)["outputs"]
    for request, got in zip(REQUESTS, outputs):
        ref = dense.generate(load_video(request), prompt, policy, max_new_tokens=6)
        assert got["kept"] == (None if ref.kept is None else ref.kept.tolist()), request
        assert got["num_prompt_tokens"] == ref.num_prompt_tokens, request
        assert got["tokens"] == ref.tokens, request
