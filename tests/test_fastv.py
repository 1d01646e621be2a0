"""FastV's policy (methods-spec.md §3.3), hand-derived: which visual tokens leave after layer K-1."""
import pytest
import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.fastv import FastV


def kept(fastv: FastV, scores: list[float]) -> list[int]:
    dropped, _ = fastv.decide(fastv.layer - 1, torch.tensor(scores))
    return (~dropped).nonzero().flatten().tolist()


def test_keeps_the_most_attended_round_half_even():
    scores = [0.1, 0.5, 0.05, 0.3, 0.2]
    assert kept(FastV(prune_ratio=0.5), scores) == [1, 3]  # round(2.5) = 2 (Python rounds half to even)
    assert kept(FastV(prune_ratio=0.5), scores + [0.0, 0.4]) == [1, 3, 4, 6]  # round(3.5) = 4
    assert kept(FastV(prune_ratio=0.75), scores + [0.0, 0.4, 0.01]) == [1, 6]  # round(2.0)
    assert kept(FastV(prune_ratio=0.0), scores) == [0, 1, 2, 3, 4]


def test_ties_go_to_the_earlier_position():
    assert kept(FastV(prune_ratio=0.5), [1.0, 2.0, 2.0, 2.0, 0.0, 2.0]) == [1, 2, 3]


def test_decides_only_at_its_layer():
    fastv = FastV(layer=3)
    assert fastv.decide(1, torch.rand(8))[0] is None and fastv.decide(3, torch.rand(8))[0] is None
    assert fastv.decide(2, torch.rand(8))[0].sum() == 4
    assert [(a.layer, a.queries.name) for a in fastv.score_requests()] == [(2, "LAST_PROMPT")]


def test_layer_averaged_visual_kv_share():
    """methods-spec §0: the FastV rows of VAS Table 1 (K=2, R=50%): 17/32 and 15/28."""
    assert FastV(layer=2, prune_ratio=0.5).visual_kv_share(32) == pytest.approx(17 / 32)
    assert FastV(layer=2, prune_ratio=0.5).visual_kv_share(28) == pytest.approx(15 / 28)
    assert FastV(layer=2, prune_ratio=0.5).visual_kv_share(4) == pytest.approx(0.75)


def test_settings_checked_against_the_model():
    with pytest.raises(TokenZoomConfigError, match=r"layer = 0 is out of range; allowed: layer >= 1"):
        FastV(layer=0)
    with pytest.raises(TokenZoomConfigError, match=r"prune_ratio = 1.0 is out of range"):
        FastV(prune_ratio=1.0)
    FastV(layer=3).check_model(4)
    with pytest.raises(TokenZoomConfigError, match=r"layer = 4 is out of range for this model; allowed: 1 <= layer < 4"):
        FastV(layer=4).check_model(4)
