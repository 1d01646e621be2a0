"""Installed but not enabled, tokenzoom changes nothing; enabled with K=0 it drops nothing."""
import pytest

from vllm_tokenzoom.testing.offline import load_video, run_offline

REQUESTS = [dict(frames=16, seed=20, max_tokens=12), dict(frames=7, seed=21, max_tokens=12),
            dict(frames=1, seed=22, max_tokens=12)]


@pytest.fixture(scope="module")
def vanilla(tiny_model):
    return run_offline(tiny_model, REQUESTS, plugins=False)["outputs"]


def _strip(outputs):
    return [(o["tokens"], o["num_prompt_tokens"]) for o in outputs]


def test_installed_but_disabled_is_token_identical_to_vanilla(tiny_model, vanilla):
    disabled = run_offline(tiny_model, REQUESTS)["outputs"]
    assert all(o["kept"] is None for o in disabled)
    assert _strip(disabled) == _strip(vanilla)


def test_vanilla_matches_hf_transformers(vanilla, dense, prompt):
    for request, got in zip(REQUESTS, vanilla):
        ref = dense.generate(load_video(request), prompt, None, max_new_tokens=12)
        assert (got["tokens"], got["num_prompt_tokens"]) == (ref.tokens, ref.num_prompt_tokens)


def test_ttm_with_zero_ratio_is_token_identical_to_vanilla(tiny_model, vanilla):
    zero = run_offline(tiny_model, REQUESTS, {"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0.0}}}})["outputs"]
    assert [len(o["kept"]) for o in zero] == [16 * 196, 7 * 196, 196]
    assert _strip(zero) == _strip(vanilla)


def test_batch_of_videos_of_different_lengths(tiny_model, vanilla):
    """Stock vLLM 0.32 kills its engine on such a batch (its list path returns 3-D
    embeddings); installed, tokenzoom's model class returns them 2-D, tokens unchanged."""
    batched = run_offline(tiny_model, REQUESTS, batch=True)["outputs"]
    assert _strip(batched) == _strip(vanilla)
