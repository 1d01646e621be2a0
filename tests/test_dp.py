"""DyCoke's dynamic pruning policy (DyCoke §3.2(2)): which visual tokens layers >= L read."""
import pytest
import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.dp import DP, DPState


def test_first_step_keeps_the_most_attended_tokens_in_order():
    scores = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05, 0.0, 0.2, 0.4, 0.0, 0.1])
    decision = DP(prune_ratio=0.7).decide(scores, DPState())
    assert decision.reselected
    assert decision.selection.tolist() == [1, 3, 7]  # int(10 * 0.3) = 3 most attended, sorted


def test_stable_attention_reuses_the_selection_in_the_papers_variant():
    dp = DP(prune_ratio=0.5, threshold=0.9)
    first = dp.decide(torch.tensor([4.0, 3.0, 2.0, 1.0]), DPState())
    # cosine(new, old) > 0.9 although the ranking changed: the old selection stays
    second = dp.decide(torch.tensor([3.0, 4.0, 1.0, 2.2]), first.state)
    assert not second.reselected and second.selection.tolist() == [0, 1]
    assert torch.equal(second.state.last_scores, torch.tensor([3.0, 4.0, 1.0, 2.2]))  # updated every step


def test_changed_attention_reselects():
    dp = DP(prune_ratio=0.5, threshold=0.9)
    first = dp.decide(torch.tensor([4.0, 3.0, 0.0, 0.0]), DPState())
    second = dp.decide(torch.tensor([0.0, 0.0, 3.0, 4.0]), first.state)  # cosine 0
    assert second.reselected and second.selection.tolist() == [2, 3]


def test_official_variant_attends_to_everything_on_stable_steps():
    dp = DP(prune_ratio=0.5, variant="official")
    first = dp.decide(torch.tensor([4.0, 3.0, 2.0, 1.0]), DPState())
    second = dp.decide(torch.tensor([4.0, 3.0, 2.0, 1.1]), first.state)
    assert first.selection.tolist() == [0, 1] and second.selection is None


def test_zero_ratio_keeps_every_visual_token():
    assert DP(prune_ratio=0.0).decide(torch.rand(7), DPState()).selection.tolist() == list(range(7))


def test_ties_prefer_earlier_tokens():
    assert DP(prune_ratio=0.5).decide(torch.ones(6), DPState()).selection.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs, text", [
    ({"layer": 0}, "layer = 0 is out of range; allowed: layer >= 1"),
    ({"prune_ratio": 1.0}, "prune_ratio = 1.0 is out of range"),
    ({"threshold": 1.5}, "threshold = 1.5 is out of range"),
    ({"variant": "x"}, "variant = 'x' is not known"),
])
def test_bad_settings(kwargs, text):
    with pytest.raises(TokenZoomConfigError, match=text.replace("(", r"\(")):
        DP(**kwargs)
