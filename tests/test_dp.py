"""DyCoke's dynamic pruning policy (DyCoke §3.2(2)): which visual tokens layers >= L read."""
import pytest
import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.dp import DP


def read(value: torch.Tensor) -> list[int]:
    """The visual indices layers >= L read (multiplicity 1), the others must be 0."""
    assert set(value.unique().tolist()) <= {0.0, 1.0}
    return value.nonzero().flatten().tolist()


def test_first_step_keeps_the_most_attended_tokens_in_order():
    scores = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05, 0.0, 0.2, 0.4, 0.0, 0.1])
    value, _ = DP(prune_ratio=0.7).step(scores, None)
    assert read(value) == [1, 3, 7]  # int(10 * 0.3) = 3 most attended


def test_stable_attention_reuses_the_selection_in_the_papers_variant():
    dp = DP(prune_ratio=0.5, threshold=0.9)
    _, state = dp.step(torch.tensor([4.0, 3.0, 2.0, 1.0]), None)
    # cosine(new, old) > 0.9 although the ranking changed: the old selection stays
    value, state = dp.step(torch.tensor([3.0, 4.0, 1.0, 2.2]), state)
    assert read(value) == [0, 1]
    assert torch.equal(state.last_scores, torch.tensor([3.0, 4.0, 1.0, 2.2]))  # updated every step


def test_changed_attention_reselects():
    dp = DP(prune_ratio=0.5, threshold=0.9)
    _, state = dp.step(torch.tensor([4.0, 3.0, 0.0, 0.0]), None)
    value, _ = dp.step(torch.tensor([0.0, 0.0, 3.0, 4.0]), state)  # cosine 0
    assert read(value) == [2, 3]


def test_official_variant_attends_to_everything_on_stable_steps():
    dp = DP(prune_ratio=0.5, variant="official")
    first, state = dp.step(torch.tensor([4.0, 3.0, 2.0, 1.0]), None)
    second, state = dp.step(torch.tensor([4.0, 3.0, 2.0, 1.1]), state)
    assert read(first) == [0, 1] and read(second) == [0, 1, 2, 3]
    # the selection in force is still the last one chosen: a stable step after an unstable one reuses it
    third, _ = dp.step(torch.tensor([1.0, 2.0, 3.0, 4.0]), state)
    assert read(third) == [2, 3]


def test_zero_ratio_keeps_every_visual_token():
    assert read(DP(prune_ratio=0.0).step(torch.rand(7), None)[0]) == list(range(7))


def test_ties_prefer_earlier_tokens():
    assert read(DP(prune_ratio=0.5).step(torch.ones(6), None)[0]) == [0, 1, 2]


def test_decisions_run_on_the_scores_device_without_host_sync():
    """``meta`` tensors have no values: any host synchronisation (``float()``, ``bool()``,
    ``.item()``) or device mix raises. Every step stays on the device."""
    dp = DP(prune_ratio=0.5)
    value, state = dp.step(torch.rand(10, device="meta"), None)
    for _ in range(2):
        value, state = dp.step(torch.rand(10, device="meta"), state)
    assert value.device.type == "meta" and state.selection.device.type == "meta" and value.shape == (10,)


@pytest.mark.parametrize("kwargs, text", [
    ({"layer": 0}, "layer = 0 is out of range; allowed: layer >= 1"),
    ({"prune_ratio": 1.0}, "prune_ratio = 1.0 is out of range"),
    ({"threshold": 1.5}, "threshold = 1.5 is out of range"),
    ({"variant": "x"}, "variant = 'x' is not known"),
])
def test_bad_settings(kwargs, text):
    with pytest.raises(TokenZoomConfigError, match=text.replace("(", r"\(")):
        DP(**kwargs)


def test_top_k_mask_is_the_stable_order_of_scores():
    """The first k of (score desc, index asc) for every k, with many exact ties (hypothesis-free:
    a fixed grid of small integers makes ties everywhere)."""
    from vllm_tokenzoom.methods.base import top_k_mask

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 500):
        scores = torch.randint(0, 4, (n,), generator=gen).float()
        order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        for k in range(n + 1):
            assert top_k_mask(scores, k).nonzero().flatten().tolist() == sorted(order[:k]), (n, k)
